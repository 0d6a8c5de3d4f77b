"""tf_actnorm.ActNormBijector (issue 4)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tf_actnorm
from tests.util import numpy_init, snapshot

tfb, tfd = tfp.bijectors, tfp.distributions


def _initialised(rng, channels, axis=-1):
    bijector = tf_actnorm.ActNormBijector(channels, axis=axis)
    bijector.bias.assign(rng.normal(size=channels).astype("float32"))
    bijector.log_scale.assign(rng.normal(scale=0.5, size=channels).astype("float32"))
    bijector.initialized.assign(True)
    return bijector


def _reference(bijector, event_ndims):
    """The same map from stock TFP bijectors: Scale(s) after Shift(b), channel axis broadcast."""
    shape = [-1] + [1] * (-bijector.axis - 1)
    scale = tf.reshape(tf.exp(bijector.log_scale), shape)
    bias = tf.reshape(tf.convert_to_tensor(bijector.bias), shape)
    return tfb.Chain([tfb.Scale(scale), tfb.Shift(bias)])


EVENTS = [((4, 3), -1, 1), ((4, 2, 3), -1, 2), ((3, 2, 2, 3), -1, 3), ((3, 3, 2, 2), -3, 3)]
EVENT_IDS = ["rank1", "rank2", "rank3", "rank3-channels-first"]


@pytest.mark.parametrize("shape,axis,event_ndims", EVENTS, ids=EVENT_IDS)
def test_round_trips_and_log_det_against_numeric_jacobian(rng, shape, axis, event_ndims):
    bijector = _initialised(rng, shape[axis], axis)
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    y = bijector.forward(x)
    np.testing.assert_allclose(bijector.inverse(y).numpy(), x.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bijector.forward(bijector.inverse(x)).numpy(), x.numpy(), rtol=1e-5, atol=1e-5)
    fldj = bijector.forward_log_det_jacobian(x, event_ndims)
    np.testing.assert_allclose(
        fldj.numpy(), -bijector.inverse_log_det_jacobian(y, event_ndims).numpy(), rtol=1e-6)
    x = tf.identity(x)  # a new tensor: TFP's cache would return the untaped earlier result
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bijector.forward(x)
    dims = int(np.prod(shape[1:]))
    jac = tape.batch_jacobian(y, x).numpy().reshape(shape[0], dims, dims).astype(np.float64)
    for j in jac:
        np.testing.assert_allclose(fldj.numpy(), np.linalg.slogdet(j)[1], rtol=1e-5)


@pytest.mark.parametrize("batch", [(5,), (2, 3)], ids=["B", "B1xB2"])
@pytest.mark.parametrize("event_ndims", [1, 2])
def test_shapes_and_values_like_tfb_scale(rng, batch, event_ndims):
    bijector = _initialised(rng, 3)
    reference = _reference(bijector, event_ndims)
    x = rng.normal(size=batch + (4,) * (event_ndims - 1) + (3,)).astype("float32")
    for ours, theirs in [
        (bijector.forward(x), reference.forward(x)),
        (bijector.inverse(x), reference.inverse(x)),
        (bijector.forward_log_det_jacobian(x, event_ndims), reference.forward_log_det_jacobian(x, event_ndims)),
        (bijector.inverse_log_det_jacobian(x, event_ndims), reference.inverse_log_det_jacobian(x, event_ndims)),
    ]:
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-5)
    assert bijector.forward_min_event_ndims == 1
    assert tf_actnorm.ActNormBijector(3, axis=-3).forward_min_event_ndims == 3


def test_chain_and_invert_compose_like_stock_bijectors(rng):
    bijector = _initialised(rng, 3)
    reference = _reference(bijector, 1)
    x = rng.normal(size=(5, 3)).astype("float32")
    for ours, theirs in [
        (tfb.Chain([tfb.Exp(), bijector, tfb.Scale(2.0)]), tfb.Chain([tfb.Exp(), reference, tfb.Scale(2.0)])),
        (tfb.Invert(bijector), tfb.Invert(reference)),
    ]:
        np.testing.assert_allclose(ours.forward(x).numpy(), theirs.forward(x).numpy(), rtol=1e-5)
        y = theirs.forward(x)
        np.testing.assert_allclose(ours.inverse(y).numpy(), x, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours.forward_log_det_jacobian(x, 1).numpy(),
                                   theirs.forward_log_det_jacobian(x, 1).numpy(), rtol=1e-5)


def test_transformed_distribution_log_prob_matches_change_of_variables(rng):
    x = (rng.normal(size=(64, 2)) * [3.0, 0.5] + [1.0, -2.0]).astype("float32")
    bijector = tf_actnorm.ActNormBijector(2)
    flow = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(bijector))
    log_prob = flow.log_prob(x).numpy()  # first call initialises from x (inverse direction of Invert)
    bias, log_scale = numpy_init(x)
    np.testing.assert_allclose(bijector.bias.numpy(), bias, rtol=1e-5, atol=1e-5)
    # Change of variables by hand: z = s (x + b), log p(x) = log N(z) + sum log s.
    z = np.exp(log_scale) * (x + bias)
    expected = -0.5 * (z ** 2).sum(1) - np.log(2 * np.pi) + log_scale.sum()
    np.testing.assert_allclose(log_prob, expected, rtol=1e-5, atol=1e-5)
    sample = flow.sample(7, seed=1)
    assert sample.shape == (7, 2)
    assert np.all(np.isfinite(flow.log_prob(sample).numpy()))
    variables = {id(v) for v in flow.trainable_variables}
    assert id(bijector.bias) in variables and id(bijector.log_scale) in variables
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(flow.log_prob(x + 1.0))
    grads = tape.gradient(loss, [bijector.bias, bijector.log_scale])
    assert all(g is not None and np.any(g.numpy() != 0) for g in grads)


def _init_fn(bijector, direction, mode):
    fn = bijector.forward if direction == "forward" else bijector.inverse
    if mode == "eager":
        return fn
    return tf.function(fn, jit_compile=(mode == "xla"))


@pytest.mark.parametrize("mode", ["eager", "tf.function", "xla"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_data_dependent_init_from_either_direction(rng, direction, mode):
    data = (rng.normal(size=(50, 2, 3)) * [1.0, 4.0, 0.1] + [5.0, -1.0, 2.0]).astype("float32")
    bijector = tf_actnorm.ActNormBijector(3)
    out = _init_fn(bijector, direction, mode)(tf.constant(data)).numpy()
    assert bijector.initialized.numpy()
    np.testing.assert_allclose(out.mean((0, 1)), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.std((0, 1)), 1.0, atol=1e-4)
    if direction == "forward":
        bias, log_scale = numpy_init(data)
    else:  # inverse(y) standardised: s = std + eps, b = mean / s
        flat = data.reshape(-1, 3).astype(np.float64)
        scale = flat.std(0) + 1e-6
        bias, log_scale = flat.mean(0) / scale, np.log(scale)
    np.testing.assert_allclose(bijector.bias.numpy(), bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bijector.log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-5)
    before = snapshot(bijector)
    _init_fn(bijector, direction, mode)(tf.constant(data * 10 + 3))  # never again
    for b, a in zip(before, snapshot(bijector)):
        np.testing.assert_array_equal(a, b)


def test_validate_args_and_bad_init_data(rng):
    bijector = tf_actnorm.ActNormBijector(2, validate_args=True, name="flow_an")
    bad = rng.normal(size=(4, 2)).astype("float32")
    bad[0, 0] = np.nan
    before = snapshot(bijector)
    with pytest.raises(tf.errors.InvalidArgumentError, match="flow_an.*NaN or Inf"):
        bijector.forward(bad)
    for b, a in zip(before, snapshot(bijector)):
        np.testing.assert_array_equal(a, b)
    bijector.forward(rng.normal(size=(4, 2)).astype("float32"))
    bijector.log_scale.assign([np.inf, 0.0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="log_scale"):
        bijector.forward(np.zeros((1, 2), "float32"))
    with pytest.raises(ValueError, match="axis"):
        tf_actnorm.ActNormBijector(3, axis=1)
    with pytest.raises(ValueError, match="num_channels"):
        tf_actnorm.ActNormBijector(0)


def test_bijector_shares_the_layers_variables(rng):
    layer = tf_actnorm.ActNorm(axis=1)
    layer.build((None, 3, 4, 4))
    bijector = layer.bijector
    assert bijector.forward_min_event_ndims == 3 and bijector.axis == -3
    x = (rng.normal(size=(8, 3, 4, 4)) * 2 + 1).astype("float32")
    bijector.forward(x)  # initialising the bijector initialises the layer
    assert layer.initialized.numpy()
    np.testing.assert_allclose(layer.bias.numpy(), numpy_init(x, axis=1)[0], rtol=1e-5, atol=1e-5)
    before = layer(x, training=False).numpy()
    optimizer = keras.optimizers.SGD(0.05)
    with tf.GradientTape() as tape:  # train through the bijector ...
        loss = tf.reduce_mean((bijector.forward(x) - 1.0) ** 2)
    optimizer.apply_gradients(zip(tape.gradient(loss, bijector.trainable_variables), bijector.trainable_variables))
    after = layer(x, training=False).numpy()
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(after, bijector.forward(x).numpy(), rtol=1e-6)  # ... the layer follows
    with tf.GradientTape() as tape:  # and back: train through the layer, the bijector follows
        loss = tf.reduce_mean((layer(x, training=True) + 1.0) ** 2)
    optimizer.apply_gradients(zip(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables))
    np.testing.assert_allclose(bijector.forward(x).numpy(), layer(x, training=False).numpy(), rtol=1e-6)
    assert np.abs(bijector.forward(x).numpy() - after).max() > 1e-3
    fresh = tf_actnorm.ActNorm()
    fresh.build((None, 2))
    fresh.bijector.inverse(x[:, :2, 0, 0])  # init from the inverse direction reaches the layer too
    assert fresh.initialized.numpy()


def _two_moons(rng, n):
    t = rng.uniform(0, np.pi, n)
    upper = rng.uniform(size=n) < 0.5
    x = np.where(upper, np.cos(t), 1 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    return (np.stack([x, y], 1) * 3 + [5, -2] + rng.normal(scale=0.1, size=(n, 2))).astype("float32")


def test_maf_flow_with_actnorm_trains_under_xla(rng):
    keras.utils.set_random_seed(0)
    data = _two_moons(rng, 512)
    bijectors = []  # Chain order: data -> ActNorm -> Permute -> MAF -> ... -> base
    for i in range(2):
        bijectors.append(tfb.MaskedAutoregressiveFlow(
            tfb.AutoregressiveNetwork(params=2, hidden_units=[32], activation="tanh")))
        bijectors.append(tfb.Permute([1, 0]))
        bijectors.append(tf_actnorm.ActNormBijector(2, name=f"an{i}"))
    actnorms = bijectors[2::3]
    flow = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(tfb.Chain(bijectors)))
    flow.log_prob(data[:2])  # builds the autoregressive networks (and initialises ActNorm on 2 points)
    for b in actnorms:
        b.reset_initialization()  # re-initialise on the first real batch, inside XLA
    optimizer = tf.keras.optimizers.Adam(1e-2)  # Keras 3 optimizer, applied to tf.Variables

    @tf.function(jit_compile=True)
    def step(batch):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(flow.log_prob(batch))
        grads = tape.gradient(loss, flow.trainable_variables)
        optimizer.apply_gradients(zip(grads, flow.trainable_variables))
        return loss

    losses = [float(step(data[i % 4 * 128:(i % 4 + 1) * 128])) for i in range(150)]
    assert all(b.initialized.numpy() for b in actnorms)
    assert np.mean(losses[-8:]) < losses[0] - 0.3, losses


class CouplingFlow(keras.Model):
    """A RealNVP flow built from Keras 3 layers: ActNorm layers viewed as bijectors."""

    def __init__(self, n_blocks=2):
        super().__init__()
        self.actnorms = [tf_actnorm.ActNorm(name=f"actnorm_{i}") for i in range(n_blocks)]
        self.nets = [keras.Sequential([keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(2)])
                     for _ in range(n_blocks)]

    def build(self, input_shape):
        for actnorm, net in zip(self.actnorms, self.nets):
            actnorm.build(input_shape)
            net.build((None, 1))

    def _shift_and_log_scale(self, net):
        def fn(x, output_units):
            shift, log_scale = tf.unstack(net(x), axis=-1)
            return shift[..., None], tf.tanh(log_scale)[..., None]
        return fn

    def distribution(self):
        bijectors = []
        for actnorm, net in zip(self.actnorms, self.nets):
            bijectors += [actnorm.bijector, tfb.RealNVP(num_masked=1, shift_and_log_scale_fn=self._shift_and_log_scale(net)),
                          tfb.Permute([1, 0])]
        return tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(tfb.Chain(bijectors)))

    def call(self, x):
        return -self.distribution().log_prob(x)


def test_flow_in_a_keras_model_trains_with_fit(rng):
    keras.utils.set_random_seed(0)
    data = _two_moons(rng, 512)
    model = CouplingFlow()
    model.build((None, 2))
    model.compile(keras.optimizers.Adam(1e-2), loss=lambda _, nll: tf.reduce_mean(nll))
    history = model.fit(data, np.zeros(len(data)), batch_size=128, epochs=12, verbose=0)
    assert all(layer.initialized.numpy() for layer in model.actnorms)
    losses = history.history["loss"]
    assert losses[-1] < losses[0] - 0.3, losses
