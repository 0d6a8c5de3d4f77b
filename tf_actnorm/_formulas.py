"""ActNorm's formulas, written once against an array namespace ``xp``.

``xp`` is ``keras.ops`` (``_ops``: the Keras layer on every backend, the TFP bijector,
``tf_actnorm.initialize``), NumPy (moments combined on the host by ``initialize``), or
``tf_actnorm.torch.TORCH`` (plain PyTorch, for ``tf_actnorm.torch``). They provide
``sqrt``, ``maximum``, ``square``, ``log``, ``exp``, ``sum``, ``cast``, ``all``,
``isfinite`` and ``logical_and`` with NumPy's meaning. This module imports no backend.

The transform is ``y = s * (x + b)`` with ``s = exp(log_scale)``, computed as one
multiply-add on the big tensor, ``y = x * s + b * s``; its inverse is
``x = y * exp(-log_scale) - b``.

``tf_actnorm.torch.ActNorm`` keeps taming-transformers' parametrisation instead: it
trains the scale ``s`` itself (``loc`` = ``b``, ``scale`` = ``s``, any sign), so it
uses the ``scale_*`` variants below, which give ``s`` where the others give
``log_scale``, and ``log|s|`` in :func:`log_det`.
"""


def channel_shape(rank, axis):
    """Shape that broadcasts a [C] vector along ``axis`` of a rank-``rank`` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return shape


def forward_coefficients(xp, bias, log_scale):
    """``(scale, shift)`` with ``forward(x) = x * scale + shift``: ``(s, b * s)``."""
    scale = xp.exp(log_scale)
    return scale, bias * scale


def inverse_coefficients(xp, bias, log_scale):
    """``(scale, shift)`` with ``inverse(y) = y * scale + shift``: ``(1 / s, -b)``."""
    return xp.exp(-log_scale), -bias


def log_det(xp, log_scale, positions):
    """``positions * sum(log_scale)``: O(C), whatever the size of the input.

    ``positions`` is the number of elements that share one channel (a scalar, or
    one count per example when a mask is used).
    """
    total = xp.sum(log_scale)
    return xp.cast(positions, total.dtype) * total


def scale_forward_coefficients(bias, scale):
    """:func:`forward_coefficients` for a trained scale ``s`` (not its log): ``(s, b * s)``."""
    return scale, bias * scale


def scale_inverse_coefficients(bias, scale):
    """:func:`inverse_coefficients` for a trained scale ``s``: ``(1 / s, -b)``."""
    return 1.0 / scale, -bias


def stats_dtype(dtype):
    """The dtype (a name) that statistics of ``dtype`` data are computed in: float64 for
    float64 data, else float32, also for float16/bfloat16 (whose squares overflow)."""
    return "float64" if dtype == "float64" else "float32"


def mean(xp, count, total):
    """Per-channel mean from the count and the sum (0 where the count is 0)."""
    return total / xp.maximum(count, 1.0)


def variance(xp, count, m2, ddof=0):
    """Population variance (divide by the count), as ``tf.nn.moments`` gives.

    ``ddof=1`` gives the sample variance (divide by ``count - 1``, as ``torch.std``
    does by default), 0 rather than NaN for a single value.
    """
    if ddof:
        count = count - ddof
    return m2 / xp.maximum(count, 1.0)


def combine(xp, a, b):
    """Moments ``(count, mean, m2)`` of the union of two data sets from theirs (Chan et
    al.'s parallel update, exact). ``b`` passes unrounded when ``a`` is empty."""
    a_count, a_mean, a_m2 = a
    b_count, b_mean, b_m2 = b
    count = a_count + b_count
    weight = b_count / xp.maximum(count, 1.0)
    delta = b_mean - a_mean
    return count, a_mean + delta * weight, a_m2 + b_m2 + xp.square(delta) * a_count * weight


def is_valid(xp, count, mean_, m2):
    """True when moments can initialise: data in every channel, every statistic finite."""
    return xp.logical_and(
        xp.all(count > 0),
        xp.logical_and(xp.all(xp.isfinite(mean_)), xp.all(xp.isfinite(m2))))


def init_from_inputs(xp, mean_, variance_, epsilon):
    """Parameters that standardise data with these moments: ``b = -mean``, ``s = 1/(std+eps)``."""
    std = xp.sqrt(xp.maximum(variance_, 0.0))
    return -mean_, -xp.log(std + epsilon)


def init_from_outputs(xp, mean_, variance_, epsilon):
    """Parameters whose *inverse* standardises data with these moments:
    ``x = y/s - b = (y - mean)/(std+eps)``, so ``s = std+eps`` and ``b = mean/s``."""
    scale = xp.sqrt(xp.maximum(variance_, 0.0)) + epsilon
    return mean_ / scale, xp.log(scale)


def scale_init_from_inputs(xp, mean_, variance_, epsilon):
    """:func:`init_from_inputs` for a trained scale: ``b = -mean``, ``s = 1/(std+eps)``."""
    std = xp.sqrt(xp.maximum(variance_, 0.0))
    return -mean_, 1.0 / (std + epsilon)


def scale_init_from_outputs(xp, mean_, variance_, epsilon):
    """:func:`init_from_outputs` for a trained scale: ``s = std+eps``, ``b = mean/s``."""
    scale = xp.sqrt(xp.maximum(variance_, 0.0)) + epsilon
    return mean_ / scale, scale
