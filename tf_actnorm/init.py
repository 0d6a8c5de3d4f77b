"""Data-dependent initialisation from many batches, on every Keras backend.

Glow initialised ActNorm on a larger batch than it trained with. ``initialize``
does that for any Keras model without holding the data in memory: exact
streaming per-channel moments (Chan et al.'s parallel combination of count, mean
and sum of squared deviations), one ActNorm layer after another in data-flow
order, so each layer's statistics are those of its inputs *after* the earlier
layers were initialised — the same values (to rounding) as a single init batch
made of all those batches.

How it runs:

* The layers are found by running the model once on the first batch, in inference
  mode, while every ActNorm call reports to a collector (``ActNorm.call`` consults
  :data:`tf_actnorm.layer.moments_collector`, a context variable): the layers a
  forward pass calls, in the order it first calls them, and how often.
* All the data in at most ``_MERGE_BYTES`` of model inputs, each layer called once
  per forward pass: the batches are concatenated and one eager forward pass
  initialises every layer from its inputs before they go on, as a first training
  call on that batch would.
* Otherwise one pass over the data per layer, a run of batches in memory at a time
  (runs of small batches concatenated up to ``_MERGE_BYTES``): a layer's inputs
  depend on the earlier layers' final parameters. Every pass runs a function compiled
  once where the backend compiles (``tf.function`` on TensorFlow, for the model;
  ``jax.jit`` of ``stateless_call`` on JAX, one per half of the layers; eager on
  PyTorch), whose ``target`` argument selects the layer: each ActNorm call computes
  its moments inside ``ops.cond(target == index)``, so a pass computes only its own
  layer's statistics, over every call of that layer (shared layers,
  ``TimeDistributed``). Compiled passes compute two runs at once.
* A layer that the model calls inside its own control flow under ``tf.function`` (a
  ``tf.cond`` branch, an RNN cell's loop) has its inputs in a graph of that control
  flow, which the function cannot return; its pass runs eagerly (same result).
"""

import collections
import concurrent.futures
import contextlib
import functools
import itertools
import math
import sys

import keras
import numpy as np
from keras import ops

from tf_actnorm import _formulas
from tf_actnorm import _ops
from tf_actnorm.layer import moments_collector


def initialize(model, data, steps=None, batch_size=32, force=False, verbose=1, direction=None):
    """Initialise the ActNorm layers of ``model`` from many batches, streaming.

    ``model`` may also be a normalising flow: a TensorFlow Probability distribution
    (such as a ``tfd.TransformedDistribution``) or bijector with ``ActNormBijector``
    bijectors in it (see "Flows" below).

    Every uninitialised, trainable ActNorm layer that a forward pass of ``model``
    calls (in nested models and layers too) is initialised, in the order a forward
    pass calls them, from its inputs over all the batches of ``data``: the result
    equals initialising from one batch made of all of them (one training call on
    it). A layer called several times per forward pass (shared, or inside
    ``TimeDistributed``) gets the statistics of all its calls' inputs. Runs on the
    TensorFlow, JAX and PyTorch Keras backends.

    Memory does not grow with the number of batches: the data is read one batch at a
    time (runs of small batches concatenated up to 1 MiB; compiled passes compute two
    runs side by side), once per layer, except for a one-shot generator (see ``data``).
    When all the batches together hold at most 1 MiB of model inputs they are
    concatenated and one forward pass initialises every layer. Concatenating
    batches changes only how many examples one inference call sees, not the
    statistics; a model whose inference output depends on which examples share a
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
            collection of batches (such as a list or a PyTorch ``DataLoader``), or a
            one-shot iterator or generator. A one-shot iterator cannot be re-read, so
            its batches are kept in memory for the later layers' passes. Elements
            that are ``(x, y)`` or ``(x, y, sample_weight)`` tuples contribute ``x``.
            Elements must be batches: batch a dataset of single examples with
            ``dataset.batch(n)`` first.
        steps: Number of batches to use (default: all). Required for endless data:
            an infinite ``tf.data.Dataset`` (e.g. made with ``.repeat()``), which is
            refused without it, and an endless generator, which would never end.
        batch_size: Batch size for numpy/tensor ``data``.
        force: Initialise every ActNorm layer, including layers that are already
            initialised and frozen layers (``trainable=False``, also when a parent
            was frozen). Without it both are left untouched.
        verbose: 1 shows a Keras ``Progbar`` counting layers x batches (a count
            without a total when the number of batches is unknown), and says so
            when there is nothing to initialise; 0 is silent.
        direction: For a bijector only, and required there: ``"forward"`` if the data
            go through ``bijector.forward``, ``"inverse"`` if through
            ``bijector.inverse`` (as ``TransformedDistribution.log_prob`` sends them).

    Returns:
        A dict mapping each initialised layer's name to
        ``{"mean_abs_bias": float, "mean_scale": float}`` (for a flow, each bijector's
        name, made unique in data order: ``act_norm``, ``act_norm_1``, ...).

    Raises:
        ValueError: ``steps`` is missing for an infinite dataset, ``data`` yields
            no batches or looks unbatched, ``model`` calls no ActNorm layer (a flow:
            its data reach no ActNormBijector), a layer's statistics cannot initialise
            it (no data for it, NaN or Inf), or ``direction`` is missing for a
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
    if _is_flow(model):
        from tf_actnorm import _flow_init  # noqa: PLC0415 (TensorFlow; it imports `_Source` from here)

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
               if force or (layer.trainable and not _is_initialized(layer))]
    if not targets:
        if verbose:
            print(f"tf_actnorm.initialize: nothing to initialise: every ActNorm layer of "
                  f"{getattr(model, 'name', model)!r} is initialised or frozen "
                  "(force=True initialises them again)")
        return {}
    source.keep_for_passes(len(targets))
    total = None if source.num_batches is None else len(targets) * source.num_batches
    progress = keras.utils.Progbar(total, verbose=verbose, unit_name="batch")
    progress.update(0)
    done = 0

    def advance(batches):
        nonlocal done
        done += batches
        progress.update(done)

    union = source.union() if all(calls[id(layer)] == 1 for layer in targets) else None
    if union is not None:
        _initialize_in_one_pass(model, targets, union[0])
        advance(len(targets) * union[1])
    else:
        with pass_pool() as pool:
            passes = _Passes(model, targets, first, pool)
            for index, layer in enumerate(targets):
                _assign_from_moments(layer, passes.run(index, source, advance))
    progress.update(done, finalize=True)
    return {layer.name: {
        "mean_abs_bias": float(np.mean(np.abs(ops.convert_to_numpy(layer.bias)))),
        "mean_scale": float(np.mean(np.exp(ops.convert_to_numpy(layer.log_scale)))),
    } for layer in targets}


def _is_flow(obj):
    """True for a TFP distribution or bijector. Asks TFP only where something imported it
    already: a flow cannot exist before that, and no other backend needs TensorFlow."""
    tfp = sys.modules.get("tensorflow_probability")
    return tfp is not None and isinstance(
        obj, (tfp.distributions.Distribution, tfp.bijectors.Bijector))


class _Source:
    """The batches of ``data``: a fresh iterator of model inputs for each pass."""

    def __init__(self, data, steps, batch_size):
        self.num_batches = None  # None: unknown until read
        self._one_shot = False
        tf = sys.modules.get("tensorflow")  # a tf.data.Dataset implies TensorFlow is imported
        if tf is not None and isinstance(data, tf.data.Dataset):
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
        elif isinstance(data, np.ndarray) or ops.is_tensor(data):
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
        return _as_tensors(_features(element))

    def keep_for_passes(self, passes):
        if self._one_shot and passes > 1:
            self._kept = []

    def batches(self):
        """The batches' model inputs; numpy arrays stay numpy, for ``merged_batches``."""
        return (_features(element) for element in self._open())

    def merged_batches(self, limit=None):
        """``(batch, n)``: the batches, runs of ``n`` small ones concatenated into one
        of up to ``_MERGE_BYTES``, or ``limit`` where that is smaller. The moments do
        not depend on how the data is split, and one call on a larger batch costs much
        less than several calls: for small batches the per-op overhead dominates a
        forward pass."""
        limit = _MERGE_BYTES if limit is None else min(limit, _MERGE_BYTES)
        pending, size = [], 0
        for batch in self.batches():
            if pending and (size + _nbytes(batch) > limit
                            or not _concatenable(pending[0], batch)):
                yield _as_tensors(_concatenated(pending)), len(pending)
                pending, size = [], 0
            pending.append(batch)
            size += _nbytes(batch)
        if pending:
            yield _as_tensors(_concatenated(pending)), len(pending)

    def union(self):
        """``(batch, n)``: all ``n`` batches concatenated, if that fits in
        ``_MERGE_BYTES``; else ``None``."""
        if self._one_shot and self._kept is None:
            return None  # one pass: what the peek reads would be lost
        merged = self.merged_batches()
        union = next(merged)
        return union if next(merged, None) is None else None

    def _read_once(self):
        # What was read before (kept if more than one pass needs it), then the rest.
        yield from self._kept or ()
        for element in self._unread:
            if self._kept is not None:
                self._kept.append(element)
            yield element


# Batches are concatenated up to this size of model inputs: large enough that small
# batches no longer pay the per-op overhead, small enough not to matter for memory.
_MERGE_BYTES = 1 << 20

# A pass compiled by `jax.jit` for a CPU has no per-op overhead to amortise, and its
# activations stay in the CPU's caches on runs this small, where 1 MiB runs spill them.
_JIT_CPU_RUN_BYTES = 1 << 18

# `jax.jit`-compiled pass functions, each for a share of the target layers. A function
# computes the model up to its last target: more functions mean shorter prefixes, but
# each one compiles (see docs/benchmarks.md).
_JIT_FUNCTIONS = 2

_PassPlan = collections.namedtuple("_PassPlan", "run_bytes functions side_by_side")


def _pass_plan():
    """How compiled passes run on this backend: ``run_bytes``, the size of the runs of
    batches one call takes (None: ``_MERGE_BYTES``); ``functions``, among how many
    compiled functions the target layers are shared (one trace on TensorFlow);
    ``side_by_side``, whether two runs are computed at once (not on PyTorch, which runs
    eagerly and spreads each op over the cores already)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax  # noqa: PLC0415 (the JAX backend only)

        cpu = jax.default_backend() == "cpu"
        return _PassPlan(_JIT_CPU_RUN_BYTES if cpu else None, _JIT_FUNCTIONS, True)
    return _PassPlan(None, 1, backend == "tensorflow")


def _itemsize(dtype):
    dtype = keras.backend.standardize_dtype(dtype)
    return 1 if dtype == "bool" else int("".join(c for c in dtype if c.isdigit())) // 8


def _nbytes(batch):
    return sum(math.prod(t.shape) * _itemsize(t.dtype) for t in keras.tree.flatten(batch))


def _concatenable(a, b):
    """Same structure of tensors, equal in everything but the batch size."""
    if type(a) is not type(b):
        return False
    a, b = keras.tree.flatten(a), keras.tree.flatten(b)
    return len(a) == len(b) and all(
        len(x.shape) > 0 and tuple(x.shape[1:]) == tuple(y.shape[1:]) and x.dtype == y.dtype
        for x, y in zip(a, b))


def _concatenated(batches):
    """Numpy arrays are concatenated by numpy: one conversion to a tensor per run, not one
    per batch, which costs more than the forward pass for small batches (JAX)."""
    if len(batches) == 1:
        return batches[0]

    def concatenate(*parts):
        if all(isinstance(part, np.ndarray) for part in parts):
            return np.concatenate(parts, axis=0)
        return ops.concatenate(parts, axis=0)

    return keras.tree.map_structure(concatenate, *batches)


def _features(element):
    """The model inputs ``x`` of a batch (of ``(x, y[, sample_weight])`` tuples too):
    numpy arrays as they are, anything else as tensors of the backend."""
    if isinstance(element, (tuple, list)):
        element = element[0]
    return keras.tree.map_structure(
        lambda t: t if isinstance(t, np.ndarray) else ops.convert_to_tensor(t), element)


def _as_tensors(batch):
    return keras.tree.map_structure(ops.convert_to_tensor, batch)


def _check_batched(model, x):
    """Refuse single examples where the model's input rank says what a batch is."""
    inputs = getattr(model, "inputs", None)  # subclassed models and layers have none
    if not inputs or len(inputs) != 1 or not ops.is_tensor(x):
        return
    expected = inputs[0].shape
    if len(x.shape) == len(expected) - 1:
        raise ValueError(
            f"initialize: a batch of `data` has shape {tuple(x.shape)}, one axis less than the "
            f"model's input {tuple(expected)}: `data` seems to yield single examples, not "
            "batches. Batch it first, e.g. `dataset.batch(n)`.")


def _is_initialized(layer):
    return bool(ops.convert_to_numpy(layer.initialized))


def _moments(layer, inputs, mask):
    """``(count, mean, m2)`` of one call's inputs, in the layer's statistics dtype."""
    moments = _ops.moments(inputs, layer.axis, mask)
    return tuple(ops.cast(t, _formulas.stats_dtype(layer.compute_dtype)) for t in moments)


@contextlib.contextmanager
def _collecting(collect):
    """While active, every ActNorm call hands ``(layer, inputs, mask)`` to ``collect``
    (and does not initialise itself)."""
    token = moments_collector.set(collect)
    try:
        yield
    finally:
        moments_collector.reset(token)


def _no_grad():
    if keras.backend.backend() == "torch":
        import torch  # noqa: PLC0415 (the torch backend only)

        return torch.no_grad()
    return contextlib.nullcontext()


def _run(model, batch):
    """``model`` in inference mode. Under a name scope: in a traced TensorFlow function's
    root scope, a model whose name starts with "_" would be refused as a scope name."""
    with keras.name_scope("initialize"), _no_grad():
        return model(batch, training=False)


def add_first_batch_note(error, what, batch):
    """Adds to ``error`` (Python 3.11+) that ``what`` (the model, the flow) failed on the
    first batch of ``data``, with its shape and the usual cause: unbatched data."""
    if hasattr(error, "add_note"):
        shapes = keras.tree.map_structure(lambda t: tuple(t.shape), batch)
        error.add_note(
            f"tf_actnorm.initialize: the {what} failed on the first batch of `data` (shape "
            f"{shapes}). If `data` yields single examples rather than batches, batch it "
            "first, e.g. `dataset.batch(n)`.")


def _actnorm_layers_in_call_order(model, batch):
    """The ActNorm layers a forward pass of ``model`` calls, in the order it first calls
    them, and how many times it calls each (by ``id``)."""
    called = []
    try:
        with _collecting(lambda layer, inputs, mask: called.append(layer)):
            _run(model, batch)
    except Exception as error:
        add_first_batch_note(error, "model", batch)
        raise
    if not called:
        raise ValueError(f"initialize: {getattr(model, 'name', model)!r} has no ActNorm layer "
                         "that its forward pass calls")
    calls = {}
    for layer in called:
        calls[id(layer)] = calls.get(id(layer), 0) + 1
    return list({id(layer): layer for layer in called}.values()), calls


def _assign_from_moments(layer, moments):
    """Assign the parameters that standardise data with these moments (eagerly); raise
    ``ValueError`` naming the layer, changing nothing, when they cannot."""
    layer._state.assign_from_moments(_ops.Moments(*moments))


def _initialize_in_one_pass(model, targets, batch):
    """Initialises ``targets`` (each called once per forward pass) in one eager forward
    pass of ``model`` on ``batch``: each layer from its inputs, which the layers before
    it have already normalised."""
    wanted = {id(layer) for layer in targets}

    def initialize_layer(layer, inputs, mask):
        if id(layer) in wanted:
            _assign_from_moments(layer, _moments(layer, inputs, mask))

    with _collecting(initialize_layer):
        _run(model, batch)


class _Passes:
    """Every layer's pass through a function of ``(batch, target)`` compiled once for a
    group of consecutive target layers (all of them; on JAX, each half): the model in
    inference mode, returning per layer of the group the moments of its inputs over
    all its calls; only the layer whose index is ``target`` computes them
    (``ops.cond``), the others return zeros. A function returns nothing that the
    layers after its group's last one compute, so XLA leaves them out (JAX): the
    passes of early layers compute a prefix of the model.

    A compiled pass computes two runs of batches at once in ``pool``: its ops are
    mostly small and one after another, so a single call leaves a core idle. A run of
    a shape that the function has not run yet is computed in the calling thread, so
    that the function is compiled (JAX: once per shape of run) in the caller's
    context (``keras.distribution``, device scopes), and once.
    """

    def __init__(self, model, targets, first, pool):
        self.model, self.targets, self._first = model, targets, first
        self._index = {id(layer): i for i, layer in enumerate(targets)}
        self._eager_only = set()  # layers whose inputs a traced pass cannot return
        plan = _pass_plan()
        self._run_bytes, self._pool = plan.run_bytes, pool if plan.side_by_side else None
        per_function = -(-len(targets) // plan.functions)
        self._groups = [range(start, min(start + per_function, len(targets)))
                        for start in range(0, len(targets), per_function)]
        self._steps = {}  # group start -> its compiled function, made by its first pass
        self._shapes = collections.defaultdict(set)  # group start -> shapes of runs it ran

    def run(self, index, source, advance):
        """The moments of ``targets[index]``'s inputs over all of ``source``'s batches;
        ``advance(n)`` after each ``n`` batches. They are combined in data order."""
        group = next(g for g in self._groups if index in g)
        if group.start not in self._steps:  # traced here on TensorFlow: finds `_eager_only`
            self._steps[group.start] = _compile(
                functools.partial(self._all_moments, group=group), self.model, self._first)
        if index in self._eager_only:
            group = range(index, index + 1)
            step = functools.partial(self._eager_pass, index=index, group=group)
            runs = source.merged_batches()
        else:
            step = functools.partial(self._steps[group.start], index=index)
            runs = ((_distributed(batch), n) for batch, n in source.merged_batches(self._run_bytes))

        def moments(batch):
            # As numpy: [C] vectors, combined on the host without a dispatch per op.
            return tuple(ops.convert_to_numpy(t) for t in step(batch)[index - group.start])

        def new_shape(batch):
            shapes, shape = self._shapes[group.start], _shape(batch)
            is_new = shape not in shapes
            shapes.add(shape)
            return is_new

        pool = None if index in self._eager_only else self._pool
        results = two_at_a_time(pool, moments, runs, in_caller=new_shape)
        total = None
        for run_moments, count in results:
            total = run_moments if total is None else _formulas.combine(np, total, run_moments)
            advance(count)
        return total

    def _eager_pass(self, batch, index, group):
        """The pass of a layer whose inputs a traced pass cannot return (TensorFlow)."""
        with _no_grad():
            return self._all_moments(lambda: _run(self.model, batch), index, group)

    def _zeros(self, index):
        layer = self.targets[index]
        # A plain tuple, the structure `_moments` gives (both are branches of one cond).
        return tuple(_ops.zero_moments(int(layer.initial_bias.shape[0]), layer.compute_dtype))

    def _all_moments(self, forward, target, group):
        """Runs ``forward()`` collecting the moments of the layers of ``group`` (a range of
        indices); ``target`` is an int (eager) or a scalar tensor."""
        seen = {}
        traced = not isinstance(target, int)
        reachable = _reachability()

        def collect(layer, inputs, mask):
            index = self._index.get(id(layer))
            if index is None or index not in group:
                return
            if not traced:
                if index != target:
                    return
                moments = _moments(layer, inputs, mask)
            elif not reachable():
                self._eager_only.add(index)
                return
            else:
                moments = ops.cond(ops.equal(target, index),
                                   lambda: _moments(layer, inputs, mask),
                                   lambda: self._zeros(index))
            seen[index] = (moments if index not in seen
                           else _formulas.combine(ops, seen[index], moments))

        with _collecting(collect):
            forward()
        return tuple(seen.get(i, self._zeros(i)) for i in group)


def _reachability():
    """A check, made where a traced pass starts, that what is computed later is computed
    in the traced function's own graph, not in a loop or branch of the model's, which
    the function cannot return from (TensorFlow)."""
    if keras.backend.backend() != "tensorflow":
        return lambda: True
    import tensorflow as tf  # noqa: PLC0415 (the TensorFlow backend only)

    if tf.executing_eagerly():
        return lambda: True
    graph = tf.compat.v1.get_default_graph()
    return lambda: tf.compat.v1.get_default_graph() is graph


def _compile(all_moments, model, first):
    """``step(batch, target_index)``: ``all_moments`` run on the model, compiled where the
    backend compiles (traced once; other batch sizes retrace at most once on TensorFlow,
    and compile once per batch shape on JAX)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        function = tf.function(lambda batch, target: all_moments(lambda: _run(model, batch), target),
                               reduce_retracing=True, autograph=False)
        # Traced now for any batch size (merged runs and a smaller last batch share it).
        spec = tf.nest.map_structure(lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), first)
        function.get_concrete_function(spec, tf.TensorSpec([], tf.int32))
        return lambda batch, index: function(batch, tf.constant(index, tf.int32))
    if backend == "jax":
        import jax  # noqa: PLC0415

        def stateless(trainable, non_trainable, batch, target):
            def forward():
                with keras.name_scope("initialize"):
                    model.stateless_call(trainable, non_trainable, batch, training=False)
            return all_moments(forward, target)

        jitted = jax.jit(stateless)

        def step(batch, index):
            # The variables are read on every call: each pass sees the layers that the
            # earlier passes initialised.
            return jitted([v.value for v in model.trainable_variables],
                          [v.value for v in model.non_trainable_variables],
                          batch, np.int32(index))

        return step

    def eager(batch, index):
        with _no_grad():
            return all_moments(lambda: _run(model, batch), index)

    return eager


def pass_pool():
    """The threads that compute two runs of a compiled pass at once (see ``two_at_a_time``)."""
    return concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="initialize")


def two_at_a_time(pool, fn, runs, in_caller=None):
    """``(fn(batch), n)`` for each ``(batch, n)`` of ``runs``, in order, with up to two
    calls of ``fn`` running in ``pool`` while the next run is read. A run for which
    ``in_caller(batch)`` is true, and every run when ``pool`` is None, is computed in
    the calling thread instead."""
    pending = collections.deque()
    for batch, count in runs:
        if pool is None or (in_caller is not None and in_caller(batch)):
            future = concurrent.futures.Future()
            future.set_result(fn(batch))
        else:
            future = pool.submit(fn, batch)
        pending.append((future, count))
        if len(pending) == 2:
            future, n = pending.popleft()
            yield future.result(), n
    for future, n in pending:
        yield future.result(), n


def _shape(batch):
    return tuple((tuple(t.shape), str(t.dtype)) for t in keras.tree.flatten(batch))


def _distributed(batch):
    """Under ``keras.distribution`` (JAX), ``batch`` laid out as the distribution lays
    out a training batch (split over the devices by ``DataParallel``), so the sums over
    it are all-reduced over the devices, as in a training step. A batch that does not
    split evenly stays whole: the statistics are the same, on one device."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return batch

    def lay_out(tensor):
        layout = distribution.get_data_layout(tensor.shape)
        split = math.prod(layout.device_mesh.shape[layout.device_mesh.axis_names.index(axis)]
                          for axis in layout.axes[:1] if axis is not None)
        if tensor.shape[0] % split:
            return tensor
        return keras.distribution.distribute_tensor(tensor, layout)

    return keras.tree.map_structure(lay_out, batch)
