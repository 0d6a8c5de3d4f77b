"""tf_actnorm.initialize: multi-batch initialisation (issue 7)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_actnorm
from tests.util import numpy_init, snapshot


def _three_layer_model():
    return keras.Sequential([
        keras.Input((6,)),
        tf_actnorm.ActNorm(name="an0"),
        keras.layers.Dense(5, activation="tanh", kernel_initializer=keras.initializers.GlorotUniform(1)),
        tf_actnorm.ActNorm(name="an1"),
        keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(2)),
        tf_actnorm.ActNorm(name="an2"),
    ])


def _data(rng, n=128):
    return (rng.normal(size=(n, 6)) * [1, 2, 3, 4, 5, 6] + [10, -3, 0, 1, 2, 100]).astype("float32")


def _one_batch_reference(data):
    """Single-batch init on the concatenation: the first training call on all the data."""
    model = _three_layer_model()
    model(data, training=True)
    return model


def _assert_models_equal(model, reference, rtol=1e-5):
    for name in ("an0", "an1", "an2"):
        for ours, theirs in zip(snapshot(model.get_layer(name)), snapshot(reference.get_layer(name))):
            np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("source", ["dataset", "numpy", "generator", "dataset-xy"])
def test_multi_batch_init_equals_one_batch_on_the_concatenation(rng, source):
    data = _data(rng)
    model = _three_layer_model()
    batches = {
        "dataset": lambda: tf.data.Dataset.from_tensor_slices(data).batch(32),
        "numpy": lambda: data,
        "generator": lambda: (data[i:i + 32] for i in range(0, 128, 32)),
        "dataset-xy": lambda: tf.data.Dataset.from_tensor_slices((data, data[:, 0])).batch(32),
    }[source]()
    summary = tf_actnorm.initialize(model, batches, verbose=0)
    assert list(summary) == ["an0", "an1", "an2"]
    _assert_models_equal(model, _one_batch_reference(data))
    # The first layer also against an independent numpy computation.
    bias, log_scale = numpy_init(data)
    np.testing.assert_allclose(model.get_layer("an0").bias.numpy(), bias, rtol=1e-5)
    np.testing.assert_allclose(model.get_layer("an0").log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-6)
    layer = model.get_layer("an2")
    assert summary["an2"]["mean_abs_bias"] == pytest.approx(np.abs(layer.bias.numpy()).mean())
    assert summary["an2"]["mean_scale"] == pytest.approx(np.exp(layer.log_scale.numpy()).mean())


def test_steps_limits_the_batches(rng):
    data = _data(rng)
    model = _three_layer_model()
    tf_actnorm.initialize(model, tf.data.Dataset.from_tensor_slices(data).batch(32), steps=2, verbose=0)
    _assert_models_equal(model, _one_batch_reference(data[:64]))


def test_initialised_layers_are_left_alone_unless_forced(rng):
    data = _data(rng)
    model = _three_layer_model()
    model(data[:16] * 3 - 7, training=True)  # initialises all three on other data
    before = [snapshot(model.get_layer(n)) for n in ("an0", "an1", "an2")]
    assert tf_actnorm.initialize(model, data, verbose=0) == {}
    for name, old in zip(("an0", "an1", "an2"), before):
        for a, b in zip(old, snapshot(model.get_layer(name))):
            np.testing.assert_array_equal(a, b)
    tf_actnorm.initialize(model, data, force=True, verbose=0)
    _assert_models_equal(model, _one_batch_reference(data))


def test_reset_initialization_re_arms(rng):
    data = _data(rng)
    model = _three_layer_model()
    model(data[:16] * 3 - 7, training=True)
    model.get_layer("an1").reset_initialization()
    summary = tf_actnorm.initialize(model, data, verbose=0)
    assert list(summary) == ["an1"]
    model.get_layer("an2").reset_initialization()
    model(data, training=True)  # a training call initialises a re-armed layer too
    assert model.get_layer("an2").initialized.numpy()


def test_nested_models_in_data_flow_order(rng):
    data = _data(rng)
    inner = keras.Sequential([
        keras.Input((5,)), tf_actnorm.ActNorm(name="inner_an"), keras.layers.Dense(3)], name="inner")
    inputs = keras.Input((6,))
    h = tf_actnorm.ActNorm(name="outer_an0")(inputs)
    h = keras.layers.Dense(5, kernel_initializer=keras.initializers.GlorotUniform(3))(h)
    h = inner(h)
    outputs = tf_actnorm.ActNorm(name="outer_an1")(h)
    model = keras.Model(inputs, outputs)
    summary = tf_actnorm.initialize(model, tf.data.Dataset.from_tensor_slices(data).batch(40), verbose=0)
    assert list(summary) == ["outer_an0", "inner_an", "outer_an1"]
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    for layer in [reference.get_layer("outer_an0"), reference.get_layer("inner").get_layer("inner_an"),
                  reference.get_layer("outer_an1")]:
        layer.reset_initialization()
    reference(data, training=True)
    for ours, theirs in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_progress_bar_and_errors(rng, capsys):
    model = _three_layer_model()
    tf_actnorm.initialize(model, _data(rng, 64), batch_size=32, verbose=1)
    assert "6/6" in capsys.readouterr().out  # 3 layers x 2 batches
    with pytest.raises(ValueError, match="no ActNorm"):
        tf_actnorm.initialize(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="no batches"):
        tf_actnorm.initialize(_three_layer_model(), [])
