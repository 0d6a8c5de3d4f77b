"""Input checks shared by the layer and the bijector, and when runtime assertions are built.

Static checks raise ``ValueError`` naming the owner before any op is built, eagerly and
at trace time alike, so a wrong input never surfaces as an op error deep inside the
transform (``SelectV2`` broadcasting, ``Incompatible shapes``).
"""

import numpy as np

# This module is imported on every Keras backend: TensorFlow only inside `in_xla_context`,
# which only the TensorFlow path calls.


def in_xla_context():
    """True while tracing a function compiled by XLA (``jit_compile=True``), including
    its ``tf.cond``/``tf.while_loop`` branches and the functions it calls.

    XLA drops ``Assert`` ops and logs one ``Ignoring Assert operator`` line per op at
    every compile, so callers build no assertions there.
    """
    import tensorflow as tf  # noqa: PLC0415

    try:  # Private, but the only way to ask whether the current trace is compiled by XLA.
        from tensorflow.python.ops.control_flow_util import (  # noqa: PLC0415
            GraphOrParentsInXlaContext)
    except ImportError:  # pragma: no cover - a TensorFlow without it: assertions stay.
        return False
    if tf.executing_eagerly():
        return False
    return bool(GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def cannot_initialise(name, has_data):
    """The message for data that cannot initialise ActNorm ``name`` (``has_data``: False
    for an empty batch, True for data containing NaN or Inf), the same on every backend,
    for the layer, the bijector and the PyTorch module."""
    problem = "data containing NaN or Inf" if has_data else "an empty batch"
    return f"{name}: cannot initialise from {problem}"


def never_initialised_for_export(name):
    """The error raised when a model is exported for serving with an ActNorm that never
    initialised (every backend, every export route)."""
    return ValueError(
        f"ActNorm '{name}' was never initialised, so exporting it for serving would serve "
        "an identity transform (bias 0, scale 1). Initialise it before exporting: train "
        "it, call it on representative data in training mode (a bijector: `forward` or "
        "`inverse` on data), run `tf_actnorm.initialize`, or restore trained weights. To "
        "export it uninitialised on purpose, mark it initialised first: "
        "`initialized.assign(True)`.")


def check_input(shape, axis, channels, name, rank=None, min_rank=None):
    """Raise ``ValueError`` naming ``name`` when a static shape cannot be ActNorm's input.

    Args:
        shape: The input's static shape: a tuple of ints and Nones, or None (unknown
            rank), as :func:`static_shape` gives.
        axis: The channel axis (negative: counted from the end).
        channels: Expected size C of the channel axis.
        name: Name of the layer or bijector, put first in the message.
        rank: Required rank (the layer's built rank), or None.
        min_rank: Smallest rank allowed (the bijector's event rank), or None.

    Unknown ranks and unknown channel sizes pass: only static information is checked.
    """
    if shape is None:
        return
    if rank is not None and len(shape) != rank:
        raise ValueError(f"{name}: expected an input of rank {rank}, got shape {shape}")
    if min_rank is not None and len(shape) < min_rank:
        raise ValueError(
            f"{name}: expected an input of rank >= {min_rank} (channel axis {axis} of the "
            f"event), got shape {shape}")
    size = shape[axis]
    if size is not None and size != channels:
        raise ValueError(
            f"{name}: expected {channels} channels on axis {axis}, got {size} "
            f"(input shape {shape})")


def static_shape(x):
    """The static shape of a tensor (any backend), variable, array or nested list, as a
    tuple of ints and Nones, or None when the rank is unknown; builds no ops."""
    shape = getattr(x, "shape", None)
    if shape is None:
        try:
            shape = np.shape(x)
        except ValueError:  # a ragged list: let the op that converts it complain
            return None
    if getattr(shape, "rank", 0) is None:  # a tf.TensorShape of unknown rank
        return None
    return tuple(None if d is None else int(d) for d in shape)
