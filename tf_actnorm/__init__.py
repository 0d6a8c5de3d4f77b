"""ActNorm (Activation Normalization, Glow) as a Keras 3 layer, a TFP bijector and a
PyTorch module.

Every name is imported on first use, so ``import tf_actnorm`` imports no framework:

* ``ActNorm``: the Keras layer (the TensorFlow, JAX and PyTorch Keras backends;
  extras ``tensorflow``, ``jax`` or ``torch``).
* ``initialize``: multi-batch initialisation (any of those backends).
* ``ActNormBijector`` (TensorFlow Probability): extra ``tensorflow``.
* ``tf_actnorm.torch.ActNorm``: a plain ``torch.nn.Module`` (extra ``torch``; no Keras).
"""

import importlib

__all__ = ["ActNorm", "ActNormBijector", "initialize"]
__version__ = "0.2.0"

# Name -> (module, the extra that provides what it imports).
_LAZY = {
    "ActNorm": ("tf_actnorm.layer", "a Keras backend: tensorflow, jax or torch"),
    "ActNormBijector": ("tf_actnorm.bijector", "tensorflow"),
    "initialize": ("tf_actnorm.init", "a Keras backend: tensorflow, jax or torch"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tf_actnorm' has no attribute {name!r}")
    module, extra = _LAZY[name]
    try:
        value = getattr(importlib.import_module(module), name)
    except ImportError as error:
        hint = ('`pip install "tf_actnorm[tensorflow]"`' if extra == "tensorflow" else
                'one of `pip install "tf_actnorm[tensorflow]"`, `"tf_actnorm[jax]"`, '
                '`"tf_actnorm[torch]"` (and KERAS_BACKEND to match)')
        raise ImportError(
            f"tf_actnorm.{name} needs {extra}: install the extra, {hint}. "
            f"Import failed with: {error}") from error
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
