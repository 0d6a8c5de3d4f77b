"""tf_actnorm.ActNorm: the Keras layer."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_actnorm
from tests.util import assert_unchanged, assign_parameters, numpy_init, snapshot
from tests.repeated_calls import initialised_layer_fit_warnings
from tests.repeated_calls import initialize_standardises_every_step, step_data
from tests.repeated_calls import model as repeated_model
from tests.repeated_calls import training_calls_warn_once
from tests.util import channel_data as _data

# (shape, axis): every rank 2..5, channels-last and channels-first.
SHAPES = [
    ((16, 3), -1), ((16, 3), 1),
    ((6, 5, 3), -1), ((6, 3, 5), 1),
    ((4, 5, 6, 3), -1), ((4, 3, 5, 6), 1),
    ((3, 2, 4, 5, 3), -1), ((3, 3, 2, 4, 5), 1),
]
IDS = [f"rank{len(s)}-axis{a}" for s, a in SHAPES]


@pytest.mark.parametrize("shape,axis", SHAPES, ids=IDS)
def test_init_matches_numpy_and_standardises(rng, shape, axis):
    x = _data(rng, shape, axis)
    layer = tf_actnorm.ActNorm(axis=axis)
    y = layer(x, training=True).numpy()
    bias, log_scale = numpy_init(x, axis)
    np.testing.assert_allclose(layer.bias.numpy(), bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-5)
    assert layer.initialized.numpy()
    reduce = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    np.testing.assert_allclose(y.mean(reduce), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.std(reduce), 1.0, atol=1e-4)


@pytest.mark.parametrize("shape,axis", SHAPES, ids=IDS)
def test_forward_matches_formula_and_inverse_round_trips(rng, shape, axis):
    layer = tf_actnorm.ActNorm(axis=axis)
    layer(_data(rng, shape, axis), training=True)
    # Move away from the init values so the test covers arbitrary parameters.
    channels = shape[axis]
    assign_parameters(layer, bias=rng.normal(size=channels), log_scale=rng.normal(size=channels))
    x = rng.normal(size=shape).astype("float32")
    y = layer(x)
    cshape = [1] * len(shape)
    cshape[axis] = channels
    expected = np.exp(layer.log_scale.numpy()).reshape(cshape) * (x + layer.bias.numpy().reshape(cshape))
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.inverse(y).numpy(), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,axis", SHAPES, ids=IDS)
def test_log_det_equals_numeric_jacobian(rng, shape, axis):
    layer = tf_actnorm.ActNorm(axis=axis)
    layer(_data(rng, shape, axis), training=True)
    assign_parameters(layer, log_scale=rng.normal(scale=0.5, size=shape[axis]))
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    jac = tape.batch_jacobian(y, x).numpy()
    batch, dims = shape[0], int(np.prod(shape[1:]))
    jac = jac.reshape(batch, dims, dims).astype(np.float64)
    expected = [np.linalg.slogdet(j)[1] for j in jac]
    log_det = layer.forward_log_det_jacobian(x).numpy()
    assert log_det.shape == (batch,)
    np.testing.assert_allclose(log_det, expected, rtol=1e-5, atol=1e-4)


def test_log_det_with_dynamic_shapes(rng):
    layer = tf_actnorm.ActNorm()
    layer(_data(rng, (4, 5, 6, 3), -1), training=True)
    fn = tf.function(layer.forward_log_det_jacobian,
                     input_signature=[tf.TensorSpec([None, None, None, 3])])
    for shape in [(2, 4, 4, 3), (5, 7, 3, 3)]:
        expected = shape[1] * shape[2] * layer.log_scale.numpy().sum()
        np.testing.assert_allclose(fn(tf.zeros(shape)).numpy(), [expected] * shape[0], rtol=1e-6)


def test_initialises_only_once(rng):
    layer = tf_actnorm.ActNorm()
    layer(_data(rng, (32, 4), -1), training=True)
    before = snapshot(layer)
    layer(_data(rng, (32, 4), -1, loc=-100.0, scale=50.0), training=True)
    assert_unchanged(before, snapshot(layer))


def test_training_false_never_initialises(rng):
    layer = tf_actnorm.ActNorm()
    x = _data(rng, (8, 3), -1)
    before_init = layer(x, training=False)
    np.testing.assert_allclose(before_init.numpy(), x)  # identity until initialised
    assert not layer.initialized.numpy()
    model = keras.Sequential([keras.Input((3,)), tf_actnorm.ActNorm()])
    model.predict(x, verbose=0)
    model.compile(loss="mse")
    model.evaluate(x, x, verbose=0)
    assert not model.layers[0].initialized.numpy()


def _eager_init(x):
    layer = tf_actnorm.ActNorm()
    layer(x, training=True)
    return layer


def _function_init(x, jit_compile):
    layer = tf_actnorm.ActNorm()
    layer.build(x.shape)
    tf.function(lambda t: layer(t, training=True), jit_compile=jit_compile)(x)
    return layer


def _fit_init(x, **compile_kwargs):
    layer = tf_actnorm.ActNorm()
    model = keras.Sequential([keras.Input(x.shape[1:]), layer])
    # A zero learning rate leaves exactly the values the init assigned.
    model.compile(keras.optimizers.SGD(0.0), "mse", **compile_kwargs)
    model.fit(x, x, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return layer


@pytest.mark.parametrize("mode", [
    "eager", "tf.function", "tf.function-xla", "fit-xla", "fit-no-xla", "fit-run-eagerly"])
def test_init_in_every_execution_mode(rng, mode):
    x = _data(rng, (16, 4, 4, 3), -1)
    layer = {
        "eager": lambda: _eager_init(x),
        "tf.function": lambda: _function_init(x, False),
        "tf.function-xla": lambda: _function_init(x, True),
        "fit-xla": lambda: _fit_init(x, jit_compile=True),
        "fit-no-xla": lambda: _fit_init(x, jit_compile=False),
        "fit-run-eagerly": lambda: _fit_init(x, run_eagerly=True),
    }[mode]()
    bias, log_scale = numpy_init(x)
    assert layer.initialized.numpy()
    np.testing.assert_allclose(layer.bias.numpy(), bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-5)


def test_symbolic_models_and_summary():
    inputs = keras.Input((8, 8, 3))
    hidden = keras.layers.Conv2D(5, 3)(inputs)
    outputs = tf_actnorm.ActNorm(name="an")(hidden)
    functional = keras.Model(inputs, outputs)
    layer = functional.get_layer("an")
    assert not layer.initialized.numpy()  # no init from a symbolic tensor
    assert tuple(outputs.shape) == (None, 6, 6, 5)
    # Trainable residuals (2C), their data-dependent parts (2C) and the flag.
    assert layer.count_params() == 4 * 5 + 1
    assert sum(int(np.prod(w.shape)) for w in layer.trainable_weights) == 10
    assert [w.name for w in layer.trainable_weights] == ["bias_residual", "log_scale_residual"]
    assert [w.name for w in layer.non_trainable_weights] == [
        "initial_bias", "initial_log_scale", "initialized"]
    lines = []
    functional.summary(print_fn=lambda line, **_: lines.append(line))
    assert any("an (ActNorm)" in line and " 21 " in line for line in lines)
    sequential = keras.Sequential([keras.Input((7, 2)), tf_actnorm.ActNorm(), keras.layers.Dense(1)])
    assert tuple(sequential.output_shape) == (None, 7, 1)
    assert not sequential.layers[0].initialized.numpy()


def test_config_round_trip_and_registration():
    layer = tf_actnorm.ActNorm(axis=1, epsilon=1e-3, name="x", dtype="float64")
    config = layer.get_config()
    assert config["axis"] == 1 and config["epsilon"] == 1e-3
    clone = tf_actnorm.ActNorm.from_config(config)
    assert (clone.axis, clone.epsilon, clone.name, clone.dtype) == (1, 1e-3, "x", "float64")
    assert keras.saving.get_registered_name(tf_actnorm.ActNorm) == "tf_actnorm>ActNorm"
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, tf_actnorm.ActNorm) and restored.get_config() == config


# ---- bad input: a clear error naming the layer, and no state changed ----

def test_rank_below_two_is_rejected():
    layer = tf_actnorm.ActNorm(name="my_actnorm")
    with pytest.raises(ValueError, match="my_actnorm.*(rank|ndim)"):
        layer(tf.zeros([4]))
    with pytest.raises(ValueError, match="my_actnorm.*rank"):
        tf_actnorm.ActNorm(name="my_actnorm").build((2, 3, 4, 5, 6, 7))


def test_bad_axis_is_rejected():
    with pytest.raises(ValueError, match="axis"):
        tf_actnorm.ActNorm(axis=0)(tf.zeros([2, 3]))
    with pytest.raises(ValueError, match="axis"):
        tf_actnorm.ActNorm(axis=3)(tf.zeros([2, 3]))


def test_channel_mismatch_is_rejected(rng):
    layer = tf_actnorm.ActNorm(name="my_actnorm")
    layer(_data(rng, (4, 3), -1), training=True)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="my_actnorm.*expected axis -1 .* value 3.*shape \\(4, 5\\)"):
        layer(tf.zeros([4, 5]))  # Keras' input_spec message: layer, expected and received
    assert_unchanged(before, snapshot(layer))


@pytest.mark.parametrize("mode", ["eager", "tf.function"])
@pytest.mark.parametrize("method", ["inverse", "forward_log_det_jacobian"])
def test_inverse_and_log_det_reject_mismatched_inputs(rng, method, mode):
    # These bypass Keras' input_spec check in `__call__`: same checks, named errors.
    layer = tf_actnorm.ActNorm(axis=1, name="my_actnorm")
    layer(_data(rng, (4, 3, 2, 2), 1), training=True)
    fn = getattr(layer, method)
    if mode == "tf.function":
        fn = tf.function(fn)
    with pytest.raises(ValueError, match=r"my_actnorm: expected 3 channels on axis 1, got 5 "
                                         r"\(input shape \(4, 5, 2, 2\)\)"):
        fn(tf.zeros([4, 5, 2, 2]))
    with pytest.raises(ValueError, match=r"my_actnorm: expected an input of rank 4, got shape \(4, 3\)"):
        fn(tf.zeros([4, 3]))
    with pytest.raises(ValueError, match="my_actnorm: build the layer"):
        getattr(tf_actnorm.ActNorm(name="my_actnorm"), method)(tf.zeros([4, 3]))


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool"])
def test_integer_and_bool_inputs_are_rejected(dtype):
    layer = tf_actnorm.ActNorm(name="my_actnorm")
    with pytest.raises(TypeError, match="my_actnorm.*floating"):
        layer(tf.zeros([4, 3], dtype))


def _poisoned(rng, kind):
    x = _data(rng, (8, 3), -1)
    if kind == "empty":
        return x[:0]
    x[2, 1] = np.nan if kind == "nan" else np.inf
    return x


@pytest.mark.parametrize("kind", ["nan", "inf", "empty"])
@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_bad_init_data_raises_and_changes_nothing(rng, kind, mode):
    layer = tf_actnorm.ActNorm(name="my_actnorm")
    layer.build((None, 3))
    before = snapshot(layer)
    train_call = lambda t: layer(t, training=True)  # noqa: E731
    call = train_call if mode == "eager" else tf.function(train_call)
    message = "an empty batch" if kind == "empty" else "data containing NaN or Inf"
    # Eager code raises ValueError (as on JAX and PyTorch); a tf.function TensorFlow's
    # own error type, with the same message.
    error = ValueError if mode == "eager" else tf.errors.InvalidArgumentError
    with pytest.raises(error, match=f"my_actnorm: cannot initialise from {message}"):
        call(tf.constant(_poisoned(rng, kind)))
    assert_unchanged(before, snapshot(layer))
    call(tf.constant(_data(rng, (8, 3), -1)))  # a good batch still initialises afterwards
    assert layer.initialized.numpy()


@pytest.mark.parametrize("kind", ["nan", "inf", "empty"])
def test_bad_init_data_under_xla_changes_nothing(rng, kind):
    # XLA compiles assertions away, so no error can be raised from inside a
    # jit-compiled function; the state must still be left exactly as it was.
    layer = tf_actnorm.ActNorm()
    layer.build((None, 3))
    before = snapshot(layer)
    tf.function(lambda t: layer(t, training=True), jit_compile=True)(tf.constant(_poisoned(rng, kind)))
    assert_unchanged(before, snapshot(layer))


def test_zero_variance_channel_gets_finite_scale(rng):
    x = _data(rng, (16, 3), -1)
    x[:, 1] = 7.0
    layer = tf_actnorm.ActNorm(epsilon=1e-6)
    y = layer(x, training=True).numpy()
    assert np.all(np.isfinite(layer.log_scale.numpy()))
    np.testing.assert_allclose(np.exp(layer.log_scale.numpy()[1]), 1e6, rtol=1e-4)
    np.testing.assert_allclose(y[:, 1], 0.0)


class Wrapper(keras.layers.Layer):
    """A parent layer with no `build`: Keras builds its children while tracing it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(0))
        self.actnorm = tf_actnorm.ActNorm()

    def call(self, x, training=None):
        return self.actnorm(self.dense(x), training=training)


@pytest.mark.parametrize("mode", ["eager", "tf.function", "xla"])
def test_inside_a_parent_layer_without_build(rng, mode):
    wrapper = Wrapper()
    x = _data(rng, (16, 4), -1)
    call = lambda t: wrapper(t, training=True)  # noqa: E731
    if mode != "eager":
        call = tf.function(call, jit_compile=(mode == "xla"))
    y = call(tf.constant(x)).numpy()
    assert wrapper.actnorm.initialized.numpy()
    bias, _ = numpy_init(wrapper.dense(x).numpy())
    np.testing.assert_allclose(wrapper.actnorm.bias.numpy(), bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y.std(0), 1.0, atol=1e-4)


@pytest.mark.parametrize("kind", ["time_distributed", "shared"])
@pytest.mark.parametrize("fit", [False, True], ids=["eager", "fit"])
def test_repeated_calls_in_one_forward_pass_warn_once(rng, kind, fit):
    """A layer that one forward pass calls several times (TimeDistributed: once per
    step; a shared layer: once per use) initialises from the first call's inputs:
    one warning names the layer and points to `initialize`, eagerly and in a traced
    step; the second forward pass does not warn again. Its outputs over all steps are
    then not standardised (why the warning exists)."""
    x = step_data(rng)
    found, layer = training_calls_warn_once(kind, x, fit=fit)
    assert len(found) == 1, found
    assert "tf_actnorm.initialize" in str(found[0].message)
    assert bool(layer.initialized.numpy())
    batch = x[:len(x) // 2] if fit else x
    first = batch[:, 0] if kind == "time_distributed" else batch[:, :3]
    bias, _ = numpy_init(first.reshape(-1, x.shape[-1]))  # the first call's inputs
    np.testing.assert_allclose(layer.bias.numpy(), bias, rtol=1e-5, atol=1e-5)


def test_a_single_call_per_pass_and_an_initialised_layer_do_not_warn(rng):
    x = step_data(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tf_actnorm.ActNorm()(x, training=True)
        net, layer = repeated_model("time_distributed")
        layer.initialized.assign(True)
        net(x, training=True)


@pytest.mark.parametrize("kind", ["time_distributed", "shared"])
def test_initialize_counts_every_call(rng, kind):
    initialize_standardises_every_step(kind, step_data(rng))


def test_an_initialised_layer_called_per_step_does_not_warn_in_fit(rng):
    assert initialised_layer_fit_warnings("time_distributed", step_data(rng)) == []
