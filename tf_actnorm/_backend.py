"""The one place where ActNorm picks its implementation for the Keras backend.

* TensorFlow: ``_tf_impl`` — TensorFlow ops with everything that only TensorFlow
  has: ``tf.distribute`` all-reduces and mirrored assignments, the ``tf.cond`` init
  guard and its behaviour under XLA and SavedModel tracing, the custom-gradient
  multiply-add and the CPU GEMV channel sums (``_math``, ``_stats``, ``_state``).
* JAX and PyTorch: ``_ops`` — ``keras.ops`` only, so it runs wherever Keras does,
  without TensorFlow installed.

Both implement the same functions (``forward``, ``inverse``, ``maybe_initialize``, ...)
from the same formulas (``_formulas``); where TensorFlow needs nothing of its own
(``log_det``, ``run_if``), ``_tf_impl`` takes the ``keras.ops`` function. This module
imports neither until asked, so ``import tf_actnorm`` never needs TensorFlow on the
other backends.
"""

import keras

SUPPORTED = ("tensorflow", "jax", "torch")


def implementation():
    """The module implementing ActNorm for the current Keras backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from tf_actnorm import _tf_impl  # noqa: PLC0415 (TensorFlow only when it is the backend)

        return _tf_impl
    if backend in SUPPORTED:
        from tf_actnorm import _ops  # noqa: PLC0415

        return _ops
    raise NotImplementedError(
        f"ActNorm runs on the Keras backends {', '.join(SUPPORTED)}; "
        f"the current backend is {backend!r} (set KERAS_BACKEND)")
