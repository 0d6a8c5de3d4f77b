"""The ActNorm transform, in one place.

Forward ``y = s * (x + b)``, inverse ``x = y / s - b`` and
``log|det dy/dx| = positions * sum_c log s_c``, with ``s = exp(log_scale)``.
The bijector and the layer on TensorFlow call these functions (the layer's log-det is
the ``keras.ops`` one of every backend); neither re-derives them.
All functions take C-sized ``bias`` / ``log_scale`` and an input whose channel
axis is ``axis``. This is the TensorFlow implementation (the TensorFlow Keras backend
and the TFP bijector); the formulas themselves live in ``_formulas``, shared with the
``keras.ops`` implementation of the other backends (``_ops``).
"""

import tensorflow as tf

from tf_actnorm import _formulas
from tf_actnorm import _stats

def _broadcast(vector, like, axis):
    vector = tf.cast(vector, like.dtype)
    rank = like.shape.rank
    if axis % rank == rank - 1:
        return vector  # a [C] vector already broadcasts along the last axis
    return tf.reshape(vector, _formulas.channel_shape(rank, axis))


def forward(x, bias, log_scale, axis):
    """``s * (x + b)`` as one multiply-add on the big tensor: ``x * s + (b * s)``.

    Its gradient is computed from the output ``y``, never from ``x`` (see
    :func:`_affine`): ``dL/dx = s * dy``, ``dL/db = s * sum(dy)``,
    ``dL/dlog_scale = sum(dy * y)``.
    """
    return _affine(x, bias, log_scale, axis, inverse=False)


def inverse(y, bias, log_scale, axis):
    """``y / s - b``, as the multiply-add ``y * exp(-log s) + (-b)``.

    Its gradient is computed from the output ``x``, never from ``y``:
    ``dL/dy = dx / s``, ``dL/db = -sum(dx)``, ``dL/dlog_scale = -sum(dx * (x + b))``.
    """
    return _affine(y, bias, log_scale, axis, inverse=True)


def _affine(t, bias, log_scale, axis, inverse):
    """The transform and a gradient that keeps no activation of its own for backprop.

    A train step keeps, from the forward pass to the backward pass, every tensor that
    the backward pass reads. Autodiff of ``x * s + c`` (or a custom gradient written
    from ``x``) reads the input ``x``; this gradient reads only the output, which the
    next layer (a convolution, a 1x1 convolution, a coupling network) keeps anyway for
    its own weight gradient. So ActNorm adds no saved activation to a train step.

    Forward (``y = s * (x + b)``, ``s = exp(l)``): ``dy/dl = s * (x + b) = y`` and
    ``dy/db = s``. Inverse (``x = y / s - b``): ``dx/dl = -y / s = -(x + b)`` and
    ``dx/db = -1``. The per-channel sums, the only reductions of the backward pass,
    are :func:`channel_grads`'s.
    """
    # Variables are read here, once; the custom gradient gets tensors.
    bias = tf.convert_to_tensor(bias)
    log_scale = tf.convert_to_tensor(log_scale)

    @tf.custom_gradient
    def _transform(t, bias, log_scale):
        coefficients = _formulas.inverse_coefficients if inverse else _formulas.forward_coefficients
        scale, shift = coefficients(_stats.TF, bias, log_scale)
        out = t * _broadcast(scale, t, axis) + _broadcast(shift, t, axis)

        def grad(d_out):
            # Forward: sum(dy * y); inverse: sum(dx * (x + b)), the centre being -b.
            center = -bias if inverse else None
            d_t, d_scaled, d_sum = channel_grads(d_out, out, scale, center, axis)
            d_sum = tf.cast(d_sum, bias.dtype)
            d_scaled = tf.cast(d_scaled, log_scale.dtype)
            if inverse:
                return d_t, -d_sum, -d_scaled
            return d_t, scale * d_sum, d_scaled

        return out, grad

    return _transform(tf.convert_to_tensor(t), bias, log_scale)


def channel_grads(d_out, out, scale, center, axis):
    """``(d_out * scale, sum(d_out * (out - center)), sum(d_out))``, the sums per channel.

    ``scale`` and ``center`` are [C] vectors (``center`` may be ``None``: zero). The
    backward pass of :func:`forward` and :func:`inverse` in one place; the sums are
    :func:`tf_actnorm._stats.channel_sum`'s.
    """
    centered = out if center is None else out - _broadcast(center, out, axis)
    return (d_out * _broadcast(scale, d_out, axis),
            _stats.channel_sum(d_out * centered, axis),
            _stats.channel_sum(d_out, axis))


def log_det(log_scale, positions):
    """``positions * sum(log_scale)``: O(C), whatever the size of the input.

    ``positions`` is the number of elements that share one channel (a scalar, or
    one count per example when a mask is used).
    """
    return _formulas.log_det(_stats.TF, log_scale, positions)


def init_from_inputs(mean, variance, epsilon):
    """Parameters that standardise data with these moments (see ``_formulas``)."""
    return _formulas.init_from_inputs(_stats.TF, mean, variance, epsilon)


def init_from_outputs(mean, variance, epsilon):
    """Parameters whose *inverse* standardises data with these moments (see ``_formulas``)."""
    return _formulas.init_from_outputs(_stats.TF, mean, variance, epsilon)
