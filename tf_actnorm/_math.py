"""The ActNorm transform, in one place.

Forward ``y = s * (x + b)``, inverse ``x = y / s - b`` and
``log|det dy/dx| = positions * sum_c log s_c``, with ``s = exp(log_scale)``.
The layer and the bijector both call these functions; neither re-derives them.
All functions take C-sized ``bias`` / ``log_scale`` and an input whose channel
axis is ``axis``.
"""

import tensorflow as tf


def channel_shape(rank, axis):
    """Shape that broadcasts a [C] vector along ``axis`` of a rank-``rank`` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return shape


def _broadcast(vector, like, axis):
    return tf.reshape(tf.cast(vector, like.dtype), channel_shape(like.shape.rank, axis))


def forward(x, bias, log_scale, axis):
    """``s * (x + b)`` as one multiply-add on the big tensor: ``x * s + (b * s)``."""
    scale = tf.exp(log_scale)
    return x * _broadcast(scale, x, axis) + _broadcast(bias * scale, x, axis)


def inverse(y, bias, log_scale, axis):
    """``y / s - b``, as ``y * exp(-log s) - b``."""
    return y * _broadcast(tf.exp(-log_scale), y, axis) - _broadcast(bias, y, axis)


def log_det(log_scale, positions):
    """``positions * sum(log_scale)``: O(C), whatever the size of the input.

    ``positions`` is the number of elements that share one channel (a scalar, or
    one count per example when a mask is used).
    """
    total = tf.reduce_sum(log_scale)
    return tf.cast(positions, total.dtype) * total


def positions_per_example(x, axis):
    """Number of elements of one example of ``x`` that share a channel: the product of
    the dimensions other than the batch axis (0) and ``axis``; dynamic shapes allowed."""
    rank = x.shape.rank
    axis = axis % rank
    dynamic = tf.shape(x, out_type=tf.int64)
    dims = [dynamic[i] for i in range(1, rank) if i != axis]
    return tf.reduce_prod(tf.stack(dims)) if dims else tf.constant(1, tf.int64)


def init_from_inputs(mean, variance, epsilon):
    """Parameters that standardise data with these moments: ``b = -mean``, ``s = 1/(std+eps)``."""
    std = tf.sqrt(tf.maximum(variance, 0.0))
    return -mean, -tf.math.log(std + epsilon)


def init_from_outputs(mean, variance, epsilon):
    """Parameters whose *inverse* standardises data with these moments:
    ``x = y/s - b = (y - mean)/(std+eps)``, so ``s = std+eps`` and ``b = mean/s``."""
    scale = tf.sqrt(tf.maximum(variance, 0.0)) + epsilon
    return mean / scale, tf.math.log(scale)
