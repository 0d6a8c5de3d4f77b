"""ActNorm in ``keras.ops``: the one implementation of the transform, its gradient, the
initial statistics and the init-once guard, for the Keras layer on every backend and for
the TFP bijector (whose tensors are TensorFlow's: it needs the TensorFlow Keras backend).

What a backend must do its own way lives in its module, chosen once (``_backend``):
TensorFlow's ``tf.distribute`` all-reduces, its runtime assertions and its CPU channel
sums; JAX's host callbacks; how each reads a variable outside a trace and knows that an
export is tracing.

The guard, and why it is built this way:

* Once initialised only the flag is read: the statistics are computed inside
  ``ops.cond(needed, ...)`` (``lax.cond`` and ``tf.cond`` run one branch).
* Where a branch may assign variables (TensorFlow outside a strategy's replica
  context), one branch holds the statistics and the assignments.
* Where it may not, the branch returns the moments and the new values are selected with
  ``ops.where`` and assigned after it: JAX's ``fit`` is a pure function
  (``stateless_call`` under ``jax.jit``), and TensorFlow refuses ``merge_call`` (mirrored
  assignments, all-reduces) inside a branch, so under a ``tf.distribute`` strategy each
  pass of the statistics is gated on its own, with the all-reduces between them.
* Initialisation assigns only non-trainable variables (``initial_bias``,
  ``initial_log_scale``, ``initialized``): Keras returns their new values from
  ``stateless_call`` and drops assignments to trainable ones (see ``tf_actnorm.layer``).
* Bad data (an empty batch, NaN/Inf) selects the old values: state never changes. An
  eager call raises ``ValueError`` naming the owner, a TensorFlow graph an
  ``InvalidArgumentError`` with the same message; nothing can raise under XLA or
  ``jax.jit``, where the next batch initialises instead.
"""

import collections
import math

import keras
from keras import ops

from tf_actnorm import _backend
from tf_actnorm import _checks
from tf_actnorm import _formulas

Moments = collections.namedtuple("Moments", ["count", "mean", "m2"])
Moments.__doc__ = """Per-channel count, mean and sum of squared deviations (``m2``)."""


def _broadcast(vector, like, axis):
    """A [C] vector cast to ``like``'s dtype, broadcasting along ``axis`` of ``like``."""
    vector = ops.cast(vector, like.dtype)
    rank = len(like.shape)
    if axis % rank == rank - 1:
        return vector  # a [C] vector already broadcasts along the last axis
    return ops.reshape(vector, _formulas.channel_shape(rank, axis))


def forward(x, bias, log_scale, axis):
    """``s * (x + b)`` as one multiply-add on the big tensor: ``x * s + (b * s)``.

    Where the backend takes it (``_backend``), its gradient is computed from the output
    ``y``, never from ``x`` (see :func:`_affine`): ``dL/dx = s * dy``,
    ``dL/db = s * sum(dy)``, ``dL/dlog_scale = sum(dy * y)``.
    """
    return _affine(x, bias, log_scale, axis, inverse=False)


def inverse(y, bias, log_scale, axis):
    """``y / s - b``, as the multiply-add ``y * exp(-log s) + (-b)``.

    With the output gradient: ``dL/dy = dx / s``, ``dL/db = -sum(dx)``,
    ``dL/dlog_scale = -sum(dx * (x + b))``.
    """
    return _affine(y, bias, log_scale, axis, inverse=True)


def _affine(t, bias, log_scale, axis, inverse):
    """The transform, and where the backend takes it a gradient that keeps no activation
    of its own for backprop.

    A train step keeps, from the forward pass to the backward pass, every tensor that
    the backward pass reads. Autodiff of ``x * s + c`` reads the input ``x``; this
    gradient reads only the output, which the next layer (a convolution, a coupling
    network) keeps anyway for its own weight gradient. Forward (``y = s * (x + b)``):
    ``dy/dl = s * (x + b) = y``, ``dy/db = s``. Inverse (``x = y / s - b``):
    ``dx/dl = -(x + b)``, ``dx/db = -1``. The per-channel sums, the only reductions of
    the backward pass, are :func:`channel_grads`'s.
    """
    coefficients = _formulas.inverse_coefficients if inverse else _formulas.forward_coefficients
    # The parameters enter the custom gradient as its arguments (a variable among them
    # needs no `variables=` in TensorFlow's `grad`).
    bias = ops.convert_to_tensor(bias)
    log_scale = ops.convert_to_tensor(log_scale)
    t = ops.convert_to_tensor(t)
    if not _backend.kernels().OUTPUT_GRADIENT:
        scale, shift = coefficients(ops, bias, log_scale)
        return t * _broadcast(scale, t, axis) + _broadcast(shift, t, axis)

    @ops.custom_gradient
    def transform(t, bias, log_scale):
        scale, shift = coefficients(ops, bias, log_scale)
        out = t * _broadcast(scale, t, axis) + _broadcast(shift, t, axis)

        def grad(*args, upstream=None):
            d_out = args[0] if upstream is None else upstream
            # Forward: sum(dy * y); inverse: sum(dx * (x + b)), the centre being -b.
            center = -bias if inverse else None
            d_t, d_scaled, d_sum = channel_grads(d_out, out, scale, center, axis)
            d_sum = ops.cast(d_sum, bias.dtype)
            d_scaled = ops.cast(d_scaled, log_scale.dtype)
            if inverse:
                return d_t, -d_sum, -d_scaled
            return d_t, scale * d_sum, d_scaled

        return out, grad

    return transform(t, bias, log_scale)


def channel_grads(d_out, out, scale, center, axis):
    """``(d_out * scale, sum(d_out * (out - center)), sum(d_out))``, the sums per channel.

    ``scale`` and ``center`` are [C] vectors (``center`` may be ``None``: zero); the
    backward pass of :func:`forward` and :func:`inverse` in one place.
    """
    channel_sum = _backend.kernels().channel_sum
    centered = out if center is None else out - _broadcast(center, out, axis)
    return (d_out * _broadcast(scale, d_out, axis),
            channel_sum(d_out * centered, axis),
            channel_sum(d_out, axis))


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


def moments(x, axis, mask=None, gate=None):
    """Global per-channel :class:`Moments` of ``x`` over every axis but ``axis``.

    Exact and robust: two passes (the mean, then the squared deviations about it), so a
    large offset does not cancel the variance away, in float32 (float64 for float64
    inputs) even for float16/bfloat16 data. ``mask`` (``x``'s shape without the channel
    axis) selects the positions that count. Under a ``tf.distribute`` strategy the count
    and sum are all-reduced first, then the squared deviations about the global mean, so
    the result is exact for unequal (even empty) per-replica batches; under
    ``keras.distribution.DataParallel`` the sums inside ``jax.jit`` are the global
    batch's already. ``gate`` (a scalar bool tensor) skips the work, giving zeros; when
    the sums are all-reduced, each pass is gated on its own, keeping the all-reduces
    outside control flow.
    """
    kernels = _backend.kernels()
    if gate is None:
        compiled = kernels.compiled_moments(x, axis, mask)
        if compiled is not None:
            return Moments(*compiled(x, mask))
    elif not kernels.replicated():
        zeros = ops.zeros((ops.shape(x)[axis],), _stats_dtype(x.dtype))
        return Moments(*ops.cond(gate, lambda: tuple(moments(x, axis, mask)),
                                 lambda: (zeros, zeros, zeros)))
    rank = len(x.shape)
    axis = axis % rank
    x = ops.cast(x, _stats_dtype(x.dtype))
    shape = ops.shape(x)
    weights = None
    if mask is not None:
        weights = ops.cast(mask, x.dtype)
        while len(weights.shape) < rank:
            weights = ops.expand_dims(weights, axis)

    def gated(fn, outputs):
        if gate is None:
            return fn()
        # The skipped branch builds its zeros from the channel count, not from `fn()`,
        # whose reductions would then still run.
        zeros = ops.zeros((shape[axis],), x.dtype)
        return ops.cond(gate, fn, lambda: zeros if outputs == 1 else (zeros,) * outputs)

    def first_pass():
        if weights is None:
            static = math.prod(d for i, d in enumerate(shape) if i != axis and isinstance(d, int))
            positions = ops.convert_to_tensor(static, x.dtype)
            for i, d in enumerate(shape):
                if i != axis and not isinstance(d, int):  # a dimension known when it runs
                    positions = positions * ops.cast(d, x.dtype)
            return ops.full((shape[axis],), positions, x.dtype), kernels.channel_sum(x, axis)
        # `broadcast_to`, not `weights * ones_like(x)`: TensorFlow's Grappler rewrites that
        # product as a tile and, for an empty batch of static shape, divides by its zero
        # size (the process dies with SIGFPE, TensorFlow 2.21).
        return (kernels.channel_sum(ops.broadcast_to(weights, shape), axis),
                kernels.channel_sum(weights * x, axis))

    count, total = kernels.sum_over_replicas(list(gated(first_pass, 2)))
    mean = _formulas.mean(ops, count, total)

    def second_pass():
        deviations = ops.square(x - _broadcast(mean, x, axis))
        if weights is not None:
            deviations = deviations * weights
        return kernels.channel_sum(deviations, axis)

    (m2,) = kernels.sum_over_replicas([gated(second_pass, 1)])
    return Moments(count, mean, m2)


def _stats_dtype(dtype):
    return _formulas.stats_dtype(keras.backend.standardize_dtype(dtype))


def combine(a, b):
    """Moments of the union of two data sets (Chan et al.'s parallel update, exact)."""
    return Moments(*_formulas.combine(ops, a, b))


def zero_moments(channels, dtype):
    """The moments of no data: what :func:`combine` starts from."""
    zeros = ops.zeros((channels,), _stats_dtype(dtype))
    return Moments(zeros, zeros, zeros)


class State:
    """ActNorm's variables and its once-only, data-dependent initialisation.

    ``initial_bias``, ``initial_log_scale`` (shape [C]) and the scalar bool
    ``initialized``: variables of the Keras backend (the layer's), or ``tf.Variable``
    objects (a bijector's, or a layer's shared with its bijector), so that several owners
    can share them. Initialisation assigns the first two. With ``residuals`` (a pair of
    trainable variables, the Keras layer's layout, see ``tf_actnorm.layer``) the
    parameters are ``initial_bias + residuals[0]`` and ``initial_log_scale +
    residuals[1]``: initialisation then assigns ``value - residual`` and never writes
    the residuals.
    """

    def __init__(self, bias, log_scale, initialized, axis, epsilon, name, residuals=None):
        self.initial_bias = bias
        self.initial_log_scale = log_scale
        self.residuals = residuals
        self.initialized = initialized
        self.axis = axis
        self.epsilon = epsilon
        self.name = name
        # A bijector made from a layer asks the layer: a frozen layer never initialises.
        self.can_initialize = lambda: True

    @classmethod
    def of_layer(cls, layer, variable=lambda v: v):
        """The state of a built ``ActNorm`` layer, each variable passed through ``variable``
        (the bijector takes the TensorFlow variables under the layer's)."""
        return cls(variable(layer.initial_bias), variable(layer.initial_log_scale),
                   variable(layer.initialized), layer.axis, layer.epsilon, layer.name,
                   residuals=(variable(layer.bias_residual), variable(layer.log_scale_residual)))

    @property
    def bias(self):
        """The bias in use: a variable, or (with residuals) a tensor read now."""
        if self.residuals is None:
            return self.initial_bias
        return ops.convert_to_tensor(self.initial_bias) + ops.convert_to_tensor(self.residuals[0])

    @property
    def log_scale(self):
        """The log-scale in use: a variable, or (with residuals) a tensor read now."""
        if self.residuals is None:
            return self.initial_log_scale
        return (ops.convert_to_tensor(self.initial_log_scale)
                + ops.convert_to_tensor(self.residuals[1]))

    def maybe_initialize(self, data, mask=None, from_outputs=False, enabled=True):
        """Initialise from ``data`` unless already initialised (see the module doc).

        ``from_outputs=False``: ``data`` are inputs, and ``forward(data)`` is to be
        standardised. ``from_outputs=True``: ``data`` are outputs, and ``inverse(data)``
        is to be standardised. ``enabled`` (a bool or a scalar bool tensor, e.g. the
        training flag) gates initialisation. Returns a bool tensor: whether this call
        initialised.
        """
        kernels = _backend.kernels()
        if not self.can_initialize() or kernels.serving():
            # Functions traced for serving (a SavedModel being written, an export): no
            # init branch, no variable writes (TFLite and ONNX cannot convert them).
            return ops.convert_to_tensor(False)
        needed = ops.logical_not(ops.convert_to_tensor(self.initialized))
        if enabled is not True:
            needed = ops.logical_and(needed, ops.cast(enabled, "bool"))
        if not kernels.is_traced(needed) and not bool(needed):
            return needed  # eager and initialised: nothing to compute
        # No gradient flows through initialisation: the initial values are constants to
        # autodiff, which keeps the guard out of the backward pass.
        data = ops.stop_gradient(ops.convert_to_tensor(data))

        def initialize():
            return self.assign_from_moments(moments(data, self.axis, mask), from_outputs)

        if not kernels.is_traced(needed):  # eager, and `needed` is true
            return initialize()
        if kernels.assigns_in_branches():
            # One branch holds the statistics and the assignments: once initialised,
            # a step only reads the flag.
            return ops.cond(needed, initialize, lambda: ops.convert_to_tensor(False))
        return self.assign_from_moments(moments(data, self.axis, mask, gate=needed),
                                        from_outputs, needed)

    def assign_from_moments(self, stats, from_outputs=False, needed=True):
        """Assign the parameters that standardise data with moments ``stats`` where
        ``needed``; leave everything unchanged (and raise, outside XLA and ``jax.jit``)
        when they cannot initialise. Returns a bool tensor: whether it assigned."""
        kernels = _backend.kernels()
        count, mean, m2 = stats
        has_data = ops.all(count > 0)
        valid = _formulas.is_valid(ops, count, mean, m2)
        needed = ops.convert_to_tensor(needed)
        if not kernels.is_traced(valid) and bool(needed) and not bool(valid):
            raise ValueError(_checks.cannot_initialise(self.name, bool(has_data)))
        init = _formulas.init_from_outputs if from_outputs else _formulas.init_from_inputs
        values = init(ops, mean, _formulas.variance(ops, count, m2), self.epsilon)
        values = kernels.checked(values, needed, stats, self.name)
        update = ops.logical_and(valid, needed)
        variables = (self.initial_bias, self.initial_log_scale)
        for i, (variable, value) in enumerate(zip(variables, values)):
            old = ops.convert_to_tensor(variable)
            value = ops.cast(value, old.dtype)
            if self.residuals is not None:
                # The residuals stay as they are (JAX's fit cannot assign trainable
                # variables), so `initial = value - residual`.
                value = value - ops.stop_gradient(ops.convert_to_tensor(self.residuals[i]))
            variable.assign(ops.where(update, value, old))
        self.initialized.assign(
            ops.logical_or(ops.convert_to_tensor(self.initialized), update))
        return update

    def reset(self):
        """Re-arm: the next eligible call initialises again."""
        self.initialized.assign(False)

    def stored_initialized(self):
        """The flag's stored value, read outside any trace (False for a flag created in
        the TensorFlow function being traced: it holds no value until that runs)."""
        return _backend.kernels().stored_flag(self.initialized)

    def check_exportable(self):
        """Raise ``ValueError`` naming the owner if it was never initialised.

        Called when a model is exported for serving: an uninitialised ActNorm would serve
        an identity transform, or initialise (mutate) inside a served function.
        Checkpoints and ``.keras`` files are not affected: saving mid-training state is
        legitimate.
        """
        if not self.stored_initialized():
            raise _checks.never_initialised_for_export(self.name)
