"""What ActNorm does its own way on TensorFlow (see ``_backend``): also what the TFP
bijector runs on."""

import functools

import keras
import tensorflow as tf
from tensorflow.python.saved_model import save_context

from tf_actnorm import _checks

# Autodiff of `x * s + b * s` keeps the input `x` for the backward pass; the output
# gradient keeps nothing the next layer does not keep anyway (`_ops._affine`).
OUTPUT_GRADIENT = True


def replica_context():
    """The replica context inside ``strategy.run`` of a ``tf.distribute`` strategy,
    else ``None`` (no strategy, or its cross-replica context). Any number of
    replicas: even with one, assigning a mirrored variable there goes through
    ``merge_call``, which ``tf.cond`` branches refuse."""
    if not tf.distribute.has_strategy():
        return None
    return tf.distribute.get_replica_context()


def sum_over_replicas(values):
    """``values`` (a list of tensors) summed over the replicas of a ``tf.distribute``
    strategy: every replica gets the global batch's sums."""
    ctx = replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return values
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)


def replicated():
    """True in the replica context of a strategy with several replicas."""
    ctx = replica_context()
    return ctx is not None and ctx.num_replicas_in_sync > 1


def assigns_in_branches():
    """True outside a strategy's replica context, where assigning a (mirrored) variable
    goes through ``merge_call``, which ``tf.cond`` branches refuse."""
    return replica_context() is None


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


def is_traced(tensor):
    """True for a tensor of a graph being traced (its value is not known now)."""
    return tf.is_symbolic_tensor(tensor)


def checked(values, needed, stats, name):
    """``values`` after assertions that raise ``InvalidArgumentError`` naming ``name``
    when ``needed`` and the moments ``stats`` cannot initialise (a graph; eager code
    raises before, ``_ops``). None under XLA, which would drop them anyway, logging a
    line per op at every compile; the caller's selection keeps the state unchanged."""
    if not tf.is_symbolic_tensor(needed) or _checks.in_xla_context():
        return values
    count, mean, m2 = stats
    skip = tf.logical_not(needed)
    has_data = tf.reduce_all(count > 0)
    finite = tf.logical_and(tf.reduce_all(tf.math.is_finite(mean)),
                            tf.reduce_all(tf.math.is_finite(m2)))
    checks = [
        tf.debugging.Assert(tf.logical_or(skip, has_data),
                            [_checks.cannot_initialise(name, has_data=False)]),
        tf.debugging.Assert(tf.logical_or(skip, finite),
                            [_checks.cannot_initialise(name, has_data=True)]),
    ]
    with tf.control_dependencies(checks):
        return [tf.identity(v) for v in values]


def serving():
    """True while a SavedModel is written: functions traced then serve, so they get no
    init branch and no variable writes (``ActNorm`` refuses to be saved uninitialised)."""
    return save_context.in_save_context()


def exporting():
    """False: on TensorFlow, writing a SavedModel refuses an uninitialised layer
    (``ActNorm._trackable_children``), for every route that writes one."""
    return False


def stored_flag(variable):
    """The stored value of a bool variable, read outside any trace. False for a variable
    created in the ``tf.function`` being traced (a layer first built there): it holds no
    value until that function runs, and it starts False."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    with tf.init_scope():
        return bool(tf.compat.v1.is_variable_initialized(variable)) and bool(variable.numpy())


def initialized_by_call(state, update):
    """Eagerly ``update``; while tracing a Python bool, True unless ``state`` is
    initialised now (read outside the trace), i.e. whether the traced call may."""
    if not tf.is_symbolic_tensor(update):
        return update
    return not state.stored_initialized()


def run_if(condition, fn):
    """Call ``fn()`` if ``condition`` (a Python bool or an eager tensor) is true."""
    if bool(condition):
        fn()


def compiled_moments(x, axis, mask):
    """Eager tensors outside a strategy: ``_ops.moments`` as one call of a function
    traced once per rank, channel axis and mask rank (and dtypes), its shapes relaxed
    after the first: one op at a time, their dispatch costs more than the reductions."""
    if not tf.executing_eagerly() or replica_context() is not None:
        return None
    rank = len(x.shape)
    return _traced_moments(rank, axis % rank, None if mask is None else len(mask.shape))


@functools.lru_cache(maxsize=None)
def _traced_moments(rank, axis, mask_rank):
    from tf_actnorm import _ops  # noqa: PLC0415 (`_ops` calls this module)

    del rank, mask_rank  # part of the cache key: a relaxed shape keeps its rank
    return tf.function(lambda x, mask: tuple(_ops.moments(x, axis, mask)),
                       reduce_retracing=True, autograph=False)
