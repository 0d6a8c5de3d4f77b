"""The ActNorm transform, in one place.

Forward ``y = s * (x + b)``, inverse ``x = y / s - b`` and
``log|det dy/dx| = positions * sum_c log s_c``, with ``s = exp(log_scale)``.
The layer and the bijector both call these functions; neither re-derives them.
All functions take C-sized ``bias`` / ``log_scale`` and an input whose channel
axis is ``axis``. This is the TensorFlow implementation (the TensorFlow Keras backend
and the TFP bijector); the formulas themselves live in ``_formulas``, shared with the
``keras.ops`` implementation of the other backends (``_ops``).
"""

import types

import tensorflow as tf

from tf_actnorm import _formulas
from tf_actnorm import _stats

# TensorFlow as the array namespace of `_formulas`.
TF = types.SimpleNamespace(
    sqrt=tf.sqrt, maximum=tf.maximum, log=tf.math.log, exp=tf.exp, sum=tf.reduce_sum,
    cast=tf.cast, all=tf.reduce_all, isfinite=tf.math.is_finite, logical_and=tf.logical_and)


def channel_shape(rank, axis):
    """Shape that broadcasts a [C] vector along ``axis`` of a rank-``rank`` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return shape


def _broadcast(vector, like, axis):
    return tf.reshape(tf.cast(vector, like.dtype), channel_shape(like.shape.rank, axis))


def scale_shift(x, scale, shift, axis):
    """``x * scale + shift`` for channel-shaped ``scale``/``shift``: the only op on the
    big tensor, forward and inverse.

    Its gradient is TensorFlow's for these two ops (``dy * scale`` and the per-channel
    sums of ``dy * x`` and ``dy``), with the per-channel sums taken by
    :func:`tf_actnorm._stats.channel_sum`: on CPU the reductions that autodiff would
    emit dominate the backward pass (20-30x slower than the multiply-add under XLA).
    """

    @tf.custom_gradient
    def _scale_shift(x, scale, shift):
        def grad(dy):
            def sum_to(t, like):
                return tf.reshape(_stats.channel_sum(t, axis), tf.shape(like))

            return dy * scale, sum_to(dy * x, scale), sum_to(dy, shift)

        return x * scale + shift, grad

    # Tensors, not variables: a variable read inside a custom gradient needs more plumbing.
    return _scale_shift(tf.convert_to_tensor(x), scale, shift)


def forward(x, bias, log_scale, axis):
    """``s * (x + b)`` as one multiply-add on the big tensor: ``x * s + (b * s)``."""
    scale, shift = _formulas.forward_coefficients(TF, bias, log_scale)
    return scale_shift(x, _broadcast(scale, x, axis), _broadcast(shift, x, axis), axis)


def inverse(y, bias, log_scale, axis):
    """``y / s - b``, as ``y * exp(-log s) + (-b)``."""
    scale, shift = _formulas.inverse_coefficients(TF, bias, log_scale)
    return scale_shift(y, _broadcast(scale, y, axis), _broadcast(shift, y, axis), axis)


def log_det(log_scale, positions):
    """``positions * sum(log_scale)``: O(C), whatever the size of the input.

    ``positions`` is the number of elements that share one channel (a scalar, or
    one count per example when a mask is used).
    """
    return _formulas.log_det(TF, log_scale, positions)


def positions_per_example(x, axis):
    """Number of elements of one example of ``x`` that share a channel: the product of
    the dimensions other than the batch axis (0) and ``axis``; dynamic shapes allowed."""
    rank = x.shape.rank
    axis = axis % rank
    dynamic = tf.shape(x, out_type=tf.int64)
    dims = [dynamic[i] for i in range(1, rank) if i != axis]
    return tf.reduce_prod(tf.stack(dims)) if dims else tf.constant(1, tf.int64)


def init_from_inputs(mean, variance, epsilon):
    """Parameters that standardise data with these moments (see ``_formulas``)."""
    return _formulas.init_from_inputs(TF, mean, variance, epsilon)


def init_from_outputs(mean, variance, epsilon):
    """Parameters whose *inverse* standardises data with these moments (see ``_formulas``)."""
    return _formulas.init_from_outputs(TF, mean, variance, epsilon)
