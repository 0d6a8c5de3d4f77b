"""What ActNorm does its own way on JAX (see ``_backend``)."""

import sys

import jax
import keras
from keras import ops

from tf_actnorm._backend import channel_sum  # noqa: F401 (the plain keras.ops ones)
from tf_actnorm._backend import checked  # noqa: F401
from tf_actnorm._backend import compiled_moments  # noqa: F401
from tf_actnorm._backend import initialized_by_call  # noqa: F401
from tf_actnorm._backend import assigns_in_branches  # noqa: F401
from tf_actnorm._backend import replicated  # noqa: F401
from tf_actnorm._backend import sum_over_replicas  # noqa: F401

# Autodiff: an output-based `custom_vjp` measured slower in the train step (XLA
# schedules the plain multiply-add's backward pass as well; docs/benchmarks.md).
OUTPUT_GRADIENT = False


def is_traced(tensor):
    """True for a value being traced by ``jax.jit`` (its value is not known now)."""
    return isinstance(tensor, jax.core.Tracer)


def exporting():
    """True while ``model.export`` traces the layer: ``tf_saved_model`` and ``onnx``
    convert through ``jax2tf``, so the layer runs inside a TensorFlow function."""
    tf = sys.modules.get("tensorflow")  # a TensorFlow trace implies it is imported
    return tf is not None and tf.inside_function()


serving = exporting


def stored_flag(variable):
    """The stored value of a bool variable, read without tracing anything."""
    with keras.StatelessScope():  # no state mapping: reads the variable itself
        value = variable.value
    return bool(ops.convert_to_numpy(value))


def run_if(condition, fn):
    """Call ``fn()`` (a Python side effect) if the bool ``condition`` is true: now when it
    is concrete, else from a host callback when the traced step runs with it true."""
    if not is_traced(condition):
        if bool(condition):
            fn()
        return
    jax.lax.cond(condition, lambda: jax.debug.callback(fn), lambda: None)
