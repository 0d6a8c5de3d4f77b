"""Normalising flows: ActNormBijector initialises from data, never silently from samples,
and ``tf_actnorm.initialize`` takes TFP distributions and bijectors."""

import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.bijectors import glow

import tf_actnorm
from tests.util import numpy_init, snapshot
from tf_actnorm import init

tfb, tfd = tfp.bijectors, tfp.distributions

SAMPLING_WARNING = r"direction before initialisation"


def _data(rng, n=256, dim=2):
    loc = np.linspace(20.0, -5.0, dim)
    scale = np.linspace(8.0, 0.5, dim)
    return (rng.normal(size=(n, dim)) * scale + loc).astype("float32")


def _coupling(dim, seed, rows=None):
    """A RealNVP affine coupling with a small Keras net (built here, from ``seed``).
    ``rows``: a variable that counts the rows the net computes (at run time)."""
    net = keras.Sequential([
        keras.layers.Dense(8, activation="tanh", kernel_initializer=keras.initializers.GlorotUniform(seed)),
        keras.layers.Dense(2 * (dim - dim // 2),
                           kernel_initializer=keras.initializers.GlorotUniform(seed + 1))])
    net.build((None, dim // 2))

    def fn(x, output_units):
        if rows is not None:
            rows.assign_add(tf.shape(x)[0])
        shift, log_scale = tf.split(net(x), 2, axis=-1)
        return shift, tf.tanh(log_scale)

    return tfb.RealNVP(num_masked=dim // 2, shift_and_log_scale_fn=fn), net


def _readme_flow():
    """README.md's flow: data -> ActNorm -> Permute -> MAF -> base."""
    keras.utils.set_random_seed(0)
    made = tfb.AutoregressiveNetwork(params=2, hidden_units=[8])
    made.build((None, 2))
    actnorm = tf_actnorm.ActNormBijector(2)
    flow = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2)),
        bijector=tfb.Invert(tfb.Chain([tfb.MaskedAutoregressiveFlow(made), tfb.Permute([1, 0]), actnorm])))
    return flow, [actnorm], list(made.trainable_variables)


def _invert_flow():
    actnorm = tf_actnorm.ActNormBijector(2)
    flow = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(actnorm))
    return flow, [actnorm], []


def _bare_flow(init_from="inverse"):
    """ActNorm used without Invert: log_prob(data) runs its inverse."""
    actnorm = tf_actnorm.ActNormBijector(2, init_from=init_from)
    return tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)), actnorm), [actnorm], []


def _glow_flow(dim=4, rows=(None, None, None)):
    """Glow-like, from the data side: [ActNorm -> Permute -> coupling] x 3, nested: the
    last block is a Chain of its own, its ActNorm a Keras layer's ``bijector``, and the
    second block's ActNorm (``init_from="inverse"``) sits inside ``Invert``. ``rows``:
    the couplings' row counters."""
    layer = tf_actnorm.ActNorm(name="layer_an")
    layer.build((None, dim))
    an0 = tf_actnorm.ActNormBijector(dim, name="an0")
    an1 = tf_actnorm.ActNormBijector(dim, name="an1", init_from="inverse")
    (c0, n0), (c1, n1), (c2, n2) = (_coupling(dim, 10 * i, rows[i]) for i in range(3))
    reverse = np.arange(dim)[::-1]
    last_block = [layer.bijector, tfb.Permute(reverse), c2]
    data_side = [an0, tfb.Permute(reverse), c0, tfb.Invert(an1), tfb.Permute(reverse), c1,
                 tfb.Chain(last_block[::-1])]
    chain = tfb.Chain(data_side[::-1])  # a Chain applies its last bijector first
    flow = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(dim)), tfb.Invert(chain))
    nets = [v for n in (n0, n1, n2) for v in n.trainable_variables]
    return flow, [an0, an1, layer], nets


FLOWS = {"readme": _readme_flow, "invert": _invert_flow, "bare": _bare_flow, "glow": _glow_flow}


def _actnorm_state(actnorms):
    return [np.concatenate([np.ravel(v) for v in snapshot(a)[:3]]) for a in actnorms]


def _train_step(flow, variables, optimizer, batch):
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(flow.log_prob(batch))
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables))


@pytest.mark.parametrize("kind", sorted(FLOWS))
def test_sampling_first_then_training_equals_training_alone(rng, kind):
    """``flow.sample()`` before training warns, initialises nothing, and the training
    that follows gives the same ActNorms as training alone."""
    dim = 4 if kind == "glow" else 2
    data = _data(rng, 128, dim)
    runs = []
    for sample_first in (True, False):
        flow, actnorms, nets = FLOWS[kind]()
        if sample_first:
            with pytest.warns(UserWarning, match=SAMPLING_WARNING):
                samples = flow.sample(64, seed=1)
            assert np.all(np.isfinite(samples.numpy()))
            assert not any(bool(a.initialized.numpy()) for a in actnorms)
        flow.log_prob(data)  # the first call on data initialises
        initialised = _actnorm_state(actnorms)
        variables = list(flow.trainable_variables) + nets
        _train_step(flow, variables, keras.optimizers.Adam(1e-2), data)
        runs.append((initialised, _actnorm_state(actnorms), actnorms))
    (init_a, trained_a, actnorms), (init_b, trained_b, _) = runs
    for a, b in zip(init_a + trained_a, init_b + trained_b):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # Independent truth for the ActNorm the data reach first.
    first = actnorms[0]
    if kind == "bare":  # data enter through inverse: inverse(data) standardised
        scale = data.astype(np.float64).std(0) + 1e-6
        expected = (data.mean(0) / scale, np.log(scale))
    else:
        expected = numpy_init(data)
    np.testing.assert_allclose(init_b[0][:dim], expected[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(init_b[0][dim:2 * dim], expected[1], rtol=1e-5, atol=1e-5)


def test_glow_behaviour_on_request_matches_tfp_glow_and_shows_the_trap(rng):
    """``init_from="either"``: sampling first initialises from the flow's own samples,
    exactly as TFP's glow ActivationNormalization does; the data then pass un-normalised."""
    data = _data(rng)
    ours = tf_actnorm.ActNormBijector(2, init_from="either")
    reference = glow.ActivationNormalization(2)
    z = {}
    for name, bijector in (("ours", ours), ("tfp", reference)):
        flow = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(bijector))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning: this is what was asked for
            z[name] = flow.sample(512, seed=(1, 2)).numpy()  # stateless: same draws
    assert bool(ours.initialized.numpy())
    np.testing.assert_allclose(z["ours"], z["tfp"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.forward(data).numpy(), reference.forward(data).numpy(),
                               rtol=1e-4, atol=1e-4)
    # The trap: initialised from N(0, I) samples, the data stay far from standard.
    assert np.abs(ours.forward(data).numpy().mean(0)).max() > 4.0


def test_non_data_direction_warns_and_changes_nothing(rng):
    bijector = tf_actnorm.ActNormBijector(3, name="warned")
    x = rng.normal(size=(8, 3)).astype("float32") * 5 + 2
    before = snapshot(bijector)
    message = r"'warned' was called in the inverse direction.*init_from='inverse'"
    with pytest.warns(UserWarning, match=message):
        np.testing.assert_allclose(bijector.inverse(x).numpy(), x)  # the identity
    with pytest.warns(UserWarning, match="inverse direction"):
        tf.function(bijector.inverse)(tf.constant(x))  # at trace time too
    for b, a in zip(before, snapshot(bijector)):
        np.testing.assert_array_equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bijector.inverse_log_det_jacobian(x, 1)  # log-dets: no init, no warning
        bijector.forward_log_det_jacobian(x, 1)
        assert not bool(bijector.initialized.numpy())
        bijector.forward(x)  # the data direction initialises
        bijector.inverse(x)  # and once initialised, nothing to warn about
    np.testing.assert_allclose(bijector.bias.numpy(), numpy_init(x)[0], rtol=1e-5, atol=1e-5)
    assert bijector.copy().init_from == "forward"
    assert tf_actnorm.ActNormBijector(3, init_from="inverse").copy().init_from == "inverse"
    with pytest.raises(ValueError, match="init_from.*'forward', 'inverse', 'either'"):
        tf_actnorm.ActNormBijector(3, init_from="data")
    layer = tf_actnorm.ActNorm()
    layer.build((None, 3))
    assert layer.bijector.init_from == "forward"  # the layer's direction
    tf_actnorm.ActNormBijector.from_layer(layer, init_from="inverse").inverse(x)
    assert bool(layer.initialized.numpy())


@pytest.fixture(params=["one-pass", "streamed"])
def budget(request, monkeypatch):
    """All the data in one eager pass (data this small), or one pass per ActNorm over
    batches read one at a time."""
    if request.param == "streamed":
        monkeypatch.setattr(init, "_MERGE_BYTES", 1)
    return request.param


def _reference_init(make_flow, data):
    """One batch made of all the batches: a first ``log_prob`` on it (training's first call)."""
    flow, actnorms, _ = make_flow()
    flow.log_prob(data)
    return actnorms


def test_initialize_equals_one_batch_on_the_concatenation(rng, budget):
    """Exact, and each ActNorm's pass computes the flow only up to it: the coupling
    after the first ActNorm runs on the data in the later two passes (streamed), the
    one after the last ActNorm never."""
    data = _data(rng, 96, 4)
    rows = [tf.Variable(0) for _ in range(3)]
    flow, actnorms, _ = _glow_flow(rows=rows)
    if budget == "one-pass":
        batches = tf.data.Dataset.from_tensor_slices(data).batch(32)
    else:
        batches = (data[i:i + 32] for i in range(0, 96, 32))  # one-shot: kept for 3 passes
    summary = tf_actnorm.initialize(flow, batches, verbose=0)
    assert list(summary) == ["an0", "an1", "layer_an"]  # the order the data reach them
    expected_rows = [96, 96, 96] if budget == "one-pass" else [2 * 96, 96, 0]
    assert [int(r.numpy()) for r in rows] == expected_rows
    assert all(bool(a.initialized.numpy()) for a in actnorms)
    reference = _reference_init(_glow_flow, data)
    for ours, theirs in zip(_actnorm_state(actnorms), _actnorm_state(reference)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    bias, log_scale = numpy_init(data)
    np.testing.assert_allclose(actnorms[0].bias.numpy(), bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(actnorms[0].log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-5)
    # Training does not initialise again; a second initialize leaves them alone.
    before = _actnorm_state(actnorms)
    flow.log_prob(data + 3.0)
    assert tf_actnorm.initialize(flow, data[:32], verbose=0) == {}
    for a, b in zip(before, _actnorm_state(actnorms)):
        np.testing.assert_array_equal(a, b)


def test_initialize_follows_the_data_whatever_init_from_says(rng, budget):
    """A bare ActNorm (data through inverse) built with the default ``init_from``:
    ``log_prob`` alone would not initialise it; ``initialize`` does, from the inverse.
    (Float64 numpy data for a float32 flow are converted, as ``log_prob`` converts them.)"""
    data = _data(rng, 64)
    flow, (actnorm,), _ = _bare_flow(init_from="forward")
    tf_actnorm.initialize(flow, data.astype("float64"), batch_size=16, verbose=0)
    reference_flow, (reference,), _ = _bare_flow(init_from="inverse")
    reference_flow.log_prob(data)
    np.testing.assert_allclose(snapshot(actnorm)[0], snapshot(reference)[0], rtol=1e-5, atol=1e-5)
    z = actnorm.inverse(data).numpy()
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-4)


def test_initialize_a_bijector_in_either_direction(rng, budget):
    data = _data(rng, 64, 4)
    flow, actnorms, _ = _glow_flow()
    chain = flow.bijector.bijector  # Invert(chain): data go through chain.forward
    tf_actnorm.initialize(chain, data, batch_size=32, direction="forward", verbose=0)
    twin, twin_actnorms, _ = _glow_flow()
    tf_actnorm.initialize(twin.bijector, data, batch_size=32, direction="inverse", verbose=0)
    for ours, theirs in zip(_actnorm_state(actnorms), _actnorm_state(twin_actnorms)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="pass `direction`"):
        tf_actnorm.initialize(chain, data)
    with pytest.raises(ValueError, match="`direction` is for a bijector"):
        tf_actnorm.initialize(flow, data, direction="inverse")


def test_refusals_and_progress_bar(rng, capsys, monkeypatch):
    data = _data(rng, 64)
    flow, (actnorm,), _ = _invert_flow()
    endless = tf.data.Dataset.from_tensor_slices(data).batch(16).repeat()
    with pytest.raises(ValueError, match="`steps`"):
        tf_actnorm.initialize(flow, endless)
    with pytest.raises(ValueError, match=r"single examples.*\.batch\(n\)"):
        tf_actnorm.initialize(flow, tf.data.Dataset.from_tensor_slices(data))
    plain = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Shift([1.0, 2.0]))
    with pytest.raises(ValueError, match="runs no ActNormBijector"):
        tf_actnorm.initialize(plain, data)  # one pass
    with monkeypatch.context() as patch:
        patch.setattr(init, "_MERGE_BYTES", 1)
        with pytest.raises(ValueError, match="runs no ActNormBijector"):
            tf_actnorm.initialize(plain, data, batch_size=16)  # streamed
    assert not bool(actnorm.initialized.numpy())
    capsys.readouterr()
    tf_actnorm.initialize(flow, endless, steps=3)  # one pass: 1 ActNorm x 3 batches
    assert "3/3" in capsys.readouterr().out
    monkeypatch.setattr(init, "_MERGE_BYTES", 1)
    glow_flow, _, _ = _glow_flow()
    tf_actnorm.initialize(glow_flow, _data(rng, 64, 4), batch_size=32)  # 3 passes x 2 batches
    out = capsys.readouterr().out
    assert out.index("0/6") < out.index("6/6"), out
    unknown = tf.data.Dataset.from_tensor_slices(_data(rng, 64, 4)).batch(32).filter(lambda x: True)
    tf_actnorm.initialize(_glow_flow()[0], unknown)
    assert re.search(r"\b6/Unknown", capsys.readouterr().out)


class _Looped(tfb.Bijector):
    """``inner.forward`` inside a ``tf.while_loop`` (one iteration): in a traced
    function the ActNorm's inputs live in the loop body's graph."""

    def __init__(self, inner):
        parameters = dict(locals())
        self.inner = inner
        super().__init__(forward_min_event_ndims=1, parameters=parameters, name="looped")

    def _forward(self, x):
        return tf.while_loop(lambda i, y: i < 1, lambda i, y: (i + 1, self.inner.forward(y)),
                             (0, x))[1]


def test_an_actnorm_inside_the_flows_own_loop_is_initialised_eagerly(rng, monkeypatch):
    """Its moments cannot leave the loop's graph: the passes run eagerly, same result."""
    monkeypatch.setattr(init, "_MERGE_BYTES", 1)
    data = _data(rng, 64)

    def chain():
        first, second = tf_actnorm.ActNormBijector(2), tf_actnorm.ActNormBijector(2)
        return tfb.Chain([_Looped(second), tfb.Exp(), first]), [first, second]

    looped, actnorms = chain()
    tf_actnorm.initialize(looped, data, batch_size=16, direction="forward", verbose=0)
    reference, reference_actnorms = chain()
    reference.forward(data)  # one batch made of all of them, first calls initialise
    for ours, theirs in zip(_actnorm_state(actnorms), _actnorm_state(reference_actnorms)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert all(bool(a.initialized.numpy()) for a in actnorms)


def test_frozen_layer_bijectors_are_left_alone_unless_forced(rng):
    data = _data(rng, 64)
    layer = tf_actnorm.ActNorm(name="frozen_an")
    layer.build((None, 2))
    layer.trainable = False
    standalone = tf_actnorm.ActNormBijector(2, name="free_an")
    flow = tfd.TransformedDistribution(  # data -> standalone -> layer's bijector -> base
        tfd.MultivariateNormalDiag(tf.zeros(2)), tfb.Invert(tfb.Chain([layer.bijector, standalone])))
    assert list(tf_actnorm.initialize(flow, data, verbose=0)) == ["free_an"]
    assert not bool(layer.initialized.numpy())
    assert list(tf_actnorm.initialize(flow, data, force=True, verbose=0)) == ["free_an", "frozen_an"]
    bias, log_scale = numpy_init(standalone.forward(data).numpy())  # the layer's inputs
    np.testing.assert_allclose(layer.bias.numpy(), bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-5)


def test_streamed_passes_are_exact_and_repeatable(rng, monkeypatch):
    """Nine runs per pass, two at a time: the same bits on every run, and the values of
    one batch made of all of them."""
    monkeypatch.setattr(init, "_MERGE_BYTES", 1)
    data = _data(rng, 9 * 16, 4)
    results = []
    for _ in range(2):
        flow, actnorms, _ = _glow_flow()
        tf_actnorm.initialize(flow, data, batch_size=16, verbose=0)
        results.append(_actnorm_state(actnorms))
    for first, second in zip(*results):
        np.testing.assert_array_equal(first, second)
    for ours, theirs in zip(results[0], _actnorm_state(_reference_init(_glow_flow, data))):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
