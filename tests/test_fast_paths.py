"""The fast paths behind the benchmarks compute what the plain ops compute.

``_tf_backend.channel_sum`` (per-channel sums as matrix-vector products on CPU) and
``_ops.channel_grads`` (the backward pass of the transform) must agree with
``tf.reduce_sum`` and the plain ops, for every rank and channel axis, eagerly, in graph
mode and under XLA; ``_ops.forward`` is the plain multiply-add in every float dtype
(its gradients' exactness: ``tests/test_gradients.py``); the bijector's O(1) sum of
its log-det over extra event dimensions must agree with TFP's generic one;
``_ops.moments`` of eager tensors (one call of a traced function) must give NumPy's moments.
"""

import numpy as np
import pytest
import tensorflow as tf

from tf_actnorm import _ops
from tf_actnorm import _tf_backend

SHAPES = [
    ((16, 3), -1), ((16, 3), 1),
    ((6, 5, 3), -1), ((6, 3, 5), 1),
    ((4, 5, 6, 3), -1), ((4, 3, 5, 6), 1),
    ((3, 2, 4, 5, 3), -1), ((3, 3, 2, 4, 5), 1),
    ((0, 4, 3), -1), ((0, 3, 4), 1),  # empty batch
]
IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in SHAPES]
MODES = ["eager", "graph", "xla"]


def _run(mode, fn, *args):
    if mode == "eager":
        return fn(*args)
    return tf.function(fn, jit_compile=mode == "xla")(*args)


def _params(rng, shape, axis, dtype):
    cshape = [1] * len(shape)
    cshape[axis] = shape[axis]
    return (tf.constant(rng.normal(size=shape), dtype),
            tf.constant(rng.uniform(0.5, 2.0, size=cshape), dtype),
            tf.constant(rng.normal(size=cshape), dtype),
            tf.constant(rng.normal(size=shape), dtype))


def test_tensorflow_takes_its_own_kernels_and_provides_every_hook():
    from tf_actnorm import _backend

    assert _backend.kernels() is _tf_backend
    assert [name for name in _backend.HOOKS if not hasattr(_tf_backend, name)] == []
    assert _tf_backend.OUTPUT_GRADIENT is True  # the gradient from the output (test_gradients)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_channel_sum_matches_reduce_sum(rng, shape, axis, mode, dtype):
    x = tf.constant(rng.normal(size=shape) * 10 + 3, dtype)
    expected = tf.reduce_sum(
        x, [i for i in range(len(shape)) if i != axis % len(shape)]).numpy()
    got = _run(mode, lambda x: _tf_backend.channel_sum(x, axis), x).numpy()
    assert got.shape == (shape[axis],)
    np.testing.assert_allclose(got, expected, rtol=1e-5 if dtype == tf.float32 else 1e-12,
                               atol=1e-3 if dtype == tf.float32 else 1e-9)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("centered", [False, True], ids=["nocenter", "center"])
@pytest.mark.parametrize("shape,axis", SHAPES, ids=IDS)
def test_channel_grads_match_the_plain_ops(rng, shape, axis, centered, mode):
    out, scale, center, d_out = _params(rng, shape, axis, tf.float64)
    scale, center = tf.reshape(scale, [-1]), tf.reshape(center, [-1])
    got = _run(mode, lambda d, o, s, c: _ops.channel_grads(d, o, s, c if centered else None,
                                                            axis), d_out, out, scale, center)
    cshape = [1] * len(shape)
    cshape[axis] = -1
    reduced = [i for i in range(len(shape)) if i != axis % len(shape)]
    centered_out = out - tf.reshape(center, cshape) if centered else out
    expected = [d_out * tf.reshape(scale, cshape),
                tf.reduce_sum(d_out * centered_out, reduced),
                tf.reduce_sum(d_out, reduced)]
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32])
def test_forward_is_the_plain_multiply_add(rng, dtype):
    x, _, _, dy = _params(rng, (4, 5, 6, 3), -1, dtype)
    bias = tf.constant(rng.normal(size=3), tf.float32)
    log_scale = tf.constant(rng.normal(size=3) * 0.3, tf.float32)
    scale = tf.exp(log_scale)
    np.testing.assert_array_equal(
        _ops.forward(x, bias, log_scale, -1).numpy(),
        (x * tf.cast(scale, dtype) + tf.cast(bias * scale, dtype)).numpy())
    with tf.GradientTape() as tape:
        tape.watch([x, bias, log_scale])
        y = _ops.forward(x, bias, log_scale, -1)
    got = tape.gradient(y, [x, bias, log_scale], output_gradients=dy)
    with tf.GradientTape() as tape:
        tape.watch([x, bias, log_scale])
        y = tf.exp(log_scale) * (tf.cast(x, tf.float32) + bias)
    expected = tape.gradient(y, [x, bias, log_scale], output_gradients=tf.cast(dy, tf.float32))
    assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == tf.float32
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy().astype(np.float64), e.numpy().astype(np.float64),
                                   rtol=2e-2, atol=2e-2)


def test_variable_input(rng):
    x, _, _, dy = _params(rng, (4, 3), -1, tf.float32)
    log_scale = tf.constant([0.1, -0.2, 0.3])
    v = tf.Variable(x)
    with tf.GradientTape() as tape:
        y = _ops.forward(v, tf.zeros(3), log_scale, -1)
    np.testing.assert_allclose(tape.gradient(y, v, output_gradients=dy).numpy(),
                               (dy * tf.exp(log_scale)).numpy(), rtol=1e-6)


@pytest.mark.parametrize("axis,shape", [(-1, (2, 5, 6, 3)), (-3, (2, 3, 5, 6)), (-1, (2, 4, 3))])
def test_bijector_log_det_over_extra_event_dims_matches_tfp(rng, axis, shape):
    import tensorflow_probability as tfp

    import tf_actnorm

    bijector = tf_actnorm.ActNormBijector(shape[axis], axis=axis)
    x = tf.constant(rng.normal(size=shape) * 2 + 1, tf.float32)
    bijector.forward(x)
    bijector.log_scale.assign(tf.constant(rng.normal(size=shape[axis]), tf.float32))
    generic = tfp.bijectors.Bijector  # TFP's own reduction over the extra event dims
    for event_ndims in range(-axis, len(shape) + 1):
        for ours, theirs in (
                (bijector.forward_log_det_jacobian(x, event_ndims),
                 generic.forward_log_det_jacobian(bijector, x, event_ndims)),
                (bijector.inverse_log_det_jacobian(x, event_ndims),
                 generic.inverse_log_det_jacobian(bijector, x, event_ndims)),
                (tfp.bijectors.Invert(bijector).inverse_log_det_jacobian(x, event_ndims),
                 generic.forward_log_det_jacobian(bijector, x, event_ndims))):
            assert ours.shape == theirs.shape
            np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5)
    dynamic = tf.function(lambda x, n: bijector.forward_log_det_jacobian(x, n))
    np.testing.assert_allclose(
        dynamic(x, tf.constant(len(shape))).numpy(),
        bijector.forward_log_det_jacobian(x, len(shape)).numpy(), rtol=1e-5)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        bijector.forward_log_det_jacobian(x, len(shape) + 1)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        bijector.forward_log_det_jacobian(x, -axis - 1)


@pytest.mark.parametrize("shape,axis", SHAPES, ids=IDS)
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_eager_moments_are_numpys_from_one_traced_call(rng, shape, axis, masked):
    """Eager moments run as one call of a function traced per rank, axis and mask rank
    (every shape and channel count of a rank shares it): NumPy's count, mean and
    squared deviations (float32 from float16 data), the same values as the ops inside
    a ``tf.function``."""
    data = (rng.normal(size=shape) * 4 + 10).astype("float16")
    channel_axis = axis % len(shape)
    mask_shape = [d for i, d in enumerate(shape) if i != channel_axis]
    mask = rng.uniform(size=mask_shape) < 0.7 if masked else None
    x = tf.constant(data)
    mask_tensor = None if mask is None else tf.constant(mask)
    traced = _tf_backend._traced_moments(len(shape), channel_axis, None if mask is None else mask.ndim)
    eager = _ops.moments(x, axis, mask_tensor)
    traces = traced.experimental_get_tracing_count()
    again = _ops.moments(x, axis, mask_tensor)
    assert traced.experimental_get_tracing_count() == traces  # one call, no new trace
    in_graph = tf.function(lambda x, m: _ops.moments(x, axis, m))(x, mask_tensor)
    for ours, theirs in [*zip(eager, again), *zip(eager, in_graph)]:
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    values = np.moveaxis(data.astype("float64"), channel_axis, -1).reshape(-1, shape[axis])
    weights = np.ones(len(values)) if mask is None else mask.reshape(-1).astype("float64")
    count = weights.sum() * np.ones(shape[axis])
    mean = (weights[:, None] * values).sum(0) / np.maximum(count, 1)
    m2 = (weights[:, None] * (values - mean) ** 2).sum(0)
    assert eager.count.dtype == tf.float32
    np.testing.assert_allclose(eager.count.numpy(), count)
    np.testing.assert_allclose(eager.mean.numpy(), mean, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(eager.m2.numpy(), m2, rtol=1e-4, atol=1e-3)
