"""Mixed precision, float64 and robust statistics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_actnorm
from tests.util import numpy_init


@pytest.mark.parametrize("policy,compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision_keeps_float32_variables_and_float32_statistics(rng, policy, compute):
    keras.mixed_precision.set_global_policy(policy)
    layer = tf_actnorm.ActNorm()
    # Magnitude ~300: squares (~9e4) overflow float16 (max 65504).
    x = (rng.normal(size=(64, 4)) * 20 + [300, -300, 250, 0]).astype("float32")
    y = layer(x, training=True)
    assert y.dtype == compute
    assert layer.bias.dtype == "float32" and layer.log_scale.dtype == "float32"
    assert np.all(np.isfinite(layer.log_scale.numpy()))
    x_seen = tf.cast(tf.cast(x, compute), "float64").numpy()  # the layer sees x in the compute dtype
    bias, log_scale = numpy_init(x_seen)
    np.testing.assert_allclose(layer.bias.numpy(), bias, rtol=1e-5)
    np.testing.assert_allclose(layer.log_scale.numpy(), log_scale, rtol=1e-4, atol=1e-5)
    out = tf.cast(y, "float32").numpy()
    tolerance = 1e-2 if compute == "float16" else 5e-2
    np.testing.assert_allclose(out.mean(0), 0.0, atol=tolerance)
    np.testing.assert_allclose(out.std(0), 1.0, atol=tolerance)


def test_mixed_float16_fit_with_loss_scaling(rng):
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), tf_actnorm.ActNorm(), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, dtype="float32")])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x = (rng.normal(size=(64, 8, 8, 3)) * 100 + 200).astype("float32")
    y = ((x[..., :1].mean((1, 2)) - 200) / 10).astype("float32")  # learnable from the inputs
    history = model.fit(x, y, batch_size=16, epochs=8, verbose=0)
    layer = model.layers[1]
    assert layer.initialized.numpy() and layer.log_scale.dtype == "float32"
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < 0.9 * history.history["loss"][0], history.history["loss"]


def test_float64_layer_works_in_float64(rng):
    layer = tf_actnorm.ActNorm(dtype="float64")
    x = rng.normal(size=(32, 3)) * 1e-3 + 1.0
    y = layer(x, training=True)
    assert y.dtype == "float64" and layer.bias.dtype == "float64"
    bias, log_scale = numpy_init(x)
    np.testing.assert_allclose(layer.bias.numpy(), bias, rtol=1e-12)
    np.testing.assert_allclose(layer.log_scale.numpy(), log_scale, rtol=1e-10)
    np.testing.assert_allclose(layer.inverse(y).numpy(), x, rtol=1e-12)
    assert layer.forward_log_det_jacobian(x).dtype == "float64"


def test_large_offset_does_not_cancel_the_variance(rng):
    # mean 1e4, std 1 in float32: E[x^2] - E[x]^2 would lose every digit of the variance.
    x = (rng.normal(size=(4096, 3)) + 1e4).astype("float32")
    layer = tf_actnorm.ActNorm()
    layer(x, training=True)
    std = np.asarray(x, np.float64).std(0)
    np.testing.assert_allclose(np.exp(-layer.log_scale.numpy()) - 1e-6, std, rtol=1e-3)
    # The mean is accumulated in float32: ~1e-6 relative.
    np.testing.assert_allclose(-layer.bias.numpy(), np.asarray(x, np.float64).mean(0), rtol=1e-5)
