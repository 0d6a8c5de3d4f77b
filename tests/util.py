"""Helpers shared by the tests."""

import os
import signal

import numpy as np


def kill_process_group(proc):
    """Kill a subprocess and everything it started (it leads its own session), and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def snapshot(obj):
    """Numpy copies of an ActNorm layer's or bijector's (bias, log_scale, initialized),
    the parameters in use, followed by every variable behind them (a layer's five
    weights), so that "unchanged" covers the data-dependent parts and the residuals."""
    values = [obj.bias, obj.log_scale, obj.initialized]
    values += getattr(obj, "weights", None) or list(obj.variables)
    return tuple(np.array(v.numpy()) for v in values)


def assert_unchanged(before, after):
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b, a)


def numpy_init(x, axis=-1, epsilon=1e-6, valid=None):
    """Independent float64 re-computation of ActNorm's initial (bias, log_scale).

    ``valid``: optional bool array shaped like ``x`` without the channel axis.
    """
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    rows = x.reshape(-1, x.shape[-1])
    if valid is not None:
        rows = rows[np.asarray(valid, bool).reshape(-1)]
    return -rows.mean(0), -np.log(rows.std(0) + epsilon)


def assign_parameters(layer, bias=None, log_scale=None):
    """Set an ActNorm layer's parameters in use (``layer.bias`` / ``layer.log_scale``)
    through its trainable residuals, as training would move them."""
    for value, initial, residual in ((bias, layer.initial_bias, layer.bias_residual),
                                     (log_scale, layer.initial_log_scale, layer.log_scale_residual)):
        if value is not None:
            residual.assign(np.asarray(value, "float32") - np.asarray(initial.numpy()))


def channel_data(rng, shape, axis=-1, loc=3.0, scale=2.0):
    """Normal data whose channels (along ``axis``) have different means and stds, so a
    wrong axis cannot pass."""
    channels = shape[axis]
    cshape = [1] * len(shape)
    cshape[axis] = channels
    locs = (loc + np.arange(channels)).reshape(cshape)
    scales = (scale * (1 + np.arange(channels))).reshape(cshape)
    return (rng.normal(size=shape) * scales + locs).astype("float32")
