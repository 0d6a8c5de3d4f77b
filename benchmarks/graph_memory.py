"""How much memory a train step keeps: the GPU allocator's peak, or on a CPU a proxy
read off the traced graph.

On a GPU, ``gpu_step_peak_bytes`` reads ``tf.config.experimental``'s peak bytes
allocated during one step (after warm-up), above what was allocated before it. On a
CPU TensorFlow keeps no allocator statistics (``get_memory_info("CPU:0")`` reads 0),
so the proxy (``saved_for_backward_bytes``) is the bytes that the forward pass must
keep alive until the backward pass, read off the traced graph of loss and gradients:
forward ops are the data-flow ancestors of the loss, backward ops those of the
gradients less the forward ones, and every forward tensor read by a backward op
counts once (views such as Reshape/Identity resolved to the tensor they view;
constants and variables, i.e. the weights, not counted). These saved activations are
what grows a train step's peak over the weights; the backward pass's own short-lived
temporaries are not counted. Traced with ``jit_compile=True``, the graph is the one
that XLA compiles, read the same way.

``saved_forward_tensors`` returns those tensors by name, for tests that check which
tensors a gradient keeps (tests/test_gradients.py).
"""

import tensorflow as tf

from benchmarks import timing

# Ops whose output is (a view of) an input: output i views input i for IdentityN,
# input 0 for the others.
_VIEWS = {"Identity", "IdentityN", "Reshape", "Squeeze", "ExpandDims", "Snapshot"}
# Producers of weights and constants, not of activations.
_NOT_ACTIVATIONS = {"Const", "VarHandleOp", "ReadVariableOp"}


def loss_and_grads(loss_fn, variables, jit_compile, input_gradient=False):
    """``tf.function`` of ``x -> (loss_fn(x), gradients)``: gradients with respect to
    ``variables``, preceded by the one with respect to ``x`` if ``input_gradient``."""

    def step(x):
        with tf.GradientTape() as tape:
            if input_gradient:
                tape.watch(x)
            loss = loss_fn(x)
        return loss, tape.gradient(loss, ([x] if input_gradient else []) + list(variables))

    return tf.function(step, jit_compile=jit_compile)


def _ancestors(tensors):
    seen, stack = set(), [t.op for t in tensors]
    while stack:
        op = stack.pop()
        if op not in seen:
            seen.add(op)
            stack.extend(t.op for t in op.inputs)
    return seen


def _viewed(tensor):
    while tensor.op.type in _VIEWS and tensor.op.inputs:
        index = tensor.value_index if tensor.op.type == "IdentityN" else 0
        tensor = tensor.op.inputs[index]
    return tensor


def saved_forward_tensors(loss_fn, variables, x, jit_compile=False, input_gradient=False):
    """The forward tensors that the backward pass of a train step reads, by name.

    Traces ``loss_fn(x)`` and its ``GradientTape`` gradients with respect to
    ``variables`` (and ``x`` if ``input_gradient``; with ``jit_compile``: the graph
    that XLA compiles). Forward ops: the data-flow ancestors of the loss; backward
    ops: those of the gradients, less the forward ones. A forward tensor read by a
    backward op must be kept from the forward pass to the backward pass. Views are
    resolved to what they view; constants and variables (the weights) are left out.
    The input ``x`` is the traced function's placeholder (op type "Placeholder").
    """
    step = loss_and_grads(loss_fn, variables, jit_compile, input_gradient)
    loss, *grads = step.get_concrete_function(x).graph.outputs
    forward = _ancestors([loss])
    backward = _ancestors(grads) - forward
    saved = {}
    for op in backward:
        for tensor in op.inputs:
            if tensor.op not in forward:
                continue
            tensor = _viewed(tensor)
            if tensor.op.type in _NOT_ACTIVATIONS or tensor.dtype == tf.resource:
                continue
            saved[tensor.name] = tensor
    return saved


def saved_for_backward_bytes(loss_fn, variables, x, jit_compile=False):
    """Bytes of the forward tensors that the backward pass of a train step reads
    (``saved_forward_tensors``, each counted once)."""
    total = 0
    for name, tensor in saved_forward_tensors(loss_fn, variables, x, jit_compile).items():
        if not tensor.shape.is_fully_defined():
            raise ValueError(f"unknown shape of saved tensor {name}")
        total += tensor.shape.num_elements() * tensor.dtype.size
    return total


def gpu_step_peak_bytes(step, x):
    """Peak bytes the GPU allocator held during one ``step(x)`` (after 3 warm-up
    steps), above what it held before the step."""
    for _ in range(3):
        step(x)
    timing.sync()
    device = "GPU:0"
    before = tf.config.experimental.get_memory_info(device)["current"]
    tf.config.experimental.reset_memory_stats(device)
    step(x)
    timing.sync()
    return tf.config.experimental.get_memory_info(device)["peak"] - before
