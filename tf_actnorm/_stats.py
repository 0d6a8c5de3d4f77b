"""Per-channel moments for data-dependent initialisation.

Exact and robust: two passes (the mean, then the sum of squared deviations about
it) so a large offset does not cancel away the variance; accumulated in float32
(float64 for float64 inputs) even when the data is float16/bfloat16; reduced over
all replicas when called in a replica context of a ``tf.distribute`` strategy,
so every replica gets the statistics of the global batch, not an average of
per-replica ones.
"""

import collections
import functools
import types

import tensorflow as tf

from tf_actnorm import _checks
from tf_actnorm import _formulas

# TensorFlow as the array namespace of `_formulas`.
TF = types.SimpleNamespace(
    sqrt=tf.sqrt, maximum=tf.maximum, log=tf.math.log, exp=tf.exp, sum=tf.reduce_sum,
    cast=tf.cast, all=tf.reduce_all, isfinite=tf.math.is_finite, logical_and=tf.logical_and,
    square=tf.square)

Moments = collections.namedtuple("Moments", ["count", "mean", "m2"])
Moments.__doc__ = """Per-channel count, mean and sum of squared deviations (``m2``)."""


def stats_dtype(dtype):
    """:func:`tf_actnorm._formulas.stats_dtype` as a TensorFlow dtype."""
    return tf.as_dtype(_formulas.stats_dtype(tf.as_dtype(dtype).name))


def replica_context():
    """The replica context inside ``strategy.run`` of a ``tf.distribute`` strategy,
    else ``None`` (no strategy, or its cross-replica context). Any number of
    replicas: even with one, assigning a mirrored variable there goes through
    ``merge_call``, which ``tf.cond`` branches refuse."""
    if not tf.distribute.has_strategy():
        return None
    return tf.distribute.get_replica_context()


def _sum_over_replicas(values):
    ctx = replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return values
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)


def _weights(x, mask, axis):
    """Per-element weights (1 where valid), shaped like ``x`` minus the channel axis."""
    if mask is None:
        return None
    mask = tf.cast(mask, x.dtype)
    while mask.shape.rank < x.shape.rank:
        mask = tf.expand_dims(mask, axis)
    return mask


@functools.lru_cache(maxsize=None)
def _cpu_only():
    # Called only with tensors at hand, so once the runtime (and its logical devices,
    # which cannot change after that) is initialised.
    return all(d.device_type == "CPU" for d in tf.config.list_logical_devices())


def channel_sum(x, axis):
    """Sum of ``x`` over every axis but ``axis``, shape [C].

    Where TensorFlow sees no accelerator, as matrix-vector products with a vector of
    ones: XLA:CPU emits a reduction fused with its elementwise producer (``dy * y`` in
    ActNorm's backward pass) as its own slow loop, while a dot is a library call that
    streams its operands (measurements: docs/benchmarks.md). Multiplying by one rounds
    nothing; only the order of summation differs from ``tf.reduce_sum``. On GPUs/TPUs
    (whose matmuls may round their inputs, and whose reductions are fast) and for dtypes
    other than float32/float64, ``tf.reduce_sum``.
    """
    rank = x.shape.rank
    axis = axis % rank
    if x.dtype not in (tf.float32, tf.float64) or not _cpu_only():
        return tf.reduce_sum(x, [i for i in range(rank) if i != axis])
    shape = tf.shape(x)
    if axis == rank - 1:
        # [N, C] as k blocks [k, N/k, C]; ones[k, 1, N/k] @ blocks, then the [k, C] sum:
        # XLA:CPU runs a batch of k GEMVs faster than one.
        rows = x.shape[:-1].num_elements()
        k = next((k for k in (16, 8, 4, 2) if rows and rows % k == 0), 1)
        blocks = tf.reshape(x, [k, -1, shape[axis]])
        ones = tf.ones([k, 1, tf.shape(blocks)[1]], x.dtype)
        return tf.reduce_sum(tf.matmul(ones, blocks), [0, 1])
    # [outer * C, inner] @ ones[inner, 1], then the small [outer, C] sum.
    blocks = tf.reshape(x, [-1, tf.reduce_prod(shape[axis + 1:])])
    sums = tf.matmul(blocks, tf.ones([tf.shape(blocks)[1], 1], x.dtype))
    return tf.reduce_sum(tf.reshape(sums, [-1, shape[axis]]), 0)


def moments(x, axis, mask=None, gate=None):
    """Global per-channel :class:`Moments` of ``x`` over every axis but ``axis``.

    ``mask`` (optional, shape of ``x`` without the channel axis, or broadcastable to
    ``x``) selects the positions that count. Under a strategy the count and sum are
    all-reduced first, then the squared deviations about the global mean, so the
    result is exact for unequal (even empty) per-replica batches. ``gate`` (a scalar
    bool tensor) skips the per-replica work, contributing zeros, while keeping the
    all-reduces outside control flow (where ``merge_call`` is allowed).
    """
    axis = axis % x.shape.rank
    x = tf.cast(x, stats_dtype(x.dtype))
    weights = _weights(x, mask, axis)
    channels = tf.shape(x)[axis:axis + 1]

    def gated(fn, outputs):
        if gate is None:
            return fn()
        # The skipped branch builds its zeros from the channel count, not from `fn()`,
        # whose reductions would then still run.
        zeros = tf.zeros(channels, x.dtype)
        return tf.cond(gate, fn, lambda: zeros if outputs == 1 else (zeros,) * outputs)

    def first_pass():
        if weights is None:
            n = tf.cast(tf.size(x, out_type=tf.int64) // tf.cast(channels[0], tf.int64), x.dtype)
            return tf.fill(channels, n), channel_sum(x, axis)
        # `broadcast_to`, not `weights * ones_like(x)`: Grappler's arithmetic optimiser
        # rewrites that product as a tile and, for an empty batch of static shape,
        # divides by its zero size (the process dies with SIGFPE, TensorFlow 2.21).
        return (channel_sum(tf.broadcast_to(weights, tf.shape(x)), axis),
                channel_sum(weights * x, axis))

    count, total = _sum_over_replicas(list(gated(first_pass, 2)))
    mean = _formulas.mean(TF, count, total)

    def second_pass():
        deviations = tf.math.squared_difference(
            x, tf.reshape(mean, _formulas.channel_shape(x.shape.rank, axis)))
        if weights is not None:
            deviations *= weights
        return channel_sum(deviations, axis)

    m2 = _sum_over_replicas(gated(second_pass, 1))
    return Moments(count, mean, m2)


def eager_moments(x, axis, mask=None):
    """:func:`moments` of eager tensors, outside a strategy, as one call of a function
    traced once per rank, channel axis and mask rank (and dtypes), its shapes relaxed
    after the first: one op at a time, their dispatch costs more than the reductions."""
    rank = x.shape.rank
    traced = _traced_moments(rank, axis % rank, None if mask is None else mask.shape.rank)
    return Moments(*traced(x, mask))


@functools.lru_cache(maxsize=None)
def _traced_moments(rank, axis, mask_rank):
    del rank, mask_rank  # part of the cache key: a relaxed shape keeps its rank
    return tf.function(lambda x, mask: moments(x, axis, mask), reduce_retracing=True,
                       autograph=False)


def combine(a, b):
    """Moments of the union of two data sets (Chan et al.'s parallel update, exact)."""
    return Moments(*_formulas.combine(TF, a, b))


def variance(m):
    """Population variance (divide by the count), as ``tf.nn.moments`` gives."""
    return _formulas.variance(TF, m.count, m.m2)


def has_data(m):
    return tf.reduce_all(m.count > 0)


def _is_finite(m):
    return tf.logical_and(tf.reduce_all(tf.math.is_finite(m.mean)),
                          tf.reduce_all(tf.math.is_finite(m.m2)))


def is_valid(m):
    """True when the moments can initialise: data present and every statistic finite."""
    return _formulas.is_valid(TF, m.count, m.mean, m.m2)


def check(m, name, enabled=True):
    """Assertions that raise ``InvalidArgumentError`` naming ``name`` when ``enabled``
    and the moments cannot initialise.

    None while tracing for XLA: XLA would drop them anyway, logging a line per op at
    every compile; the caller's selection (see ``_state``) keeps the state unchanged.
    """
    if _checks.in_xla_context():
        return []
    skip = tf.logical_not(tf.cast(enabled, tf.bool))
    return [
        tf.debugging.Assert(tf.logical_or(skip, has_data(m)),
                            [_checks.cannot_initialise(name, has_data=False)]),
        tf.debugging.Assert(tf.logical_or(skip, _is_finite(m)),
                            [_checks.cannot_initialise(name, has_data=True)]),
    ]
