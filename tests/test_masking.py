"""Keras masks: statistics and log-det over valid positions only."""

import keras
import numpy as np
import tensorflow as tf

import tf_actnorm
from tests.util import assign_parameters, numpy_init


def _padded(rng, lengths, steps=6, channels=3):
    x = (rng.normal(size=(len(lengths), steps, channels)) * (1 + np.arange(channels))
         + 4 - 3 * np.arange(channels)).astype("float32")
    mask = np.arange(steps)[None, :] < np.asarray(lengths)[:, None]
    x[~mask] = 0.0  # padding, which would drag the statistics toward 0 if counted
    return x, mask


def test_masked_init_uses_valid_positions_only(rng):
    x, mask = _padded(rng, [6, 2, 4, 1])
    layer = tf_actnorm.ActNorm()
    y = layer(x, mask=mask, training=True)
    bias, log_scale = numpy_init(x, valid=mask)
    np.testing.assert_allclose(layer.bias.numpy(), bias, rtol=1e-5)
    np.testing.assert_allclose(layer.log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-6)
    valid = y.numpy()[mask]
    np.testing.assert_allclose(valid.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(valid.std(0), 1.0, atol=1e-5)


def test_mask_from_masking_layer_passes_through(rng):
    x, mask = _padded(rng, [6, 3, 5])
    inputs = keras.Input((6, 3))
    masked = keras.layers.Masking(0.0)(inputs)
    normalised = tf_actnorm.ActNorm(name="an")(masked)
    outputs = keras.layers.LSTM(2)(normalised)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(x, np.zeros((3, 2)), batch_size=3, verbose=0)
    bias, _ = numpy_init(x, valid=mask)
    np.testing.assert_allclose(model.get_layer("an").bias.numpy(), bias, rtol=1e-5)
    layer = tf_actnorm.ActNorm()
    out = layer(keras.layers.Masking(0.0)(x))
    np.testing.assert_array_equal(out._keras_mask.numpy(), mask)


def test_embedding_mask_zero(rng):
    tokens = np.array([[3, 4, 5, 0, 0], [7, 1, 0, 0, 0]])
    embedding = keras.layers.Embedding(10, 4, mask_zero=True)
    layer = tf_actnorm.ActNorm()
    embedded = embedding(tokens)
    layer(embedded, training=True)
    bias, _ = numpy_init(embedded.numpy(), valid=tokens != 0)
    np.testing.assert_allclose(layer.bias.numpy(), bias, rtol=1e-5, atol=1e-6)


def test_masked_log_det_equals_numeric_jacobian_on_valid_positions(rng):
    x, mask = _padded(rng, [4, 1, 3], steps=4, channels=2)
    layer = tf_actnorm.ActNorm()
    layer(x, mask=mask, training=True)
    assign_parameters(layer, log_scale=[0.3, -0.7])
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt)
    jac = tape.batch_jacobian(y, xt).numpy().reshape(3, 8, 8).astype(np.float64)
    log_det = layer.forward_log_det_jacobian(x, mask=mask).numpy()
    for b in range(3):
        keep = np.repeat(mask[b], 2)  # the Jacobian block of the valid positions
        expected = np.linalg.slogdet(jac[b][np.ix_(keep, keep)])[1]
        np.testing.assert_allclose(log_det[b], expected, rtol=1e-5)
    unmasked = layer.forward_log_det_jacobian(x).numpy()
    np.testing.assert_allclose(unmasked, 4 * (0.3 - 0.7), rtol=1e-5)


def test_an_empty_masked_batch_in_a_traced_step_is_refused():
    """An empty batch of static shape with a mask, in a ``tf.function``: TensorFlow's
    error naming the layer, state unchanged (Grappler once turned the masked count
    into a division by zero that killed the process)."""
    import pytest  # noqa: PLC0415

    layer = tf_actnorm.ActNorm(name="masked_an")
    step = tf.function(lambda x, m: layer(x, mask=m, training=True))
    with pytest.raises(tf.errors.InvalidArgumentError, match="masked_an: cannot initialise "
                                                              "from an empty batch"):
        step(tf.zeros((0, 4, 3)), tf.ones((0, 4), tf.bool))
    assert not bool(layer.initialized.numpy())
    np.testing.assert_array_equal(layer.bias.numpy(), np.zeros(3))
