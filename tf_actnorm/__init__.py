"""ActNorm (Activation Normalization, Glow) as a Keras 3 layer and a TFP bijector."""

from tf_actnorm.bijector import ActNormBijector
from tf_actnorm.init import initialize
from tf_actnorm.layer import ActNorm

__all__ = ["ActNorm", "ActNormBijector", "initialize"]
__version__ = "0.1.0"
