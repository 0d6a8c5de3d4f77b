"""ActNorm keeps Keras' own contract, with BatchNormalization as the reference: only training
mode changes state, an unset `training` outside a training context is inference, and a frozen
layer (`trainable = False`) never changes. Also Keras' own layer test harness."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.testing import TestCase

import tf_actnorm
from tests.util import assert_unchanged, numpy_init, snapshot


def _model(norm):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), norm()])


def _data():
    rng = np.random.default_rng(7)
    return (rng.normal(5.0, 3.0, (16, 4)).astype("float32"),
            rng.normal(size=(16, 3)).astype("float32"))


def _compiled(model):
    model.compile(keras.optimizers.SGD(0.01), "mse")
    return model


def _custom_loop(model, x, y):
    optimizer = keras.optimizers.SGD(0.01)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
    variables = model.trainable_variables
    if variables:
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))


def _export_trace(model, x, y):
    tf.function(lambda t: model(t)).get_concrete_function(tf.TensorSpec([None, 4]))(x)


# Each route, and whether it changes a trainable normalisation layer's state (Keras' rule).
ROUTES = {
    "bare call": (lambda m, x, y: m(x), False),
    "bare call in tf.function": (lambda m, x, y: tf.function(lambda t: m(t))(x), False),
    "export trace (training unset)": (_export_trace, False),
    "training=False": (lambda m, x, y: m(x, training=False), False),
    "predict": (lambda m, x, y: m.predict(x, verbose=0), False),
    "evaluate": (lambda m, x, y: _compiled(m).evaluate(x, y, verbose=0), False),
    "training=True": (lambda m, x, y: m(x, training=True), True),
    "training=True in tf.function": (
        lambda m, x, y: tf.function(lambda t: m(t, training=True))(x), True),
    "fit": (lambda m, x, y: _compiled(m).fit(x, y, epochs=1, verbose=0), True),
    "custom loop": (_custom_loop, True),
}


def _norm_state(layer):
    """What a route may change: ActNorm's flag and parameters, BatchNorm's moving
    statistics and parameters."""
    return [np.array(v.numpy()) for v in layer.weights]


def _changed(before, after):
    return any(not np.array_equal(b, a) for b, a in zip(before, after))


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_state_changes_exactly_when_batch_normalization_does(route, frozen):
    run, changes = ROUTES[route]
    x, y = _data()
    observed = {}
    for norm in (tf_actnorm.ActNorm, keras.layers.BatchNormalization):
        keras.utils.set_random_seed(0)
        model = _model(norm)
        layer = model.layers[-1]
        layer.trainable = not frozen
        before = _norm_state(layer)
        run(model, x, y)
        observed[norm.__name__] = _changed(before, _norm_state(layer))
    assert observed == {"ActNorm": changes and not frozen,
                        "BatchNormalization": changes and not frozen}


def test_training_mode_initialises_from_that_batch():
    x, _ = _data()
    model = _model(tf_actnorm.ActNorm)
    model(x, training=True)
    layer = model.layers[-1]
    hidden = model.layers[0](x).numpy()
    bias, log_scale = numpy_init(hidden)
    np.testing.assert_allclose(layer.bias.numpy(), bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_a_model_first_built_inside_a_traced_train_step_initialises(jit_compile):
    """No ``keras.Input`` and no ``build``: the first call of a ``tf.function`` train
    step builds the model (as it may with BatchNormalization) and initialises ActNorm
    from that batch."""
    x, _ = _data()
    model = keras.Sequential([keras.layers.Dense(3), tf_actnorm.ActNorm()])
    step = tf.function(lambda t: model(t, training=True), jit_compile=jit_compile)
    step(tf.constant(x))
    layer = model.layers[-1]
    assert bool(layer.initialized.numpy())
    bias, log_scale = numpy_init(model.layers[0](x).numpy())
    np.testing.assert_allclose(layer.bias.numpy(), bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-5)


def test_frozen_by_a_frozen_parent_never_initialises():
    x, y = _data()
    model = _compiled(_model(tf_actnorm.ActNorm))
    model.trainable = False  # Keras propagates this to every sublayer
    layer = model.layers[-1]
    before = snapshot(layer)
    model.fit(x, y, epochs=2, verbose=0)
    model(x, training=True)
    assert_unchanged(before, snapshot(layer))
    assert not layer.initialized.numpy()
    model.trainable = True  # unfrozen, the next training call initialises
    model(x, training=True)
    assert layer.initialized.numpy()


def test_frozen_initialised_layer_never_changes_in_fit():
    x, y = _data()
    model = _compiled(_model(tf_actnorm.ActNorm))
    model(x, training=True)
    layer = model.layers[-1]
    layer.trainable = False
    model.compile(keras.optimizers.SGD(0.1), "mse")  # recompile after freezing, as in Keras
    before = snapshot(layer)
    model.fit(x, y, epochs=2, verbose=0)
    assert_unchanged(before, snapshot(layer))
    assert not layer.trainable_weights and len(layer.non_trainable_weights) == 5


def test_bijector_of_a_frozen_layer_never_initialises():
    x, _ = _data()
    layer = tf_actnorm.ActNorm()
    layer.build((None, 4))
    bijector = layer.bijector
    layer.trainable = False
    before = snapshot(layer)
    bijector.forward(x)
    bijector.inverse(x)
    assert_unchanged(before, snapshot(layer))
    layer.trainable = True
    bijector.forward(x)
    assert layer.initialized.numpy()


def test_standalone_bijector_keeps_tfp_glow_behaviour():
    x, _ = _data()
    bijector = tf_actnorm.ActNormBijector(4)
    bijector.forward(x)  # the first forward initialises, as TFP's glow ActNorm does
    bias, log_scale = numpy_init(x)
    np.testing.assert_allclose(bijector.bias.numpy(), bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bijector.log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-5)


class KerasLayerHarness(TestCase):
    """Keras' own checks for a layer: weights counts, config and serialization round
    trips, symbolic and eager calls, a compiled fit, mixed precision, masking."""

    def test_run_layer_test(self):
        for shape, axis in [((2, 3), -1), ((2, 4, 5, 3), -1), ((2, 3, 4, 5), 1)]:
            self.run_layer_test(
                tf_actnorm.ActNorm, init_kwargs={"axis": axis, "epsilon": 1e-5},
                input_shape=shape, expected_output_shape=shape,
                expected_num_trainable_weights=2, expected_num_non_trainable_weights=3,
                expected_num_non_trainable_variables=3, expected_num_seed_generators=0,
                expected_num_losses=0, supports_masking=True)
