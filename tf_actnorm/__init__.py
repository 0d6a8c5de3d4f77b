"""ActNorm (Activation Normalization, Glow) as a Keras 3 layer and a TFP bijector.

``ActNorm`` runs on the TensorFlow, JAX and PyTorch Keras backends; importing this
package imports TensorFlow only when it is the Keras backend. ``ActNormBijector``
(TensorFlow Probability) and ``initialize`` (TensorFlow backend) are imported on
first use.
"""

from tf_actnorm.layer import ActNorm

__all__ = ["ActNorm", "ActNormBijector", "initialize"]
__version__ = "0.1.0"

# Name -> (module, what to install when TensorFlow is missing).
_TENSORFLOW_ONLY = {
    "ActNormBijector": ("tf_actnorm.bijector", "tensorflow and tensorflow-probability[tf]"),
    "initialize": ("tf_actnorm.init", "tensorflow"),
}


def __getattr__(name):
    if name not in _TENSORFLOW_ONLY:
        raise AttributeError(f"module 'tf_actnorm' has no attribute {name!r}")
    module, requirement = _TENSORFLOW_ONLY[name]
    try:
        import importlib  # noqa: PLC0415

        value = getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise ImportError(
            f"tf_actnorm.{name} needs TensorFlow: install {requirement} "
            f"(`pip install {requirement.replace(' and ', ' ')}`; the ActNorm layer itself "
            f"runs without them on the JAX and PyTorch Keras backends). "
            f"Import failed with: {error}") from error
    globals()[name] = value
    return value
