"""The one place where ActNorm picks what its Keras backend does its own way.

ActNorm itself is written once, in ``keras.ops`` (``_ops``). :func:`kernels` returns the
module of the current backend with the few things that differ:

* ``_tf_backend``: ``tf.distribute`` all-reduces, runtime assertions (not under XLA),
  the SavedModel save context, the output-based custom gradient and CPU matrix-vector
  channel sums (both measured faster there, docs/benchmarks.md), moments of eager
  tensors as one traced call.
* ``_jax_backend``: host callbacks from ``jax.jit``, the ``jax2tf`` export trace.
* ``_torch_backend``: the ONNX export trace.

Each provides the names in :data:`HOOKS`; the JAX and PyTorch modules take the plain
``keras.ops`` ones below where they need nothing else. This module imports no backend
until asked, so ``import tf_actnorm`` never needs TensorFlow on the other backends.
"""

import functools

import keras
from keras import ops

SUPPORTED = ("tensorflow", "jax", "torch")

# What each backend module provides (see the module doc).
HOOKS = ("OUTPUT_GRADIENT", "channel_sum", "sum_over_replicas", "replicated",
         "assigns_in_branches", "is_traced", "checked", "serving", "exporting", "stored_flag",
         "initialized_by_call", "run_if", "compiled_moments")


def kernels():
    """The module of the current Keras backend (see the module doc)."""
    return _kernels(keras.backend.backend())


@functools.lru_cache(maxsize=None)
def _kernels(backend):
    # Imported on first use: only the current backend's module, and its framework.
    if backend == "tensorflow":
        from tf_actnorm import _tf_backend as module  # noqa: PLC0415
    elif backend == "jax":
        from tf_actnorm import _jax_backend as module  # noqa: PLC0415
    elif backend == "torch":
        from tf_actnorm import _torch_backend as module  # noqa: PLC0415
    else:
        raise NotImplementedError(
            f"ActNorm runs on the Keras backends {', '.join(SUPPORTED)}; "
            f"the current backend is {backend!r} (set KERAS_BACKEND)")
    return module


# The plain `keras.ops` versions, for backends that need nothing of their own.

def channel_sum(x, axis):
    """Sum of ``x`` over every axis but ``axis``, shape [C]."""
    rank = len(x.shape)
    return ops.sum(x, axis=tuple(i for i in range(rank) if i != axis % rank))


def sum_over_replicas(values):
    """``values`` summed over the replicas of a distributed step: as they are where the
    sums already cover the global batch (JAX shards the batch inside ``jax.jit``)."""
    return values


def replicated():
    """True where the sums of a step are all-reduced over replicas (``sum_over_replicas``)."""
    return False


def assigns_in_branches():
    """True where a traced ``ops.cond`` branch may assign variables: not where a step is
    a pure function (JAX)."""
    return False


def checked(values, needed, stats, name):
    """``values``, with runtime checks of ``stats`` where the backend raises from a graph."""
    del needed, stats, name
    return values


def initialized_by_call(state, update):
    """Whether the call that returned ``update`` initialised ``state``, for a warning."""
    del state
    return update


def compiled_moments(x, axis, mask):
    """A compiled ``fn(x, mask)`` computing ``_ops.moments`` where that is faster, else None."""
    del x, axis, mask
    return None
