"""ActNorm's gradients are exact and keep no activation of their own.

The custom gradient of ``_ops.forward`` / ``_ops.inverse`` (TensorFlow backend) is written in terms of
the transform's *output*. These tests pin it against ``tf.GradientTape`` autodiff of
the plain formulas ``exp(l) * (x + b)`` and ``y * exp(-l) - b`` on the same values,
for the layer and the bijector, ranks 2-5, channels-last and channels-first, with
and without masks, eagerly, in graph mode and under XLA; and they check on the
traced gradient graph that the backward pass never reads the transform's input.
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_actnorm
from benchmarks.graph_memory import saved_forward_tensors
from tf_actnorm import _ops
from tests.util import assign_parameters

SHAPES = [(16, 3), (4, 5, 3), (3, 4, 5, 3), (2, 3, 4, 5, 3)]
CASES = ([(shape, -1) for shape in SHAPES]
         + [((shape[0], shape[-1]) + shape[1:-1], 1) for shape in SHAPES])
IDS = [f"rank{len(s)}-axis{a}" for s, a in CASES]
MODES = ["eager", "graph", "xla"]


def _run(mode, fn, *args):
    if mode == "eager":
        return fn(*args)
    return tf.function(fn, jit_compile=mode == "xla")(*args)


def _plain(t, bias, log_scale, axis, inverse):
    """The textbook formulas, differentiated by TensorFlow."""
    shape = [1] * t.shape.rank
    shape[axis] = -1
    b, l = tf.reshape(bias, shape), tf.reshape(log_scale, shape)
    return t * tf.exp(-l) - b if inverse else tf.exp(l) * (t + b)


def _values(rng, shape, axis):
    channels = shape[axis]
    return (tf.constant(rng.normal(size=shape) * 2 + 1, tf.float32),
            rng.normal(size=channels).astype("float32"),
            (rng.normal(size=channels) * 0.5).astype("float32"),
            tf.constant(rng.normal(size=shape), tf.float32))


def _mask(rng, shape, axis):
    kept = [n for i, n in enumerate(shape) if i != axis % len(shape)]
    mask = rng.uniform(size=kept) < 0.7
    mask.reshape(shape[0], -1)[:, 0] = True  # every example keeps a position
    return tf.constant(mask)


def _reference(t, bias, log_scale, d_out, axis, inverse, log_det_weight, positions):
    """Gradients of ``sum(d_out * out) + sum(log_det_weight * log_det)`` by autodiff."""
    bias, log_scale = tf.constant(bias), tf.constant(log_scale)
    with tf.GradientTape() as tape:
        tape.watch([t, bias, log_scale])
        out = _plain(t, bias, log_scale, axis, inverse)
        log_det = tf.cast(positions, tf.float32) * tf.reduce_sum(log_scale)
        loss = (tf.reduce_sum(d_out * out)
                + tf.reduce_sum(log_det_weight * (-log_det if inverse else log_det)))
    return [out] + tape.gradient(loss, [t, bias, log_scale])


def _assert_close(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g is not None
        g, e = np.asarray(g), np.asarray(e)
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(e).max()))


def _layer(shape, axis, bias, log_scale):
    layer = tf_actnorm.ActNorm(axis=axis)
    layer.build(shape)
    assign_parameters(layer, bias=bias, log_scale=log_scale)
    layer.initialized.assign(True)  # training=True runs the steady state (guard in the graph)
    return layer


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
def test_layer_gradients_match_autodiff_of_the_plain_formula(rng, shape, axis, masked,
                                                             inverse, mode):
    x, bias, log_scale, d_out = _values(rng, shape, axis)
    layer = _layer(shape, axis, bias, log_scale)
    mask = _mask(rng, shape, axis) if masked else None
    weight = tf.constant(rng.normal(size=shape[0]), tf.float32)
    if mask is None:
        positions = tf.fill([shape[0]], float(np.prod(shape) // shape[0] // shape[axis]))
    else:
        positions = tf.reduce_sum(tf.cast(tf.reshape(mask, [shape[0], -1]), tf.float32), 1)

    def ours(t, d_out):
        with tf.GradientTape() as tape:
            tape.watch(t)
            if inverse:
                out = layer.inverse(t)
                log_det = -layer.forward_log_det_jacobian(out, mask=mask)
            else:
                out = layer(t, training=True, mask=mask)
                log_det = layer.forward_log_det_jacobian(t, mask=mask)
            loss = tf.reduce_sum(d_out * out) + tf.reduce_sum(weight * log_det)
        # The residuals' gradients are the parameters' (bias = initial_bias + residual).
        return [out] + tape.gradient(loss, [t, layer.bias_residual, layer.log_scale_residual])

    got = _run(mode, ours, x, d_out)
    _assert_close(got, _reference(x, bias, log_scale, d_out, axis, inverse, weight, positions))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
def test_bijector_gradients_match_autodiff_of_the_plain_formula(rng, shape, axis, inverse,
                                                                mode):
    x, bias, log_scale, d_out = _values(rng, shape, axis)
    rank = len(shape)
    event_axis = axis % rank - rank  # counted from the end of the event
    event_ndims = rank - 1
    bijector = tf_actnorm.ActNormBijector(shape[axis], axis=event_axis)
    bijector.bias.assign(bias)
    bijector.log_scale.assign(log_scale)
    bijector.initialized.assign(True)
    weight = tf.constant(rng.normal(size=shape[0]), tf.float32)
    positions = tf.fill([shape[0]], float(np.prod(shape) // shape[0] // shape[axis]))

    def ours(t, d_out):
        with tf.GradientTape() as tape:
            tape.watch(t)
            if inverse:
                out = bijector.inverse(t)
                log_det = bijector.inverse_log_det_jacobian(t, event_ndims=event_ndims)
            else:
                out = bijector.forward(t)
                log_det = bijector.forward_log_det_jacobian(t, event_ndims=event_ndims)
            loss = tf.reduce_sum(d_out * out) + tf.reduce_sum(weight * log_det)
        return [out] + tape.gradient(loss, [t, bijector.bias, bijector.log_scale])

    got = _run(mode, ours, x, d_out)
    _assert_close(got, _reference(x, bias, log_scale, d_out, axis, inverse, weight, positions))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_second_order_gradients_match_autodiff(rng, inverse, mode):
    x, bias, log_scale, _ = _values(rng, (4, 5, 3), -1)
    x = tf.cast(x, tf.float64)
    bias, log_scale = tf.constant(bias, tf.float64), tf.constant(log_scale, tf.float64)

    def hessian_vector(fn):
        def run(x, bias, log_scale):
            with tf.GradientTape(persistent=True) as outer:
                outer.watch([x, bias, log_scale])
                with tf.GradientTape() as inner:
                    inner.watch([x, bias, log_scale])
                    loss = tf.reduce_sum(tf.sin(fn(x, bias, log_scale)))
                grads = inner.gradient(loss, [x, bias, log_scale])
                total = tf.add_n([tf.reduce_sum(g * g) for g in grads])
            return outer.gradient(total, [x, bias, log_scale])
        return _run(mode, run, x, bias, log_scale)

    fn = _ops.inverse if inverse else _ops.forward
    got = hessian_vector(lambda t, b, l: fn(t, b, l, -1))
    expected = hessian_vector(lambda t, b, l: _plain(t, b, l, -1, inverse))
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- saved activations

def _saved_full_size(fn, t, variables, jit_compile):
    """Full-size forward tensors (the shape of ``t``) that the backward pass of
    ``grad(sum(fn(t)**2))`` with respect to ``t`` and ``variables`` reads: what a train
    step keeps from the forward pass for the backward pass (views resolved), by name."""
    saved = saved_forward_tensors(lambda t: tf.reduce_sum(tf.square(fn(t))), variables, t,
                                  jit_compile=jit_compile, input_gradient=True)
    return {name: x for name, x in sorted(saved.items())
            if x.shape.is_fully_defined() and x.shape.as_list() == t.shape.as_list()}


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("kind", ["layer", "bijector"])
def test_backward_pass_reads_the_output_never_the_input(rng, kind, inverse, jit_compile):
    shape = (4, 6, 6, 8)
    t = tf.constant(rng.normal(size=shape), tf.float32)
    if kind == "layer":
        layer = _layer(shape, -1, rng.normal(size=8), rng.normal(size=8) * 0.3)
        variables = [layer.bias_residual.value, layer.log_scale_residual.value]
        fn = layer.inverse if inverse else (lambda t: layer(t, training=True))
    else:
        bijector = tf_actnorm.ActNormBijector(8)
        bijector.initialized.assign(True)
        variables = [bijector.bias, bijector.log_scale]
        fn = bijector.inverse if inverse else bijector.forward
    saved = _saved_full_size(fn, t, variables, jit_compile)
    # The only full-size tensor kept is the transform's output (the loss's square needs
    # it too), never the input placeholder.
    assert len(saved) == 1, sorted(saved)
    assert all(x.op.type != "Placeholder" for x in saved.values()), sorted(saved)

    # The check can fail: autodiff of the plain formula keeps one more full-size
    # tensor (``x + b`` forward, the input ``y`` inverse).
    bias, log_scale = tf.Variable(tf.zeros(8)), tf.Variable(tf.zeros(8))
    plain = _saved_full_size(lambda t: _plain(t, bias, log_scale, -1, inverse), t,
                             [bias, log_scale], jit_compile)
    assert len(plain) == 2, sorted(plain)
