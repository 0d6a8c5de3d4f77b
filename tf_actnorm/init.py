"""Data-dependent initialisation from many batches.

Glow initialised ActNorm on a larger batch than it trained with. ``initialize``
does that for any Keras model without holding the data in memory: exact
streaming per-channel moments (Chan et al.'s parallel combination of count, mean
and sum of squared deviations), one ActNorm layer after another in data-flow
order, so each layer's statistics are those of its inputs *after* the earlier
layers were initialised — the same values (to rounding) as a single init batch
made of all those batches.

How it runs, and why:

* Small data, one pass: if all the batches together hold at most
  ``_MERGE_BYTES`` (1 MiB) of model inputs, they are concatenated and one eager
  forward pass initialises every layer from its inputs before they go on, exactly
  as a first training call on that batch would. Initialising from a few batches
  (Glow used one larger batch) is the common case; it costs about one forward
  pass and no tracing.
* Otherwise, one pass over the data per layer, one batch in memory at a time: a
  layer's inputs depend on the earlier layers' final parameters, so they cannot be
  computed before those layers have seen every batch. Runs of small batches are
  concatenated up to ``_MERGE_BYTES`` (per-op overhead dominates small batches).
* Each pass runs a ``tf.function`` traced once, not per batch (``autograph=False``,
  as Keras' own step functions). In a Sequential or functional model it is traced
  per layer and stops at the layer: once its inputs are seen, the collecting hook
  raises ``_StopForward``, so the rest of the model is neither traced nor run. A
  subclassed model first gets one function for all passes that runs the whole
  model (``_WholeModelPasses``); if one pass over the data takes longer than that
  trace did, the remaining layers get their own stopping functions, as above. A
  layer that a forward pass calls more than once (a shared layer) gets whole
  forward passes, so that every call's inputs count.
* The running moments are tensors, not ``tf.Variable`` accumulators: variables
  created under a ``tf.distribute`` strategy's scope would be mirrored.
* A layer called inside the model's own control flow (an RNN cell's loop, a
  ``tf.cond`` branch) has its inputs in a graph of that control flow, out of reach
  of the function's output; its pass then runs eagerly (slower, same result).
"""

import collections
import contextlib
import functools
import itertools
import time

import keras
import numpy as np
import tensorflow as tf

from tf_actnorm import _stats
from tf_actnorm.layer import ActNorm


def initialize(model, data, steps=None, batch_size=32, force=False, verbose=1, direction=None):
    """Initialise the ActNorm layers of ``model`` from many batches, streaming.

    ``model`` may also be a normalising flow: a TensorFlow Probability distribution
    (such as a ``tfd.TransformedDistribution``) or bijector with ``ActNormBijector``
    bijectors in it (see "Flows" below).

    Every uninitialised, trainable ActNorm layer of ``model`` (nested models and
    layers are searched too) is initialised, in the order a forward pass calls
    them, from its inputs over all the batches of ``data``: the result equals
    initialising from one batch made of all of them.

    Memory and time:

    * Up to 1 MiB of model inputs in all (e.g. 16 batches of 64 8x8x1 float32
      images), the batches are concatenated and one eager forward pass initialises
      every layer: about the cost of one forward pass, no tracing. (Not when a
      forward pass calls a layer twice: each call's inputs must count.)
    * Beyond that, the data is read once per layer, one batch at a time (runs of
      small batches concatenated up to 1 MiB), so memory does not grow with the
      number of batches, except for a one-shot generator (see ``data``). A
      Sequential or functional model costs one trace per layer, and each pass runs
      the model only up to its layer: ``L`` ActNorm layers cost ``L`` traces and
      about ``L / 2`` forward passes per batch. A subclassed model is traced once
      and each pass runs all of it (``L`` forward passes per batch) while a pass
      costs less than that trace; after that, as a Sequential model.

    Concatenating batches changes only how many examples one inference call sees, not
    the statistics; a model whose inference output depends on which examples share a
    batch would see larger batches.

    Flows: for a distribution, the data take the direction ``log_prob(data)`` takes;
    for a bijector, the one ``direction`` names. Every ``ActNormBijector`` that the
    data reach (inside nested ``tfb.Chain``, ``tfb.Invert``, any composite, and
    ``layer.bijector`` views of Keras layers) is initialised in the order the data
    reach it, from its inputs there after the earlier ones were initialised: one
    pass per bijector over the data (compiled with ``tf.function``), or one eager
    pass when all the data fit in 1 MiB, with the same results. Each is
    initialised in the direction the data take through it, whatever its
    ``init_from``: ``forward`` standardised for data entering ``forward``,
    ``inverse`` for data entering ``inverse``. Its sampling direction is never
    used. (Keras ``ActNorm`` layers called inside a flow's networks are not
    included: they initialise on their first training call.)

    Args:
        model: A Keras model or layer, or a TensorFlow Probability distribution or
            bijector (a flow).
        data: The batches. A ``tf.data.Dataset`` (re-iterated for each layer), a
            numpy array or tensor (split into ``batch_size`` batches), a re-iterable
            collection of batches (such as a list), or a one-shot iterator or
            generator. A one-shot iterator cannot be re-read, so its batches are
            kept in memory for the later layers' passes. Elements that are
            ``(x, y)`` or ``(x, y, sample_weight)`` tuples contribute ``x``.
            Elements must be batches: batch a dataset of single examples with
            ``dataset.batch(n)`` first.
        steps: Number of batches to use (default: all). Required for an infinite
            ``tf.data.Dataset`` (e.g. one made with ``.repeat()``).
        batch_size: Batch size for numpy/tensor ``data``.
        force: Initialise every ActNorm layer, including layers that are already
            initialised and frozen layers (``trainable=False``, also when a parent
            was frozen). Without it both are left untouched.
        verbose: 1 shows a Keras ``Progbar`` counting layers x batches (a count
            without a total when the number of batches is unknown), 0 is silent.
        direction: For a bijector only, and required there: ``"forward"`` if the data
            go through ``bijector.forward``, ``"inverse"`` if through
            ``bijector.inverse`` (as ``TransformedDistribution.log_prob`` sends them).

    Returns:
        A dict mapping each initialised layer's name to
        ``{"mean_abs_bias": float, "mean_scale": float}`` (for a flow, each bijector's
        name, made unique in data order: ``act_norm``, ``act_norm_1``, ...).

    Raises:
        ValueError: ``steps`` is missing for an infinite dataset, ``data`` yields
            no batches or looks unbatched, or ``model`` has no ActNorm layer (a flow:
            its data reach no ActNormBijector); ``direction`` is missing for a
            bijector or given for anything else.

    Example:

    ```python
    summary = tf_actnorm.initialize(model, train_dataset, steps=16)
    model.fit(train_dataset)  # ActNorm does not initialise again
    tf_actnorm.initialize(flow, train_dataset, steps=16)  # a TransformedDistribution
    ```
    """
    if steps is not None and (not isinstance(steps, (int, np.integer)) or steps < 1):
        raise ValueError(f"initialize: `steps` must be a positive integer or None, got {steps!r}")
    from tf_actnorm import _flow_init  # noqa: PLC0415 (it imports `_Source` from here)

    if _flow_init.is_flow(model):
        return _flow_init.initialize_flow(model, data, steps, batch_size, force, verbose,
                                          direction)
    if direction is not None:
        raise ValueError("initialize: `direction` is for a bijector; got direction="
                         f"{direction!r} for {getattr(model, 'name', model)!r}")
    source = _Source(data, steps, batch_size)
    first = source.first()
    _check_batched(model, first)
    order, calls = _actnorm_layers_in_call_order(model, first)
    targets = [layer for layer in order
               if force or (layer.trainable and not bool(layer.initialized.numpy()))]
    if not targets:
        return {}
    initialised = list(targets)
    source.keep_for_passes(len(targets))
    # Any batch size: merged batches and a last, smaller one use the same trace.
    spec = tf.nest.map_structure(lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), first)
    total = None if source.num_batches is None else len(targets) * source.num_batches
    progress = keras.utils.Progbar(total, verbose=verbose, unit_name="batch")
    progress.update(0)
    done = 0

    def advance(batches):
        nonlocal done
        done += batches
        progress.update(done)

    union = None
    if all(calls[layer] == 1 for layer in targets):
        union = source.union()
    if union is not None:
        # All the data fits in one batch of at most _MERGE_BYTES: one eager forward
        # pass initialises every layer from its inputs before they go on, as a first
        # training call on that batch would (no passes, no traces).
        _initialize_in_one_pass(model, targets, union[0])
        advance(len(targets) * union[1])
        targets = []
    # A model without a layer graph (subclassed) may run whole in every pass, traced
    # once, if one pass over the data costs less than a trace (see _WholeModelPasses).
    whole = None
    if targets and not _has_layer_graph(model):
        whole = _WholeModelPasses(model, targets)
        if not whole.trace(spec, first):
            whole = None
    for index, layer in enumerate(targets):
        if whole is not None:
            start = time.perf_counter()
            moments = whole.run(index, source, advance)
            if time.perf_counter() - start > whole.trace_seconds:
                whole = None  # from now on, stop each pass at its layer
        else:
            moments = _PrefixPass(model, layer, stop=calls[layer] == 1).run(spec, source, advance)
        layer._state.assign_from_moments(moments)
    progress.update(done, finalize=True)
    return {layer.name: {"mean_abs_bias": float(np.mean(np.abs(layer.bias.numpy()))),
                         "mean_scale": float(np.mean(np.exp(layer.log_scale.numpy())))}
            for layer in initialised}


class _Source:
    """The batches of ``data``: a fresh iterator of model inputs for each pass."""

    def __init__(self, data, steps, batch_size):
        self.num_batches = None  # None: unknown until read
        self._one_shot = False
        if isinstance(data, tf.data.Dataset):
            if data.cardinality() == tf.data.INFINITE_CARDINALITY and steps is None:
                raise ValueError(
                    "initialize: `data` is an infinite dataset (made with `.repeat()`?), so "
                    "initialisation would never end. Pass `steps`, the number of batches to "
                    "use, e.g. `initialize(model, dataset, steps=100)`.")
            if steps is not None:
                data = data.take(steps)
            cardinality = int(data.cardinality())
            self.num_batches = cardinality if cardinality >= 0 else None
            self._open = lambda: iter(data)
        elif isinstance(data, (np.ndarray, tf.Tensor)):
            count = -(-len(data) // batch_size)
            self.num_batches = count if steps is None else min(count, steps)
            self._open = lambda: (data[i * batch_size:(i + 1) * batch_size]
                                  for i in range(self.num_batches))
        elif iter(data) is data:
            # A one-shot iterator or generator: read once; `keep_for_passes` keeps its
            # batches when more than one pass needs them.
            self._one_shot = True
            self._unread = itertools.islice(data, steps)
            self._kept = None
            self._open = self._read_once
        else:  # a collection that can be iterated again
            if hasattr(data, "__len__"):
                self.num_batches = len(data) if steps is None else min(len(data), steps)
            self._open = lambda: itertools.islice(iter(data), steps)

    def first(self):
        """The first batch's model inputs (without consuming a one-shot iterator)."""
        if self._one_shot:
            head = list(itertools.islice(self._unread, 1))
            self._unread = itertools.chain(head, self._unread)
            element = head[0] if head else None
        else:
            element = next(self._open(), None)
        if element is None:
            raise ValueError("initialize: `data` yielded no batches")
        return _features(element)

    def keep_for_passes(self, passes):
        if self._one_shot and passes > 1:
            self._kept = []

    def batches(self):
        return (_features(element) for element in self._open())

    def merged_batches(self):
        """``(batch, n)``: the batches, runs of small ones concatenated into one of up
        to ``_MERGE_BYTES`` (``n`` batches). The moments do not depend on how the data
        is split, and one call on a larger batch costs much less than several calls:
        for small batches the per-op overhead dominates a forward pass."""
        pending, size = [], 0
        for batch in self.batches():
            if pending and (size + _nbytes(batch) > _MERGE_BYTES
                            or not _concatenable(pending[0], batch)):
                yield _concatenated(pending), len(pending)
                pending, size = [], 0
            pending.append(batch)
            size += _nbytes(batch)
        if pending:
            yield _concatenated(pending), len(pending)

    def union(self):
        """``(batch, n)``: all ``n`` batches concatenated, if that fits in
        ``_MERGE_BYTES``; else ``None``."""
        if self._one_shot and self._kept is None:
            return None  # one pass: what the peek reads would be lost
        merged = self.merged_batches()
        union = next(merged)
        return union if next(merged, None) is None else None

    def _read_once(self):
        # What was read before (kept if more than one pass needs it), then the rest:
        # a pass that stopped early leaves the others a complete reading.
        yield from self._kept or ()
        for element in self._unread:
            if self._kept is not None:
                self._kept.append(element)
            yield element


# Batches are concatenated up to this size of model inputs: large enough that small
# batches no longer pay the per-op overhead (16 batches of 64 8x8 images: 3.7x faster
# concatenated), small enough not to matter for memory.
_MERGE_BYTES = 1 << 20


def _nbytes(batch):
    return sum(t.shape.num_elements() * t.dtype.size for t in tf.nest.flatten(batch)
               if isinstance(t, tf.Tensor) and t.shape.is_fully_defined())


def _concatenable(a, b):
    """Same structure of dense tensors, equal in everything but the batch size."""
    try:
        tf.nest.assert_same_structure(a, b)
    except (TypeError, ValueError):
        return False
    return all(isinstance(x, tf.Tensor) and isinstance(y, tf.Tensor) and x.dtype == y.dtype
               and x.shape.rank and x.shape[1:] == y.shape[1:] and x.shape[1:].is_fully_defined()
               for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)))


def _concatenated(batches):
    if len(batches) == 1:
        return batches[0]
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *batches)


def _features(element):
    """The model inputs ``x`` of a batch (of ``(x, y[, sample_weight])`` tuples too)."""
    if isinstance(element, (tuple, list)):
        element = element[0]
    return tf.nest.map_structure(tf.convert_to_tensor, element)


def _has_layer_graph(model):
    """True for Sequential and functional models (they have symbolic inputs)."""
    try:
        return bool(model.inputs)
    except AttributeError:  # subclassed models and plain layers
        return False


def _check_batched(model, x):
    """Refuse single examples where the model's input rank says what a batch is."""
    try:
        inputs = model.inputs
    except AttributeError:  # subclassed models and plain layers have no symbolic inputs
        return
    if not inputs or len(inputs) != 1 or not isinstance(x, tf.Tensor):
        return
    expected = inputs[0].shape
    if x.shape.rank == len(expected) - 1:
        raise ValueError(
            f"initialize: a batch of `data` has shape {tuple(x.shape)}, one axis less than the "
            f"model's input {tuple(expected)}: `data` seems to yield single examples, not "
            "batches. Batch it first, e.g. `dataset.batch(n)`.")


class _StopForward(BaseException):
    """Ends a traced forward pass at the layer being initialised. A ``BaseException``,
    so that an ``except Exception`` in model code cannot swallow it."""


class _NotTraceable(BaseException):
    """A layer's inputs were seen inside a loop or branch of the traced model."""


def _initialize_in_one_pass(model, targets, batch):
    """Initialises ``targets`` (each called once per forward pass) in one eager
    forward pass of ``model`` on ``batch``: each layer from its inputs, which the
    layers before it have already normalised."""

    def initializer(layer):
        return lambda inputs, mask: layer._state.assign_from_moments(
            _stats.moments(inputs, layer.axis, mask))

    with _collecting({layer: initializer(layer) for layer in targets}):
        _run(model, batch)


def _run(model, batch):
    """``model`` in inference mode. Under a name scope: in a traced function's root
    scope, a model whose name starts with "_" (Keras' name for a class ``_Model``)
    would be refused as a root scope name."""
    with tf.name_scope("initialize"):
        model(batch, training=False)


def _reachable(seen):
    """False if tensors in ``seen`` belong to a graph other than the one being traced
    (the model's own loop or branch): the function's output cannot reach them."""
    if tf.executing_eagerly():
        return True
    graph = tf.compat.v1.get_default_graph()
    return all(t.graph is graph for t in tf.nest.flatten(seen) if t is not None)


def _combined(layer, seen):
    """The moments of all of ``layer``'s calls in ``seen``, in its statistics dtype."""
    moments = _zero_moments(layer)
    for one in seen:
        one = _stats.Moments(*(tf.cast(t, moments.count.dtype) for t in one))
        moments = _stats.combine(moments, one)
    return moments


def _zero_moments(layer):
    zeros = tf.zeros(layer.initial_bias.shape, _stats.stats_dtype(layer.compute_dtype))
    return _stats.Moments(zeros, zeros, zeros)


class _PrefixPass:
    """One layer's pass: a ``tf.function``, traced once for the layer (not per batch),
    that runs the model up to ``layer`` and returns the moments of its inputs.

    The trace stops at the layer: once its inputs are seen, the collecting hook raises
    ``_StopForward``, so the rest of the model is neither traced nor run. A layer that
    a forward pass calls more than once (``stop=False``) gets the whole forward pass,
    so that every call's inputs count. A layer called inside the model's own control
    flow (an RNN cell's loop, a ``tf.cond`` branch) cannot hand its statistics out of
    that graph: its pass runs eagerly (slower, same result).
    """

    def __init__(self, model, layer, stop):
        self.model, self.layer, self.stop = model, layer, stop
        self._seen = []
        # reduce_retracing: batches of other shapes (a last, smaller batch; batches
        # padded to their longest sequence) retrace once, leaving those sizes unknown.
        self._function = tf.function(self._batch_moments, reduce_retracing=True, autograph=False)

    def run(self, spec, source, advance):
        """The moments over all of ``source``'s batches (``spec``: a batch's spec, its
        batch size unknown); ``advance(n)`` after each ``n`` batches."""
        with _collecting({self.layer: self._collect}):
            step = self._function
            try:
                step.get_concrete_function(spec)
            except _NotTraceable:
                step = self._batch_moments  # eagerly
            moments = _zero_moments(self.layer)
            for batch, count in source.merged_batches():
                moments = _stats.combine(moments, step(batch))
                advance(count)
        return moments

    def _collect(self, inputs, mask):
        self._seen.append(_stats.moments(inputs, self.layer.axis, mask))
        if self.stop:
            raise _StopForward

    def _batch_moments(self, batch):
        self._seen.clear()
        try:
            _run(self.model, batch)
        except _StopForward:
            pass
        if not _reachable(self._seen):
            raise _NotTraceable
        return _combined(self.layer, self._seen)


class _WholeModelPasses:
    """All layers' passes run by one ``tf.function``, traced once for the model.

    The function runs the whole model in inference mode and returns the moments of
    the inputs of one layer: the one whose index in ``targets`` is its ``target``
    argument. Layers before the target read their variables, already assigned by
    the earlier passes. Each pass therefore runs the whole model, also after its
    layer, but the model is traced once instead of once per layer (``initialize``
    chooses between the two by their measured cost).

    One set of moments ops serves every layer, so that the trace costs little more
    than the model's: each layer's collecting hook slices its inputs to all of the
    batch in its own pass and to no rows in the others (no ``tf.cond``, whose branch
    functions would cost more to trace and instantiate than the model), flattens
    them to ``[positions, channels]`` padded to the widest layer, and the moments
    are those of the concatenation, which only the target fills.
    """

    def __init__(self, model, targets):
        self.model, self.targets = model, targets
        self.channels = [int(layer.initial_bias.shape[0]) for layer in targets]
        dtypes = {_stats.stats_dtype(layer.compute_dtype) for layer in targets}
        self.dtype = tf.float64 if tf.float64 in dtypes else tf.float32
        self.width = max(self.channels)
        self._hooks = {layer: functools.partial(self._collect, index)
                       for index, layer in enumerate(targets)}
        self.trace_seconds = None
        self._target = self._seen = None
        self._function = tf.function(self._batch_moments, reduce_retracing=True, autograph=False)

    def trace(self, spec, batch):
        """Traces the function for batches like ``spec`` and runs it on ``batch``,
        timing both (what a layer's own function costs too). False if a layer is
        called inside the model's own loop or branch: the function cannot return
        its statistics."""
        start = time.perf_counter()
        with _collecting(self._hooks):
            try:
                self._function.get_concrete_function(spec, tf.TensorSpec([], tf.int32))
            except _NotTraceable:
                return False
            self._function(batch, tf.constant(0))
        self.trace_seconds = time.perf_counter() - start
        return True

    def run(self, index, source, advance):
        target = tf.constant(index)
        moments = _zero_moments(self.targets[index])
        with _collecting(self._hooks):
            for batch, count in source.merged_batches():
                padded = self._function(batch, target)
                batch_moments = _stats.Moments(
                    *(tf.cast(t[:self.channels[index]], moments.count.dtype) for t in padded))
                moments = _stats.combine(moments, batch_moments)
                advance(count)
        return moments

    def _collect(self, index, inputs, mask):
        rows = tf.where(tf.equal(self._target, index), tf.shape(inputs)[0], 0)
        inputs = inputs[:rows]
        rank, axis = inputs.shape.rank, self.targets[index].axis % inputs.shape.rank
        weights = _stats._weights(inputs, None if mask is None else mask[:rows], axis)
        if axis != rank - 1:  # channels last
            order = [i for i in range(rank) if i != axis] + [axis]
            inputs = tf.transpose(inputs, order)
            if weights is not None:
                weights = tf.transpose(weights, order)
        values = tf.reshape(tf.cast(inputs, self.dtype), [-1, self.channels[index]])
        values = tf.pad(values, [[0, 0], [0, self.width - self.channels[index]]])
        if weights is not None:
            weights = tf.reshape(tf.broadcast_to(tf.cast(weights, self.dtype),
                                                 tf.concat([tf.shape(inputs)[:-1], [1]], 0)), [-1])
        self._seen.append((values, weights))

    def _batch_moments(self, batch, target):
        self._target = target
        self._seen = []
        _run(self.model, batch)
        if not _reachable(self._seen):
            raise _NotTraceable
        values = tf.concat([values for values, _ in self._seen], 0)
        weights = None
        if any(w is not None for _, w in self._seen):
            weights = tf.concat([tf.ones(tf.shape(v)[:1], self.dtype) if w is None else w
                                 for v, w in self._seen], 0)
        return _stats.moments(values, -1, weights)


@contextlib.contextmanager
def _collecting(hooks):
    """While active, each layer in ``hooks`` hands each call's inputs and mask to its
    hook (and skips its own initialisation)."""
    for layer, hook in hooks.items():
        layer._collect_moments = hook
    try:
        yield
    finally:
        for layer in hooks:
            layer._collect_moments = None


def _actnorm_layers_in_call_order(model, batch):
    """ActNorm layers of ``model`` in the order a forward pass first calls them, and
    how many times one forward pass calls each."""
    layers = [layer for layer in _all_layers(model) if isinstance(layer, ActNorm)]
    if not layers:
        raise ValueError(f"initialize: {getattr(model, 'name', model)!r} has no ActNorm layer")
    called = []
    try:
        with _collecting({layer: lambda *_, layer=layer: called.append(layer) for layer in layers}):
            model(batch, training=False)
    except Exception as error:
        if hasattr(error, "add_note"):  # Python 3.11+
            shapes = tf.nest.map_structure(lambda t: tuple(t.shape), batch)
            error.add_note(
                f"tf_actnorm.initialize: the model failed on the first batch of `data` (shape "
                f"{shapes}). If `data` yields single examples rather than batches, batch it "
                "first, e.g. `dataset.batch(n)`.")
        raise
    calls = collections.Counter(called)
    return list(dict.fromkeys(called)), calls


def _all_layers(layer):
    found = [layer]
    for child in getattr(layer, "_flatten_layers", lambda **_: [])(include_self=False, recursive=True):
        found.append(child)
    return found
