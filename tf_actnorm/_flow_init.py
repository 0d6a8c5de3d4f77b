"""``tf_actnorm.initialize`` for TensorFlow Probability flows.

A flow is a distribution (its data direction is the one ``log_prob(data)`` takes) or a
bijector with a stated direction (``forward`` or ``inverse`` on the data). Its
ActNorm bijectors are found by running that direction, not by walking the
bijector's structure: while ``initialize`` runs, every ActNormBijector call goes to an
interceptor (``bijector.call_interceptor``) instead of the bijector's own initialisation.
So nested ``Chain``, ``Invert``, bijectors that share a Keras layer's variables
(``layer.bijector``), and ActNorms inside any other composite are found, each in the
direction the data reaches it, and ``init_from`` plays no part.

How it runs, as ``initialize`` does for Keras models:

* Small data, one pass: if all the batches together hold at most ``_MERGE_BYTES``
  (1 MiB), they are concatenated and one eager pass initialises each ActNorm from its
  inputs when the data first reaches it, before they go on: exactly a first training
  call on that batch.
* Otherwise, one pass over the data per ActNorm: an ActNorm's inputs depend on the
  earlier ActNorms' final parameters. Batches are read in runs (small ones concatenated
  up to 1 MiB), two runs computed side by side (a pass's ops are small and sequential,
  so one call alone leaves a core idle): at most two runs in memory. The moments of the
  runs are combined exactly, in data order (``_ops.combine``). All passes run one
  function, traced once (``autograph=False``), that computes about the flow up to the
  pass's ActNorm (see ``_Passes``).
* Only the values are computed, never the log-determinants: for a
  ``TransformedDistribution`` the data go through ``bijector.inverse`` (where its
  ``log_prob`` starts), and every ActNorm meets the data there first.
* Eager passes run on a fresh tensor (``tf.identity``): TFP's bijector cache, keyed on
  the input tensor, would otherwise answer a later pass over the same tensor object
  with outputs computed before the ActNorms were initialised.
"""

import functools
import sys

import keras
import numpy as np
import tensorflow as tf

from tf_actnorm import _ops
from tf_actnorm.init import _Source
from tf_actnorm.init import add_first_batch_note
from tf_actnorm.init import pass_pool
from tf_actnorm.init import two_at_a_time

DIRECTIONS = ("forward", "inverse")


def initialize_flow(flow, data, steps, batch_size, force, verbose, direction):
    """``tf_actnorm.initialize`` for a distribution or a bijector (see there)."""
    run = _data_direction(flow, direction)
    source = _Source(data, steps, batch_size)
    first = source.first()
    _check_batched(flow, direction, first)
    source.keep_for_passes(2)  # a one-shot iterator's batches serve every pass
    union = source.union()
    if union is not None:
        # All the data within _MERGE_BYTES: one eager pass initialises each ActNorm
        # when the data reaches it, as a first training call on that batch would.
        initialised = _OnePass(flow.name, force).run(run, union[0])
        if not initialised:
            return {}
        total = len(initialised) * union[1]
        keras.utils.Progbar(total, verbose=verbose, unit_name="batch").update(
            total, finalize=True)
        return _summary(initialised)
    with pass_pool() as pool:
        return _stream(_Passes(flow.name, run, first, pool), source, force, verbose)


def _stream(passes, source, force, verbose):
    """One pass over ``source`` per ActNorm that needs it, in data order."""
    calls = [call for call in passes.order if force or call.needs_init()]
    if not calls:
        return {}
    total = None if source.num_batches is None else len(calls) * source.num_batches
    progress = keras.utils.Progbar(total, verbose=verbose, unit_name="batch")
    progress.update(0)
    done = 0
    for call in calls:
        moments = _zero_moments(call.bijector)
        for batch_moments, count in passes.batches(call, source):
            moments = _ops.combine(moments, batch_moments)
            done += count
            progress.update(done)
        call.bijector._state.assign_from_moments(moments, call.from_outputs)
    progress.update(done, finalize=True)
    return _summary([call.bijector for call in calls])


def _data_direction(flow, direction):
    """``batch -> anything``: the flow's data direction, which calls each ActNorm."""
    tfp = sys.modules["tensorflow_probability"]
    if isinstance(flow, tfp.distributions.Distribution):
        if direction is not None:
            raise ValueError(
                "initialize: `direction` is for a bijector; a distribution's data direction "
                f"is the one `log_prob(data)` takes. Got direction={direction!r} for "
                f"{flow.name!r}")
        return _in_dtype(flow.dtype, functools.partial(_log_prob_path, flow))
    if direction not in DIRECTIONS:
        raise ValueError(
            f"initialize: for a bijector ({flow.name!r}), pass `direction`, the way data goes "
            "through it: \"forward\" (`bijector.forward(data)`) or \"inverse\" "
            "(`bijector.inverse(data)`, as `TransformedDistribution.log_prob` does). "
            f"Got {direction!r}")
    return _in_dtype(flow.dtype, flow.forward if direction == "forward" else flow.inverse)


def _in_dtype(dtype, run):
    """``run`` on floating-point batches cast to the flow's ``dtype``, as ``log_prob``
    converts a float64 numpy array for a float32 flow."""
    if not isinstance(dtype, tf.dtypes.DType) or not dtype.is_floating:
        return run

    def cast_then_run(batch):
        return run(tf.nest.map_structure(
            lambda t: tf.cast(t, dtype) if t.dtype.is_floating else t, batch))

    return cast_then_run


def _log_prob_path(distribution, y):
    """What ``distribution.log_prob(y)`` runs up to its base distribution's density,
    without the log-determinants (no ActNorm initialises from a log-det: each is
    reached by value first). A ``TransformedDistribution`` with an injective bijector
    starts its ``log_prob`` with ``bijector.inverse(y)``; so does each further
    ``TransformedDistribution`` it has as its base. Any other distribution: its
    ``log_prob``."""
    # TFP builds a `TransformedDistribution` whose bijector is not a composite tensor
    # (one holding a Python function, as RealNVP does) as an instance of the base
    # class of `tfd.TransformedDistribution`, which holds `log_prob`.
    from tensorflow_probability.python.distributions import transformed_distribution  # noqa: PLC0415

    while (isinstance(distribution, transformed_distribution._TransformedDistribution)
           and distribution.bijector._is_injective):
        y = distribution.bijector.inverse(y)
        distribution = distribution.distribution
    return distribution.log_prob(y)


def _event_rank(flow, direction):
    """Rank of one example of the data, where static (else None)."""
    if direction is None:
        shape = flow.event_shape
        return None if not isinstance(shape, tf.TensorShape) or shape.rank is None else shape.rank
    rank = (flow.forward_min_event_ndims if direction == "forward"
            else flow.inverse_min_event_ndims)
    return rank if isinstance(rank, int) else None


def _check_batched(flow, direction, x):
    """Refuse single examples where the flow's event rank says what a batch is."""
    rank = _event_rank(flow, direction)
    if rank is None or not isinstance(x, tf.Tensor) or x.shape.rank is None:
        return
    if x.shape.rank <= rank:
        raise ValueError(
            f"initialize: a batch of `data` has shape {tuple(x.shape)}, but one example of "
            f"{flow.name!r} has rank {rank}: `data` seems to yield single examples, not "
            "batches. Batch it first, e.g. `dataset.batch(n)`.")


def _key(bijector):
    """One ActNorm, whichever bijector object views it (copies, slices and a layer's
    ``bijector`` share the ``initialized`` variable)."""
    return bijector._state.initialized.ref()


class _Interception:
    """While active, every ActNormBijector call goes to ``hook(bijector, data,
    from_outputs)``, which returns the ops to run before the call and the tensor that
    the call then transforms."""

    def __init__(self, hook):
        self.hook = hook
        self._token = None

    def __enter__(self):
        from tf_actnorm.bijector import call_interceptor  # noqa: PLC0415 (imports TFP)

        if call_interceptor.get() is not None:
            raise RuntimeError("initialize: already running (re-entered from a flow?)")
        self._token = call_interceptor.set(self.hook)

    def __exit__(self, *exc):
        from tf_actnorm.bijector import call_interceptor  # noqa: PLC0415

        call_interceptor.reset(self._token)


def _fresh(batch):
    return tf.nest.map_structure(tf.identity, batch)


def _run_eagerly(run, batch):
    with tf.name_scope("initialize"):
        run(_fresh(batch))


class _FirstCall:
    """An ActNorm as the data first reaches it: the bijector and the direction."""

    def __init__(self, bijector, from_outputs):
        self.bijector, self.from_outputs = bijector, from_outputs

    def needs_init(self):
        state = self.bijector._state
        return state.can_initialize() and not bool(state.initialized.numpy())


class _OnePass:
    """One eager pass that initialises each ActNorm from its inputs when the data first
    reaches it (those ``force`` or their state select), before they go on."""

    def __init__(self, name, force):
        self.name, self.force = name, force
        self.seen = {}
        self.initialised = []

    def run(self, run, batch):
        try:
            with _Interception(self._initialize):
                _run_eagerly(run, batch)
        except Exception as error:
            add_first_batch_note(error, "flow", batch)
            raise
        if not self.seen:
            raise ValueError(f"initialize: {self.name!r} runs no ActNormBijector on its data")
        return [call.bijector for call in self.initialised]

    def _initialize(self, bijector, data, from_outputs):
        key = _key(bijector)
        if key in self.seen:
            return [], data
        call = self.seen[key] = _FirstCall(bijector, from_outputs)
        if not (self.force or call.needs_init()):
            return [], data
        self.initialised.append(call)
        moments = _ops.moments(data, bijector.axis)
        return [bijector._state.assign_from_moments(moments, from_outputs)], data


class _Passes:
    """Every ActNorm's pass from one ``tf.function``, traced once for all of them (not
    per ActNorm, not per batch): ``(batch, target)`` -> the moments of each ActNorm's
    inputs at its first call, of which only those of ``order[target]`` count rows.
    ActNorms before the target read their variables, already assigned by the earlier
    passes. Tracing also finds the ActNorms, in the order the data first reach them
    (``order``: ``_FirstCall`` s).

    The function runs the whole data direction, but from the target on, on an empty
    batch: each ActNorm's call passes on its input sliced to all rows before the
    target and to none from the target on, and takes the moments of its input sliced
    to all rows in its own pass and to none in the others (``tf.where`` on the
    target, no ``tf.cond``). So a pass computes about the flow up to its ActNorm, and
    the flow is traced once: a TFP flow's tracing is mostly Python (TFP's bookkeeping
    per bijector call), which one function per ActNorm would repeat for each.

    A traced pass runs two runs of batches at once in ``pool`` (see ``batches``).

    An ActNorm called inside the flow's own control flow (a ``tf.while_loop`` body)
    cannot hand its moments out of that graph: the passes then run eagerly (slower,
    same result)."""

    def __init__(self, name, run, batch, pool):
        self.run = run
        self._pool = pool
        self.order, self._index = [], {}
        self._step = tf.function(self._moments, reduce_retracing=True, autograph=False)
        self._traceable = True  # cleared by the trace if the moments are out of its reach
        try:
            # Any batch size: merged batches and a last, smaller one share the trace.
            self._step.get_concrete_function(_spec(batch), tf.TensorSpec([], tf.int32))
            if self._traceable and self.order:
                # The function's first call optimises its graph. Made here, on a pass
                # with no target (every ActNorm gets no rows): no two calls do it at once.
                self._step(batch, tf.constant(-1, tf.int32))
        except Exception as error:
            add_first_batch_note(error, "flow", batch)
            raise
        if not self.order:
            raise ValueError(f"initialize: {name!r} runs no ActNormBijector on its data")
        if not self._traceable:
            self._step, self._pool = self._eager_moments, None

    def batches(self, call, source):
        """``(moments of call's inputs, n)`` for each run of ``n`` batches of ``source``,
        in data order. A traced pass keeps two runs in ``pool`` at once, the next one
        read meanwhile: its ops are mostly small and one after another, so a single
        call leaves cores idle. The moments are combined in data order all the same."""
        index = tf.constant(self.order.index(call), tf.int32)
        zeros = _zero_moments(call.bijector)
        channels = zeros.count.shape[0]

        def moments(batch):
            padded = self._step(batch, index)
            return _ops.Moments(*(tf.cast(t[:channels], zeros.count.dtype) for t in padded))

        return two_at_a_time(self._pool, moments, source.merged_batches())

    def _eager_moments(self, batch, target):
        return self._moments(_fresh(batch), target)

    def _moments(self, batch, target):
        seen = {}
        # Row limits as [1] vectors for `tf.strided_slice`, which clamps an end past the
        # last row: "all rows" needs no shape op. Built once, shared by every ActNorm,
        # so each one adds only its comparison, select and slice (the graph's size is
        # what tracing and optimising it cost).
        target = tf.reshape(target, [1])
        start, step = tf.zeros([1], tf.int32), tf.ones([1], tf.int32)
        every_row, no_row = tf.fill([1], tf.int32.max), tf.zeros([1], tf.int32)

        def first_rows(data, condition):
            rows = tf.strided_slice(data, start, tf.where(condition, every_row, no_row), step)
            # Where the limits are not constants (captured into a flow's own loop),
            # the slice's rank would be unknown; only the first dimension changes.
            rows.set_shape(tf.TensorShape([None]).concatenate(data.shape[1:]))
            return rows

        def collect(bijector, data, from_outputs):
            key = _key(bijector)
            if key not in self._index:  # while tracing: the order of first calls
                self._index[key] = len(self.order)
                self.order.append(_FirstCall(bijector, from_outputs))
            index = self._index[key]
            if index in seen:
                return [], data
            position = tf.constant([index], tf.int32)
            seen[index] = _channels_last(first_rows(data, tf.equal(target, position)),
                                         bijector.axis)
            return [], first_rows(data, tf.greater(target, position))

        with _Interception(collect), tf.name_scope("initialize"):
            self.run(batch)
        if len(seen) != len(self.order):
            raise ValueError("initialize: a later batch did not reach every ActNorm "
                             "(a flow whose path depends on the batch?)")
        if not seen:
            return []  # no ActNorm: `__init__` says so
        if not tf.executing_eagerly() and any(
                t.graph is not tf.compat.v1.get_default_graph() for t in seen.values()):
            self._traceable = False  # the passes run eagerly; this trace's outputs go unused
            return []
        # One set of moments ops for every ActNorm (a graph a fraction of the size, so
        # faster to trace and to optimise): each one's inputs as [positions, channels],
        # padded to the widest, concatenated; only the target's hold rows.
        values = [seen[i] for i in range(len(self.order))]
        dtype = tf.float64 if any(v.dtype == tf.float64 for v in values) else tf.float32
        width = max(int(v.shape[-1]) for v in values)
        return _ops.moments(tf.concat([_padded(tf.cast(v, dtype), width) for v in values],
                                        axis=0), -1)


def _padded(data, width):
    """[positions, channels] ``data`` with zero channels appended up to ``width``."""
    missing = width - int(data.shape[-1])
    return data if missing == 0 else tf.pad(data, [[0, 0], [0, missing]])


def _channels_last(data, axis):
    """``data`` as [positions, channels], the channel axis ``axis`` (negative) last."""
    rank = data.shape.rank
    axis %= rank
    if axis != rank - 1:
        data = tf.transpose(data, [i for i in range(rank) if i != axis] + [axis])
    return data if rank == 2 else tf.reshape(data, [-1, data.shape[-1]])


def _spec(batch):
    """``batch``'s spec with any batch size: merged batches and a last, smaller one
    share the trace."""
    return tf.nest.map_structure(lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), batch)


def _zero_moments(bijector):
    return _ops.zero_moments(int(bijector._state.initial_bias.shape[0]), bijector.dtype)


def _summary(bijectors):
    """``{name: {"mean_abs_bias", "mean_scale"}}``, names made unique in data order
    ("act_norm", "act_norm_1", ...)."""
    summary = {}
    for bijector in bijectors:
        name, n = bijector.name, 0
        while name in summary:
            n += 1
            name = f"{bijector.name}_{n}"
        summary[name] = {"mean_abs_bias": float(np.mean(np.abs(bijector.bias.numpy()))),
                         "mean_scale": float(np.mean(np.exp(bijector.log_scale.numpy())))}
    return summary
