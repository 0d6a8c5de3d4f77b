"""Data-dependent initialisation from several batches.

Glow initialised ActNorm on a larger batch than it trained with. ``initialize``
does that for any Keras model without holding the large batch in memory: exact
streaming per-channel moments (Chan et al.'s parallel combination of count, mean
and sum of squared deviations), one ActNorm layer after another in data-flow
order, so each layer's statistics are those of its inputs *after* the earlier
layers were initialised — the same values (to rounding) as a single init batch
made of all those batches.
"""

import itertools

import keras
import numpy as np
import tensorflow as tf

from tf_actnorm import _stats
from tf_actnorm.layer import ActNorm


def initialize(model, data, steps=None, batch_size=32, force=False, verbose=1):
    """Initialise every (uninitialised) ActNorm layer of ``model`` from several batches.

    Args:
        model: A built Keras model (nested models are searched too) or layer.
        data: A ``tf.data.Dataset``, a numpy array / tensor (split into
            ``batch_size`` batches), or an iterable of batches. Elements that are
            ``(x, y)`` or ``(x, y, sample_weight)`` tuples contribute ``x``.
        steps: Number of batches to use (default: all). Generators are read once
            and their batches kept in memory for the per-layer passes.
        batch_size: Batch size for numpy/tensor ``data``.
        force: Re-initialise layers that are already initialised too.
        verbose: 1 shows a Keras ``Progbar``, 0 is silent.

    Returns:
        A dict mapping each initialised layer's name to
        ``{"mean_abs_bias": float, "mean_scale": float}``.

    Example:

    ```python
    summary = tf_actnorm.initialize(model, train_dataset, steps=8)
    model.fit(train_dataset)  # ActNorm does not initialise again
    ```
    """
    batches = _batches(data, steps, batch_size)
    if not batches:
        raise ValueError("initialize: `data` yielded no batches")
    order = _actnorm_layers_in_call_order(model, batches[0])
    targets = [layer for layer in order if force or not bool(layer.initialized.numpy())]
    progress = keras.utils.Progbar(len(targets) * len(batches), verbose=verbose, unit_name="batch")
    summary = {}
    for layer in targets:
        moments = []

        def collect(inputs, mask, layer=layer):
            moments.append(_stats.moments(inputs, layer.axis, mask))

        with _collecting(layer, collect):
            for batch in batches:
                model(batch, training=False)
                progress.add(1)
        total = moments[0]
        for m in moments[1:]:
            total = _stats.combine(total, m)
        layer._state.assign_from_moments(total)
        summary[layer.name] = {
            "mean_abs_bias": float(np.mean(np.abs(layer.bias.numpy()))),
            "mean_scale": float(np.mean(np.exp(layer.log_scale.numpy()))),
        }
    return summary


def _batches(data, steps, batch_size):
    if isinstance(data, (np.ndarray, tf.Tensor)):
        data = [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    batches = []
    for element in itertools.islice(iter(data), steps):
        if isinstance(element, (tuple, list)):
            element = element[0]
        batches.append(element)
    return batches


class _collecting:
    """While active, ``layer`` hands each call's inputs and mask to ``fn``."""

    def __init__(self, layer, fn):
        self.layer, self.fn = layer, fn

    def __enter__(self):
        self.layer._collect_moments = self.fn

    def __exit__(self, *exc):
        self.layer._collect_moments = None


def _actnorm_layers_in_call_order(model, batch):
    """ActNorm layers of ``model`` in the order a forward pass calls them."""
    layers = [layer for layer in _all_layers(model) if isinstance(layer, ActNorm)]
    if not layers:
        raise ValueError(f"initialize: {getattr(model, 'name', model)!r} has no ActNorm layer")
    order = []
    contexts = [_collecting(layer, lambda *_, layer=layer: order.append(layer)) for layer in layers]
    for context in contexts:
        context.__enter__()
    try:
        model(batch, training=False)
    finally:
        for context in contexts:
            context.__exit__()
    seen = []
    for layer in order:  # a layer called twice counts once, at its first call
        if layer not in seen:
            seen.append(layer)
    return seen


def _all_layers(layer):
    found = [layer]
    for child in getattr(layer, "_flatten_layers", lambda **_: [])(include_self=False, recursive=True):
        found.append(child)
    return found
