"""``tf_actnorm.initialize`` for TensorFlow Probability flows.

A flow is a distribution (its data direction is the one ``log_prob(data)`` takes) or a
bijector with a stated direction (``forward`` or ``inverse`` on the data). Its
ActNorm bijectors are found by running that direction, not by walking the
bijector's structure: while ``initialize`` runs, every ActNormBijector call goes to an
interceptor (``bijector._intercept``) instead of the bijector's own initialisation.
So nested ``Chain``, ``Invert``, bijectors that share a Keras layer's variables
(``layer.bijector``), and ActNorms inside any other composite are found, each in the
direction the data reaches it, and ``init_from`` plays no part.

How it runs, as ``initialize`` does for Keras models:

* Small data, one pass: if all the batches together hold at most ``_MERGE_BYTES``
  (1 MiB), they are concatenated and one eager pass initialises each ActNorm from its
  inputs when the data first reaches it, before they go on: exactly a first training
  call on that batch.
* Otherwise, one pass over the data per ActNorm, one batch (runs of small batches
  concatenated up to 1 MiB) in memory at a time: an ActNorm's inputs depend on the
  earlier ActNorms' final parameters. The moments of the batches are combined exactly
  (``_stats.combine``). The passes run functions traced once, not per batch
  (``autograph=False``). First, one function for all passes (``_WholeFlowPasses``):
  it runs the whole data direction and returns every ActNorm's moments, and each pass
  keeps its own. A TFP flow's tracing is mostly Python (TFP's bookkeeping per
  bijector call), so one trace instead of one per ActNorm saves more than running the
  whole flow in every pass costs, unless the arithmetic is heavy: once a pass takes
  longer than that trace did, each remaining ActNorm gets a function that runs the
  flow up to its first call and stops there (``_StopPass``), so the rest of the flow
  is neither traced nor run (``_Pass``).
* Only the values are computed, never the log-determinants: for a
  ``TransformedDistribution`` the data go through ``bijector.inverse`` (where its
  ``log_prob`` starts), and every ActNorm meets the data there first.
* Eager passes run on a fresh tensor (``tf.identity``): TFP's bijector cache, keyed on
  the input tensor, would otherwise answer a later pass over the same tensor object
  with outputs computed before the ActNorms were initialised.
"""

import functools
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from tf_actnorm import _stats
from tf_actnorm.init import _Source

DIRECTIONS = ("forward", "inverse")


def is_flow(obj):
    """True for a TFP distribution or bijector (without importing TFP)."""
    tfp = sys.modules.get("tensorflow_probability")
    return tfp is not None and isinstance(
        obj, (tfp.distributions.Distribution, tfp.bijectors.Bijector))


class _StopPass(BaseException):
    """Ends a pass at the ActNorm being initialised. A ``BaseException``, so that an
    ``except Exception`` in flow code cannot swallow it."""


class _NotTraceable(BaseException):
    """An ActNorm's inputs were seen inside a loop or branch of the traced flow."""


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
    order = _call_order(flow, run, first)
    calls = [call for call in order if force or call.needs_init()]
    if not calls:
        return {}
    total = None if source.num_batches is None else len(calls) * source.num_batches
    progress = keras.utils.Progbar(total, verbose=verbose, unit_name="batch")
    progress.update(0)
    done = 0
    # First one function, traced once, for every pass; when a pass over the data costs
    # more than that trace did, the remaining ActNorms get passes that stop at them.
    whole = _WholeFlowPasses(run, calls)
    if not whole.trace(first):
        whole = None
    for index, call in enumerate(calls):
        start = time.perf_counter()
        passes = whole.batches(index, source) if whole else _Pass(run, call).batches(source)
        moments = _zero_moments(call.bijector)
        for batch_moments, count in passes:
            moments = _stats.combine(moments, batch_moments)
            done += count
            progress.update(done)
        call.bijector._state.assign_from_moments(moments, call.from_outputs)
        if whole and time.perf_counter() - start > whole.trace_seconds:
            whole = None
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
    tfd = sys.modules["tensorflow_probability"].distributions
    while (isinstance(distribution, tfd.TransformedDistribution)
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
    from_outputs)``, which returns ops to run before the call's own."""

    def __init__(self, hook):
        self.hook = hook

    def __enter__(self):
        from tf_actnorm import bijector as bijector_module  # noqa: PLC0415 (imports TFP)

        if bijector_module._intercept is not None:
            raise RuntimeError("initialize: already running (re-entered from a flow?)")
        bijector_module._intercept = self.hook

    def __exit__(self, *exc):
        from tf_actnorm import bijector as bijector_module  # noqa: PLC0415

        bijector_module._intercept = None


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


def _call_order(flow, run, batch):
    """Every ActNorm that ``run`` reaches, in order of its first call, as ``_FirstCall``s.
    One eager pass on ``batch`` in which no ActNorm initialises."""
    calls = {}

    def record(bijector, data, from_outputs):
        calls.setdefault(_key(bijector), _FirstCall(bijector, from_outputs))
        return []

    try:
        with _Interception(record):
            _run_eagerly(run, batch)
    except Exception as error:
        _add_note(error, batch)
        raise
    if not calls:
        raise ValueError(f"initialize: {flow.name!r} runs no ActNormBijector on its data")
    return list(calls.values())


def _add_note(error, batch):
    if hasattr(error, "add_note"):  # Python 3.11+
        shapes = tf.nest.map_structure(lambda t: tuple(t.shape), batch)
        error.add_note(
            f"tf_actnorm.initialize: the flow failed on the first batch of `data` (shape "
            f"{shapes}). If `data` yields single examples rather than batches, batch it "
            "first, e.g. `dataset.batch(n)`.")


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
            _add_note(error, batch)
            raise
        if not self.seen:
            raise ValueError(f"initialize: {self.name!r} runs no ActNormBijector on its data")
        return [call.bijector for call in self.initialised]

    def _initialize(self, bijector, data, from_outputs):
        key = _key(bijector)
        if key in self.seen:
            return []
        call = self.seen[key] = _FirstCall(bijector, from_outputs)
        if not (self.force or call.needs_init()):
            return []
        self.initialised.append(call)
        moments = _stats.moments(data, bijector.axis)
        return [bijector._state.assign_from_moments(moments, from_outputs)]


class _Pass:
    """One ActNorm's pass: a ``tf.function`` (traced once, not per batch) that runs the
    flow's data direction up to the ActNorm's first call and returns the moments of its
    inputs there. ActNorms before it read their variables, already assigned by the
    earlier passes. An ActNorm called inside the flow's own control flow (a
    ``tf.while_loop`` body) cannot hand its moments out of that graph: its pass then
    runs eagerly (slower, same result)."""

    def __init__(self, run, call):
        self.run, self.call = run, call
        self.key = _key(call.bijector)
        # reduce_retracing: a last, smaller batch reuses the trace.
        self._function = tf.function(self._moments, reduce_retracing=True, autograph=False)

    def batches(self, source):
        """``(moments, n)`` for each run of ``n`` batches of ``source``."""
        step = None
        for batch, count in source.merged_batches():
            if step is None:
                step = self._traced_or_eager(batch)
            yield step(batch), count

    def _traced_or_eager(self, batch):
        try:
            self._function.get_concrete_function(_spec(batch))
        except _NotTraceable:
            return self._eager_moments
        return self._function

    def _eager_moments(self, batch):
        return self._moments(_fresh(batch))

    def _moments(self, batch):
        seen = []

        def collect(bijector, data, from_outputs):
            if _key(bijector) == self.key:
                seen.append(_stats.moments(data, bijector.axis))
                raise _StopPass
            return []

        try:
            with _Interception(collect), tf.name_scope("initialize"):
                self.run(batch)
        except _StopPass:
            pass
        if not seen:
            raise ValueError(
                f"initialize: {self.call.bijector.name!r} was not reached by a later batch "
                "(a flow whose path depends on the batch?)")
        if not tf.executing_eagerly() and any(
                t.graph is not tf.compat.v1.get_default_graph() for t in seen[0]):
            raise _NotTraceable
        zero = _zero_moments(self.call.bijector)
        return _stats.Moments(*(tf.cast(t, zero.count.dtype) for t in seen[0]))


class _WholeFlowPasses:
    """Every ActNorm's pass from one ``tf.function``, traced once: it runs the whole data
    direction and returns the moments of each ActNorm's inputs at its first call. Pass
    ``index`` keeps the moments of ``calls[index]``, whose inputs the earlier passes'
    assignments have made final (ActNorms read their variables when the function runs).
    Each pass runs the whole flow, but the flow is traced once instead of once per
    ActNorm: for a flow whose Python (TFP's bookkeeping) costs more than its arithmetic,
    much cheaper."""

    def __init__(self, run, calls):
        self.run, self.calls = run, calls
        self.index = {_key(call.bijector): i for i, call in enumerate(calls)}
        self.trace_seconds = None
        self._function = tf.function(self._moments, reduce_retracing=True, autograph=False)

    def trace(self, batch):
        """Traces for batches like ``batch`` and runs it once, timing both (what an
        ActNorm's own function costs too). False if the flow computes an ActNorm's inputs
        inside its own control flow (the function cannot return them)."""
        start = time.perf_counter()
        try:
            self._function.get_concrete_function(_spec(batch))
        except _NotTraceable:
            return False
        self._function(batch)
        self.trace_seconds = time.perf_counter() - start
        return True

    def batches(self, index, source):
        for batch, count in source.merged_batches():
            yield self._function(batch)[index], count

    def _moments(self, batch):
        seen = [None] * len(self.calls)

        def collect(bijector, data, from_outputs):
            i = self.index.get(_key(bijector))
            if i is not None and seen[i] is None:
                seen[i] = _stats.moments(data, bijector.axis)
            return []

        with _Interception(collect), tf.name_scope("initialize"):
            self.run(batch)
        if any(m is None for m in seen):
            raise ValueError("initialize: a later batch did not reach every ActNorm "
                             "(a flow whose path depends on the batch?)")
        if any(t.graph is not tf.compat.v1.get_default_graph() for m in seen for t in m):
            raise _NotTraceable
        return [_stats.Moments(*(tf.cast(t, _zero_moments(call.bijector).count.dtype) for t in m))
                for m, call in zip(seen, self.calls)]


def _spec(batch):
    """``batch``'s spec with any batch size: merged batches and a last, smaller one
    share the trace."""
    return tf.nest.map_structure(lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), batch)


def _zero_moments(bijector):
    zeros = tf.zeros(bijector._state.initial_bias.shape, _stats.stats_dtype(bijector.dtype))
    return _stats.Moments(zeros, zeros, zeros)


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
