"""ActNorm (Activation Normalization, Glow) as a Keras 3 layer, a TFP bijector and a
PyTorch module.

* ``ActNorm``: the Keras layer (the TensorFlow, JAX and PyTorch Keras backends;
  extras ``tensorflow``, ``jax`` or ``torch``). Imported with the package when Keras and
  its configured backend can be imported, so that ``.keras`` files that contain it load
  after ``import tf_actnorm``; otherwise on first use.
* ``initialize``: multi-batch initialisation (any of those backends; TFP flows with the
  ``tensorflow`` extra), on first use.
* ``ActNormBijector`` (TensorFlow Probability): on first use (extra ``tensorflow``).
* ``tf_actnorm.torch.ActNorm``: a plain ``torch.nn.Module`` (extra ``torch``); it needs
  neither Keras nor TensorFlow.
"""

import importlib

__all__ = ["ActNorm", "ActNormBijector", "initialize"]
__version__ = "0.2.0"

# Name -> (module, the extra that provides what it imports).
_LAZY = {
    "ActNorm": ("tf_actnorm.layer", "Keras and the backend it is set to (KERAS_BACKEND)"),
    "ActNormBijector": ("tf_actnorm.bijector", "tensorflow"),
    "initialize": ("tf_actnorm.init", "a Keras backend: tensorflow, jax or torch"),
}


try:
    from tf_actnorm.layer import ActNorm  # registers the layer for `.keras` files
except ImportError:  # no Keras, or not its backend: `ActNorm` raises on use, naming the extra
    pass


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tf_actnorm' has no attribute {name!r}")
    module, extra = _LAZY[name]
    try:
        value = getattr(importlib.import_module(module), name)
    except ImportError as error:
        extras = ("the tensorflow extra" if extra == "tensorflow" else
                  "the extra of a backend, tensorflow, jax or torch, and set KERAS_BACKEND to it")
        example = ".[tensorflow]" if extra == "tensorflow" else ".[jax]"
        raise ImportError(
            f"tf_actnorm.{name} needs {extra}: install {extras} (from a clone of the "
            f'repository: pip install "{example}"). Import failed with: {error}') from error
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
