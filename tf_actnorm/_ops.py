"""ActNorm in ``keras.ops`` only (no TensorFlow): the implementation on the JAX and
PyTorch backends, and what the TensorFlow backend shares with them (``log_det``,
``run_if``).

The init guard is functional, so that it works where ``fit`` is a pure function
(JAX's ``stateless_call`` under ``jax.jit``):

* ``ops.cond(needed, init, keep)`` computes the moments only while uninitialised
  (``lax.cond`` runs one branch); once initialised only the flag is read.
* Initialisation writes only non-trainable variables (``initial_bias``,
  ``initial_log_scale``, ``initialized``): Keras returns their new values from
  ``stateless_call`` and drops assignments to trainable ones (see ``tf_actnorm.layer``).
* Under ``keras.distribution.DataParallel`` the sums over the batch axis inside the
  jitted step are over the global batch (JAX shards the batch, XLA all-reduces), so
  the statistics are the global batch's with nothing extra here.
* Bad data (empty batch, NaN/Inf) leaves every variable unchanged (``ops.where``); an
  eager call also raises ``ValueError`` naming the layer. Nothing can raise from
  inside ``jax.jit`` (as under XLA on TensorFlow).
"""

import math
import sys
import warnings

import keras
from keras import ops

from tf_actnorm import _checks
from tf_actnorm import _formulas


def _affine(x, scale, shift, axis):
    shape = _formulas.channel_shape(len(x.shape), axis)
    return (x * ops.reshape(ops.cast(scale, x.dtype), shape)
            + ops.reshape(ops.cast(shift, x.dtype), shape))


def forward(x, bias, log_scale, axis):
    """``s * (x + b)`` as one multiply-add on the big tensor: ``x * s + (b * s)``."""
    return _affine(x, *_formulas.forward_coefficients(ops, bias, log_scale), axis)


def inverse(y, bias, log_scale, axis):
    """``y / s - b``, as ``y * exp(-log s) + (-b)``."""
    return _affine(y, *_formulas.inverse_coefficients(ops, bias, log_scale), axis)


def log_det(log_scale, inputs, mask, axis):
    """Per-example ``log|det dy/dx|`` (``inputs`` only gives its shape)."""
    if mask is None:
        shape = ops.shape(inputs)
        rank = len(shape)
        positions = 1
        for i in range(1, rank):
            if i != axis % rank:
                positions *= shape[i]
        positions = ops.full((shape[0],), positions, dtype="int32")
    else:
        mask = ops.cast(mask, "int32")
        if len(mask.shape) > 1:
            mask = ops.sum(mask, axis=tuple(range(1, len(mask.shape))))
        positions = mask
    return _formulas.log_det(ops, log_scale, positions)


def moments(x, axis, mask=None):
    """Per-channel ``(count, mean, m2)`` of ``x`` over every axis but ``axis``.

    Two passes (the mean, then squared deviations about it) in float32 (float64 for
    float64 inputs), as ``_stats.moments``; ``mask`` (``x``'s shape without the
    channel axis) selects the positions that count.
    """
    rank = len(x.shape)
    axis = axis % rank
    x = ops.cast(x, _formulas.stats_dtype(keras.backend.standardize_dtype(x.dtype)))
    reduce = tuple(i for i in range(rank) if i != axis)
    if mask is None:
        weights = None
        count = ops.full((x.shape[axis],), math.prod(x.shape[i] for i in reduce), x.dtype)
        total = ops.sum(x, axis=reduce)
    else:
        weights = ops.cast(mask, x.dtype)
        while len(weights.shape) < rank:
            weights = ops.expand_dims(weights, axis)
        weights = ops.broadcast_to(weights, ops.shape(x))
        count = ops.sum(weights, axis=reduce)
        total = ops.sum(weights * x, axis=reduce)
    mean = _formulas.mean(ops, count, total)
    deviations = ops.square(x - ops.reshape(mean, _formulas.channel_shape(rank, axis)))
    if weights is not None:
        deviations = deviations * weights
    return count, mean, ops.sum(deviations, axis=reduce)


def _is_traced(tensor):
    if keras.backend.backend() != "jax":
        return False
    import jax  # noqa: PLC0415 (only on the JAX backend)

    return isinstance(tensor, jax.core.Tracer)


def exporting():
    """True while an export for serving traces the layer: ``model.export`` on JAX
    (``tf_saved_model`` and ``onnx`` convert through ``jax2tf``, so the layer runs inside
    a TensorFlow function) and PyTorch's TorchScript ONNX exporter."""
    if keras.backend.backend() == "jax":
        tf = sys.modules.get("tensorflow")  # a TensorFlow trace implies it is imported
        return tf is not None and tf.inside_function()
    import torch  # noqa: PLC0415 (the torch backend)

    return torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling()


def initialized_outside_trace(layer):
    """The flag's stored value (not a traced one), read without tracing anything."""
    with keras.StatelessScope():  # no state mapping: reads the variable itself
        value = layer.initialized.value
    if keras.backend.backend() == "torch":
        import torch  # noqa: PLC0415

        with warnings.catch_warnings():
            # The value is read for this check only and enters no traced graph.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return bool(value.detach().cpu().numpy())
    return bool(ops.convert_to_numpy(value))


def run_if(condition, fn):
    """Call ``fn()`` (a Python side effect) if the bool tensor ``condition`` is true: now
    when it is concrete, else from a host callback when the traced step runs with it true."""
    if not _is_traced(condition):
        if bool(condition):
            fn()
        return
    import jax  # noqa: PLC0415 (only JAX traces here)

    jax.lax.cond(condition, lambda: jax.debug.callback(fn), lambda: None)


def maybe_initialize(layer, inputs, mask, training):
    """Initialise ``layer`` from ``inputs`` unless it is initialised (see the module doc).
    Returns a bool tensor: whether this call initialised it."""
    initialized = ops.convert_to_tensor(layer.initialized)
    needed = ops.logical_not(initialized)
    if training is not True:
        needed = ops.logical_and(needed, ops.cast(training, "bool"))
    variables = (layer.initial_bias, layer.initial_log_scale)
    old = tuple(ops.convert_to_tensor(v) for v in variables)
    # No gradient flows through initialisation, as on TensorFlow (where the variables
    # are read after the assignment): the initial values are constants to autodiff.
    # That also keeps the guard out of the backward pass, which would otherwise add a
    # transposed cond and an input-sized zero gradient to every train step.
    data = ops.stop_gradient(inputs)
    residuals = (ops.stop_gradient(ops.convert_to_tensor(layer.bias_residual)),
                 ops.stop_gradient(ops.convert_to_tensor(layer.log_scale_residual)))

    def init():
        count, mean, m2 = moments(data, layer.axis, mask)
        valid = _formulas.is_valid(ops, count, mean, m2)
        values = _formulas.init_from_inputs(
            ops, mean, _formulas.variance(ops, count, m2), layer.epsilon)
        # The parameters are initial + residual: the residuals (trainable, which JAX's
        # fit cannot assign) stay as they are, so `initial = value - residual`.
        new = tuple(ops.where(valid, ops.cast(v, o.dtype) - r, o)
                    for v, o, r in zip(values, old, residuals))
        return (*new, valid, ops.all(count > 0))

    def keep():
        false = ops.convert_to_tensor(False)
        return (*old, false, false)

    bias, log_scale, valid, has_data = ops.cond(needed, init, keep)
    variables[0].assign(bias)
    variables[1].assign(log_scale)
    layer.initialized.assign(ops.logical_or(initialized, valid))
    if not _is_traced(needed) and bool(needed) and not bool(valid):
        # Eager: nothing was assigned (`valid` is False); say why.
        raise ValueError(_checks.cannot_initialise(layer.name, bool(has_data)))
    return valid
