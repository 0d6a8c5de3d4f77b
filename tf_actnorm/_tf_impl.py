"""ActNorm on the TensorFlow backend: the layer's side of ``_math``, ``_stats`` and
``_state`` (see ``_backend`` for why this path is separate)."""

import tensorflow as tf

from tf_actnorm import _math
from tf_actnorm import _ops
from tf_actnorm import _state
from tf_actnorm import _stats

forward = _math.forward
inverse = _math.inverse
# Written once in `keras.ops` for every backend (dynamic shapes and masks included).
log_det = _ops.log_det
run_if = _ops.run_if


def moments(x, axis, mask=None):
    """Per-channel ``(count, mean, m2)`` of ``x`` (see ``_stats.moments``); eager
    tensors outside a strategy in one traced call (``_stats.eager_moments``)."""
    if tf.executing_eagerly() and _stats.replica_context() is None:
        return tuple(_stats.eager_moments(x, axis, mask))
    return tuple(_stats.moments(x, axis, mask))


def state(layer):
    """An :class:`~tf_actnorm._state.ActNormState` over the layer's variables."""
    # The raw tf.Variables (distributed ones under a strategy), read on each use: a
    # layer built while Keras traces a parent layer that has no `build` (a stateless
    # scope) gets its variables only after that trace.
    return _state.ActNormState(
        layer.initial_bias.value, layer.initial_log_scale.value, layer.initialized.value,
        layer.axis, layer.epsilon, layer.name,
        residuals=(layer.bias_residual.value, layer.log_scale_residual.value))


def maybe_initialize(layer, inputs, mask, training):
    """Initialise unless initialised. Returns whether this call initialised: eagerly a
    bool tensor; while tracing a Python bool, True unless the layer is initialised now
    (the flag's value read outside the trace), i.e. whether the traced call may."""
    flag = layer._state.maybe_initialize(inputs, mask, enabled=training)
    if tf.executing_eagerly():
        return flag
    return not _state.stored_flag(layer.initialized.value)


def exporting():
    """False: on TensorFlow, writing a SavedModel refuses an uninitialised layer
    (``ActNorm._trackable_children``), for every route that writes one."""
    return False
