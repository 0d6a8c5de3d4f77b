"""Data-dependent initialisation from many batches.

Glow initialised ActNorm on a larger batch than it trained with. ``initialize``
does that for any Keras model without holding the data in memory: exact
streaming per-channel moments (Chan et al.'s parallel combination of count, mean
and sum of squared deviations), one ActNorm layer after another in data-flow
order, so each layer's statistics are those of its inputs *after* the earlier
layers were initialised — the same values (to rounding) as a single init batch
made of all those batches.

How a layer's pass runs, and why:

* One pass over the data per layer, one batch in memory at a time: a layer's
  inputs depend on the earlier layers' final parameters, so they cannot be
  computed before those layers have seen every batch.
* Each pass is a ``tf.function`` traced once per layer (not per batch) that
  carries the running moments from batch to batch as tensors. Tensors rather
  than ``tf.Variable`` accumulators: variables created under a
  ``tf.distribute`` strategy's scope would be mirrored.
* The trace stops at the layer: once its inputs are seen, the collecting hook
  raises ``_StopForward``, so the rest of the model is neither traced nor run
  (Sequential, functional and subclassed models alike). A layer that a forward
  pass calls more than once (a shared layer) gets the whole forward pass, so that
  every call's inputs count.
* A ``tf.data.Dataset`` is iterated inside the function, several batches per
  call: a Python loop calling the function once per batch costs about 1 ms per
  batch here, which dominates for small batches.
* A layer called inside the model's own control flow (an RNN cell's loop, a
  ``tf.cond`` branch) has its inputs in a graph of that control flow, out of reach
  of the function's output; its pass then runs eagerly (slower, same result).
"""

import collections
import itertools
import time

import keras
import numpy as np
import tensorflow as tf

from tf_actnorm import _stats
from tf_actnorm.layer import ActNorm


def initialize(model, data, steps=None, batch_size=32, force=False, verbose=1):
    """Initialise the ActNorm layers of ``model`` from many batches, streaming.

    Every uninitialised, trainable ActNorm layer of ``model`` (nested models and
    layers are searched too) is initialised, in the order a forward pass calls
    them, from its inputs over all the batches of ``data``: the result equals
    initialising from one batch made of all of them.

    Memory and time: the data is read once per layer, one batch at a time, so
    memory does not grow with the number of batches (except for a one-shot
    generator, see ``data``). Each layer's pass is a ``tf.function``, traced once
    per layer, that runs the model only up to that layer in inference mode. A
    model with ``L`` ActNorm layers therefore costs ``L`` traces plus ``L`` passes
    of its prefixes over the data: about ``L / 2`` forward passes per batch.

    Args:
        model: A Keras model or layer.
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

    Returns:
        A dict mapping each initialised layer's name to
        ``{"mean_abs_bias": float, "mean_scale": float}``.

    Raises:
        ValueError: ``steps`` is missing for an infinite dataset, ``data`` yields
            no batches or looks unbatched, or ``model`` has no ActNorm layer.

    Example:

    ```python
    summary = tf_actnorm.initialize(model, train_dataset, steps=16)
    model.fit(train_dataset)  # ActNorm does not initialise again
    ```
    """
    if steps is not None and (not isinstance(steps, (int, np.integer)) or steps < 1):
        raise ValueError(f"initialize: `steps` must be a positive integer or None, got {steps!r}")
    source = _Source(data, steps, batch_size)
    first = source.first()
    _check_batched(model, first)
    order, calls = _actnorm_layers_in_call_order(model, first)
    targets = [layer for layer in order
               if force or (layer.trainable and not bool(layer.initialized.numpy()))]
    if not targets:
        return {}
    source.keep_for_passes(len(targets))
    # Any batch size: a last, smaller batch uses the same trace.
    spec = tf.nest.map_structure(lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), first)
    total = None if source.num_batches is None else len(targets) * source.num_batches
    progress = keras.utils.Progbar(total, verbose=verbose, unit_name="batch")
    progress.update(0)
    done = 0

    def advance(batches):
        nonlocal done
        done += batches
        progress.update(done)

    summary = {}
    for layer in targets:
        step = _StatisticsStep(model, layer, stop=calls[layer] == 1)
        with step.collecting():
            moments = step.run(source, spec, advance)
        layer._state.assign_from_moments(moments)
        summary[layer.name] = {
            "mean_abs_bias": float(np.mean(np.abs(layer.bias.numpy()))),
            "mean_scale": float(np.mean(np.exp(layer.log_scale.numpy()))),
        }
    progress.update(done, finalize=True)
    return summary


class _Source:
    """The batches of ``data``: a fresh iterator of model inputs for each pass."""

    def __init__(self, data, steps, batch_size):
        self.num_batches = None  # None: unknown until read
        self.dataset = None  # a tf.data.Dataset is iterated inside the traced function
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
            self.dataset = data
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

    def _read_once(self):
        if self._unread is None:
            yield from self._kept or ()
            return
        for element in self._unread:
            if self._kept is not None:
                self._kept.append(element)
            yield element
        self._unread = None


def _features(element):
    """The model inputs ``x`` of a batch (of ``(x, y[, sample_weight])`` tuples too)."""
    if isinstance(element, (tuple, list)):
        element = element[0]
    return tf.nest.map_structure(tf.convert_to_tensor, element)


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
    """The layer's inputs were seen inside a loop or branch of the traced model."""


class _StatisticsStep:
    """The moments of ``layer``'s inputs over every batch of a source, combined in
    ``tf.function``s traced once per layer, while ``collecting``.

    A ``tf.data.Dataset`` is read inside the function, up to ``limit`` batches per
    call (sized to take about ``_CHUNK_SECONDS``, so that the progress bar moves):
    for small batches that runs several times faster than a Python loop that calls
    the function once per batch. Other sources are read in Python, one call per batch.
    """

    def __init__(self, model, layer, stop):
        self.model, self.layer, self.stop = model, layer, stop
        self._seen = []
        # reduce_retracing: batches of other shapes (e.g. padded to their longest
        # sequence) retrace once, with the dimensions that vary left unknown.
        self._batch_function = tf.function(self._step, reduce_retracing=True)
        self._chunk_function = tf.function(self._chunk)

    def collecting(self):
        return _collecting(self.layer, self._collect)

    def run(self, source, spec, advance):
        """The moments over all of ``source``'s batches (``spec``: a batch's spec, its
        batch size unknown); ``advance(n)`` after each ``n`` batches."""
        dtype = _stats.stats_dtype(self.layer.compute_dtype)
        zeros = tf.zeros(self.layer.bias.shape, dtype)
        moments = _stats.Moments(zeros, zeros, zeros)
        if source.dataset is not None:
            iterator = iter(source.dataset)
            if self._traceable(self._chunk_function, iterator, moments, tf.constant(1)):
                return self._run_chunks(iterator, moments, advance)
            step = self._step
        elif self._traceable(self._batch_function, spec, moments):
            step = self._batch_function
        else:
            step = self._step
        for batch in source.batches():
            moments = step(batch, moments)
            advance(1)
        return moments

    def _traceable(self, function, *args):
        """Traces ``function``; False if the layer is called inside a loop or branch
        of the model (e.g. in an RNN cell): its statistics are then collected eagerly."""
        try:
            function.get_concrete_function(*args)
        except _NotTraceable:
            return False
        return True

    def _run_chunks(self, iterator, moments, advance):
        limit = 1
        while True:
            start = time.perf_counter()
            moments, read = self._chunk_function(iterator, moments, tf.constant(limit))
            read = int(read)
            advance(read)
            if read < limit:
                return moments
            seconds = time.perf_counter() - start
            limit = int(min(max(limit * _CHUNK_SECONDS / max(seconds, 1e-6), 1), 2 * limit + 1))

    def _collect(self, inputs, mask):
        self._seen.append(_stats.moments(inputs, self.layer.axis, mask))
        if self.stop:
            raise _StopForward

    def _step(self, batch, moments):
        """``moments`` combined with those of the layer's inputs on ``batch``."""
        self._seen.clear()
        try:
            self.model(batch, training=False)
        except _StopForward:
            pass
        graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
        for seen in self._seen:
            if graph is not None and seen.count.graph is not graph:
                raise _NotTraceable
            seen = _stats.Moments(*(tf.cast(t, moments.count.dtype) for t in seen))
            moments = _stats.combine(moments, seen)
        return moments

    def _chunk(self, iterator, moments, limit):
        """Up to ``limit`` batches from ``iterator``: (moments, number of batches read)."""

        def body(read, more, moments):
            element = iterator.get_next_as_optional()
            more = element.has_value()
            moments = tf.cond(more, lambda: self._step(_features(element.get_value()), moments),
                              lambda: moments)
            return read + tf.cast(more, tf.int32), more, moments

        read, _, moments = tf.while_loop(
            lambda read, more, _: tf.logical_and(more, read < limit), body,
            (tf.constant(0), tf.constant(True), moments))
        return moments, read


# Aim of the time one call of a chunk function takes: short enough for the progress
# bar, long enough that the per-call overhead does not matter.
_CHUNK_SECONDS = 0.2


class _collecting:
    """While active, ``layer`` hands each call's inputs and mask to ``fn``."""

    def __init__(self, layer, fn):
        self.layer, self.fn = layer, fn

    def __enter__(self):
        self.layer._collect_moments = self.fn

    def __exit__(self, *exc):
        self.layer._collect_moments = None


def _actnorm_layers_in_call_order(model, batch):
    """ActNorm layers of ``model`` in the order a forward pass first calls them, and
    how many times one forward pass calls each."""
    layers = [layer for layer in _all_layers(model) if isinstance(layer, ActNorm)]
    if not layers:
        raise ValueError(f"initialize: {getattr(model, 'name', model)!r} has no ActNorm layer")
    called = []
    contexts = [_collecting(layer, lambda *_, layer=layer: called.append(layer)) for layer in layers]
    for context in contexts:
        context.__enter__()
    try:
        model(batch, training=False)
    except Exception as error:
        if hasattr(error, "add_note"):  # Python 3.11+
            shapes = tf.nest.map_structure(lambda t: tuple(t.shape), batch)
            error.add_note(
                f"tf_actnorm.initialize: the model failed on the first batch of `data` (shape "
                f"{shapes}). If `data` yields single examples rather than batches, batch it "
                "first, e.g. `dataset.batch(n)`.")
        raise
    finally:
        for context in contexts:
            context.__exit__()
    calls = collections.Counter(called)
    return list(dict.fromkeys(called)), calls


def _all_layers(layer):
    found = [layer]
    for child in getattr(layer, "_flatten_layers", lambda **_: [])(include_self=False, recursive=True):
        found.append(child)
    return found
