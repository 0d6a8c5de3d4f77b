"""tf_actnorm.initialize: multi-batch initialisation on the TensorFlow backend."""

import concurrent.futures
import os
import re
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_actnorm
from tests.util import numpy_init, snapshot
from tf_actnorm import init


@pytest.fixture(params=["one-pass", "streamed", "merged"])
def budget(request, monkeypatch):
    """How ``initialize`` reads the data: all of it in one batch and one eager pass
    (the default for data this small), one pass per layer with each batch on its own,
    or one pass per layer with runs of two batches concatenated."""
    if request.param == "streamed":
        monkeypatch.setattr(init, "_MERGE_BYTES", 1)
    elif request.param == "merged":
        monkeypatch.setattr(init, "_MERGE_BYTES", 2 * 32 * 6 * 4)  # two batches of 32
    return request.param


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
def test_multi_batch_init_equals_one_batch_on_the_concatenation(rng, source, budget):
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


def test_nothing_to_initialise_is_said_when_verbose(rng, capsys):
    model = _three_layer_model()
    model(_data(rng, 16), training=True)
    assert tf_actnorm.initialize(model, _data(rng), verbose=1) == {}
    assert "nothing to initialise" in capsys.readouterr().out
    assert tf_actnorm.initialize(model, _data(rng), verbose=0) == {}
    assert capsys.readouterr().out == ""


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


def test_nested_models_in_data_flow_order(rng, budget):
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
    out = capsys.readouterr().out
    assert "6/6" in out  # 3 layers x 2 batches
    assert out.index("0/6") < out.index("6/6")  # shown before the first batch is read
    with pytest.raises(ValueError, match="no ActNorm"):
        tf_actnorm.initialize(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="no batches"):
        tf_actnorm.initialize(_three_layer_model(), [])


# ------------------------------------------------------------------ dataset scale


class _CallCounter(keras.layers.Layer):
    """The identity, counting how often Keras runs its ``call`` (eagerly or tracing)."""

    calls = 0

    def call(self, x):
        type(self).calls += 1
        return x


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.an0 = tf_actnorm.ActNorm(name="an0")
        self.dense1 = keras.layers.Dense(
            5, activation="tanh", kernel_initializer=keras.initializers.GlorotUniform(1))
        self.an1 = tf_actnorm.ActNorm(name="an1")
        self.dense2 = keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(2))
        self.an2 = tf_actnorm.ActNorm(name="an2")
        self.tail = _CallCounter(name="tail")

    def call(self, x, training=None):
        h = self.an1(self.dense1(self.an0(x, training=training)), training=training)
        return self.tail(self.an2(self.dense2(h), training=training))


def _model(kind):
    """The three-layer model as Sequential, functional, nested or subclassed, with a
    call counter after its last ActNorm. Same weights in every kind."""
    if kind == "subclassed":
        model = _Subclassed()
        model(np.zeros((1, 6), "float32"))
        return model
    layers = _three_layer_model().layers + [_CallCounter(name="tail")]
    if kind == "sequential":
        return keras.Sequential([keras.Input((6,)), *layers])
    inputs = keras.Input((6,))
    if kind == "functional":
        h = inputs
        for layer in layers:
            h = layer(h)
        return keras.Model(inputs, h)
    # nested: the second half is a Sequential inside a functional model
    inner = keras.Sequential([keras.Input((5,)), *layers[2:]], name="inner")
    return keras.Model(inputs, inner(layers[1](layers[0](inputs))))


def _actnorms(model):
    return {layer.name: layer for layer in model._flatten_layers() if isinstance(layer, tf_actnorm.ActNorm)}


def _assert_like_one_batch_init(model, data):
    reference = _one_batch_reference(data)
    layers = _actnorms(model)
    for name in ("an0", "an1", "an2"):
        for ours, theirs in zip(snapshot(layers[name]), snapshot(reference.get_layer(name))):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    bias, log_scale = numpy_init(data)
    np.testing.assert_allclose(layers["an0"].bias.numpy(), bias, rtol=1e-5)
    np.testing.assert_allclose(layers["an0"].log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sequential", "functional", "nested", "subclassed"])
def test_one_traced_function_serves_every_pass(rng, kind, monkeypatch):
    """Streamed (one pass per layer), exact for every model kind. The model runs in
    one call that finds the ActNorm layers in data-flow order and in one trace that
    all passes share, never once per layer or batch."""
    monkeypatch.setattr(init, "_MERGE_BYTES", 1)
    data = _data(rng)
    model = _model(kind)
    _CallCounter.calls = 0
    summary = tf_actnorm.initialize(model, tf.data.Dataset.from_tensor_slices(data).batch(16), verbose=0)
    assert list(summary) == ["an0", "an1", "an2"]
    assert _CallCounter.calls == 2
    _assert_like_one_batch_init(model, data)


@pytest.mark.parametrize("kind", ["sequential", "subclassed"])
def test_data_that_fits_one_batch_initialises_in_one_eager_pass(rng, kind, monkeypatch):
    """Up to _MERGE_BYTES of inputs, the batches are concatenated and one eager
    forward pass initialises every layer: no per-layer pass, no trace."""
    def never(*args, **kwargs):
        raise AssertionError("a per-layer pass ran")

    monkeypatch.setattr(init._Passes, "run", never)
    data = _data(rng)  # 128 x 6 floats: 3 KiB
    model = _model(kind)
    _CallCounter.calls = 0
    tf_actnorm.initialize(model, tf.data.Dataset.from_tensor_slices(data).batch(16), verbose=0)
    assert _CallCounter.calls == 2  # the call order, the initialising pass
    _assert_like_one_batch_init(model, data)
    # One byte less of budget than the data: streamed passes instead.
    monkeypatch.setattr(init, "_MERGE_BYTES", data.nbytes - 1)
    with pytest.raises(AssertionError, match="per-layer pass"):
        tf_actnorm.initialize(_model(kind), tf.data.Dataset.from_tensor_slices(data).batch(16), verbose=0)


def test_statistics_are_traced_once_per_layer_not_per_batch(rng, monkeypatch):
    from tf_actnorm import _ops

    monkeypatch.setattr(init, "_MERGE_BYTES", 1)
    calls = []
    moments = _ops.moments

    def counting(*args, **kwargs):
        calls.append(1)
        return moments(*args, **kwargs)

    monkeypatch.setattr(_ops, "moments", counting)
    data = _data(rng, 150)  # 10 batches of 16 and a last one of 6
    model = _three_layer_model()
    tf_actnorm.initialize(model, tf.data.Dataset.from_tensor_slices(data).batch(16), verbose=0)
    assert len(calls) == 3
    monkeypatch.undo()
    _assert_models_equal(model, _one_batch_reference(data))


def test_a_shared_layer_counts_every_call(rng):
    """A layer called twice per forward pass gets the statistics of both calls' inputs."""
    data = _data(rng)
    shared = tf_actnorm.ActNorm(name="shared")
    inputs = keras.Input((6,))
    left = shared(keras.layers.Lambda(lambda x: x[:, :3])(inputs))
    right = shared(keras.layers.Lambda(lambda x: x[:, 3:] * 2.0 - 1.0)(inputs))
    after = tf_actnorm.ActNorm(name="after")(keras.layers.Concatenate()([left, right]))
    model = keras.Model(inputs, after)
    summary = tf_actnorm.initialize(model, data, batch_size=32, verbose=0)
    assert list(summary) == ["shared", "after"]
    bias, log_scale = numpy_init(np.concatenate([data[:, :3], data[:, 3:] * 2.0 - 1.0]))
    np.testing.assert_allclose(shared.bias.numpy(), bias, rtol=1e-5)
    np.testing.assert_allclose(shared.log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model(data)).mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model(data)).std(0), 1.0, rtol=1e-4)


def test_a_generator_is_read_once(rng, budget):
    data = _data(rng)
    reads = []

    def batches():
        for i in range(0, 128, 32):
            reads.append(i)
            yield data[i:i + 32]

    model = _three_layer_model()
    tf_actnorm.initialize(model, batches(), verbose=0)
    assert reads == [0, 32, 64, 96]
    _assert_models_equal(model, _one_batch_reference(data))


def test_frozen_layers_are_skipped_unless_forced(rng, budget):
    data = _data(rng)
    inner = keras.Sequential([keras.Input((5,)), tf_actnorm.ActNorm(name="inner_an")], name="inner")
    inputs = keras.Input((6,))
    h = tf_actnorm.ActNorm(name="an0")(inputs)
    h = tf_actnorm.ActNorm(name="frozen_an", trainable=False)(h)
    h = inner(keras.layers.Dense(5, kernel_initializer=keras.initializers.GlorotUniform(3))(h))
    model = keras.Model(inputs, tf_actnorm.ActNorm(name="an1")(h))
    inner.trainable = False  # Keras freezes its layers too
    layers = _actnorms(model)
    before = {name: snapshot(layer) for name, layer in layers.items()}
    summary = tf_actnorm.initialize(model, data, verbose=0)
    assert list(summary) == ["an0", "an1"]
    for name in ("frozen_an", "inner_an"):
        for a, b in zip(before[name], snapshot(layers[name])):
            np.testing.assert_array_equal(a, b)
    summary = tf_actnorm.initialize(model, data, force=True, verbose=0)
    assert list(summary) == ["an0", "frozen_an", "inner_an", "an1"]
    assert all(bool(layer.initialized.numpy()) for layer in layers.values())
    # force: the frozen layers standardise their inputs like any other
    np.testing.assert_allclose(np.asarray(model(data)).mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model(data)).std(0), 1.0, rtol=1e-4)
    np.testing.assert_allclose(layers["frozen_an"].bias.numpy(), 0.0, atol=1e-5)  # input was standardised


def test_infinite_dataset_needs_steps(rng):
    data = _data(rng, 64)
    model = _three_layer_model()
    endless = tf.data.Dataset.from_tensor_slices(data).batch(32).repeat()
    with pytest.raises(ValueError, match="`steps`"):
        tf_actnorm.initialize(model, endless, verbose=0)
    assert not any(bool(model.get_layer(n).initialized.numpy()) for n in ("an0", "an1", "an2"))
    tf_actnorm.initialize(model, endless, steps=3, verbose=0)  # batches 1, 2, 1 again
    _assert_models_equal(model, _one_batch_reference(np.concatenate([data, data[:32]])))
    with pytest.raises(ValueError, match="`steps`"):
        tf_actnorm.initialize(_three_layer_model(), data, steps=0)


def test_unbatched_data_is_refused_with_a_hint(rng):
    data = _data(rng, 64)
    model = _three_layer_model()
    with pytest.raises(ValueError, match=r"single examples.*\.batch\(n\)"):
        tf_actnorm.initialize(model, tf.data.Dataset.from_tensor_slices(data), verbose=0)
    assert not bool(model.get_layer("an0").initialized.numpy())
    # A subclassed model has no declared input rank: its own error gets the hint as a note.
    images = tf.data.Dataset.from_tensor_slices(np.zeros((4, 8, 8, 1), "float32"))
    subclassed = _SpaceToDepth()
    subclassed(np.zeros((1, 8, 8, 1), "float32"))
    with pytest.raises(Exception) as raised:
        tf_actnorm.initialize(subclassed, images, verbose=0)
    assert any(".batch(n)" in note for note in getattr(raised.value, "__notes__", []))


class _SpaceToDepth(keras.Model):
    def __init__(self):
        super().__init__()
        self.actnorm = tf_actnorm.ActNorm()

    def call(self, x, training=None):
        return self.actnorm(tf.nn.space_to_depth(x, 2), training=training)


def test_progress_counts_without_a_total_when_the_size_is_unknown(rng, capsys):
    data = _data(rng, 64)
    unknown = tf.data.Dataset.from_tensor_slices(data).batch(32).filter(lambda x: True)
    assert unknown.cardinality() == tf.data.UNKNOWN_CARDINALITY
    model = _three_layer_model()
    tf_actnorm.initialize(model, unknown, verbose=1)
    out = capsys.readouterr().out
    assert re.search(r"\b6/Unknown", out), out  # 3 layers x 2 batches, no total
    _assert_models_equal(model, _one_batch_reference(data))


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_streaming_memory_does_not_grow_with_the_batches():
    """2,000 batches of 128x64 floats (64 MiB, made on the fly): the peak resident
    memory grows by less than half of that; the result is exact on all of it."""
    batches, shape = 2000, (128, 64)

    def dataset():
        return tf.data.Dataset.range(batches).map(
            lambda i: tf.random.stateless_normal(shape, tf.stack([i, 0]), mean=3.0, stddev=2.0))

    def model():
        return keras.Sequential([
            keras.Input((64,)), tf_actnorm.ActNorm(name="an0"), keras.layers.Dense(16),
            tf_actnorm.ActNorm(name="an1")])

    tf_actnorm.initialize(model(), dataset().take(4), verbose=0)  # load the machinery first
    measured = model()
    peak, stop = [_rss_bytes()], threading.Event()
    start = peak[0]

    def sample():
        while not stop.wait(0.002):
            peak.append(_rss_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        tf_actnorm.initialize(measured, dataset(), verbose=0)
    finally:
        stop.set()
        sampler.join()
    data_bytes = batches * np.prod(shape) * 4
    growth = max(peak) - start
    assert growth < data_bytes / 2, f"peak RSS grew by {growth / 2**20:.1f} MiB"
    everything = np.concatenate([b.numpy() for b in dataset()])
    bias, log_scale = numpy_init(everything)
    np.testing.assert_allclose(measured.get_layer("an0").bias.numpy(), bias, rtol=1e-5)
    np.testing.assert_allclose(measured.get_layer("an0").log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-6)


class _InBranch(keras.layers.Layer):
    """Calls its ActNorm inside a tf.cond branch (a branch graph when traced)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.actnorm = tf_actnorm.ActNorm(name="branch_an")

    def call(self, x, training=None):
        return tf.cond(tf.reduce_all(tf.math.is_finite(x)),
                       lambda: self.actnorm(x, training=training), lambda: x)

    def compute_output_shape(self, input_shape):
        return input_shape


def test_a_layer_inside_a_traced_branch_is_collected_eagerly(rng, budget):
    """A layer that the model calls inside its own control flow (a tf.cond branch, an
    RNN cell's loop) cannot hand its statistics out of the branch graph: that layer
    falls back to eager passes, with the same result."""
    data = _data(rng)
    inputs = keras.Input((6,))
    h = tf_actnorm.ActNorm(name="an0")(inputs)
    branch = _InBranch()
    model = keras.Model(inputs, branch(keras.layers.Dense(3)(h)))
    summary = tf_actnorm.initialize(model, tf.data.Dataset.from_tensor_slices(data).batch(32), verbose=0)
    assert list(summary) == ["an0", "branch_an"]
    hidden = keras.Model(inputs, model.layers[2].output)(data)
    bias, log_scale = numpy_init(hidden)
    np.testing.assert_allclose(branch.actnorm.bias.numpy(), bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(branch.actnorm.log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-6)


class _MaskedSequences(keras.Model):
    """Masked sequences (Embedding with mask_zero), layers of different widths, and a
    channels-first layer: what the passes flatten and pad must stay exact."""

    def __init__(self):
        super().__init__()
        self.embed = keras.layers.Embedding(
            10, 4, mask_zero=True, embeddings_initializer=keras.initializers.RandomNormal(3.0, 2.0, seed=1))
        self.an0 = tf_actnorm.ActNorm(name="an0")
        self.dense = keras.layers.Dense(7, kernel_initializer=keras.initializers.GlorotUniform(3))
        self.an1 = tf_actnorm.ActNorm(name="an1")
        self.an2 = tf_actnorm.ActNorm(axis=1, name="an2")

    def call(self, tokens, training=None):
        h = self.an0(self.embed(tokens), training=training)
        h = self.an1(self.dense(h), training=training)
        return self.an2(tf.transpose(h, [0, 2, 1]), training=training)  # [batch, 7, time]


def test_masks_widths_and_channels_first_stay_exact(rng, budget):
    tokens = rng.integers(1, 10, size=(96, 5))
    tokens[rng.random(96) < 0.5, 3:] = 0  # padding
    model, reference = _MaskedSequences(), _MaskedSequences()
    model(tokens[:2]), reference(tokens[:2])
    reference(tokens, training=True)  # one-batch init on all of it
    tf_actnorm.initialize(model, tokens, batch_size=16, verbose=0)
    for name in ("an0", "an1", "an2"):
        for ours, theirs in zip(snapshot(getattr(model, name)), snapshot(getattr(reference, name))):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    embedded = model.embed(tokens).numpy()[tokens != 0]  # the unmasked positions
    bias, log_scale = numpy_init(embedded)
    np.testing.assert_allclose(model.an0.bias.numpy(), bias, rtol=1e-5)
    np.testing.assert_allclose(model.an0.log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sequential", "subclassed"])
def test_mixed_precision_statistics_in_float32(rng, kind, monkeypatch):
    """Under mixed_float16 the layers see float16 inputs; the streamed statistics are
    float32 and equal numpy's on those float16 values."""
    monkeypatch.setattr(init, "_MERGE_BYTES", 1)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        data = _data(rng)
        model = _model(kind)
        tf_actnorm.initialize(model, data, batch_size=32, verbose=0)
        layer = _actnorms(model)["an0"]
        assert layer.compute_dtype == "float16" and layer.initial_bias.dtype == "float32"
        bias, log_scale = numpy_init(data.astype("float16").astype("float64"))
        np.testing.assert_allclose(layer.bias.numpy(), bias, rtol=1e-5)
        np.testing.assert_allclose(layer.log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-6)
        assert np.isfinite(np.asarray(model(data), "float32")).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


class _TwoPrecisions(keras.Model):
    def __init__(self):
        super().__init__()
        self.an0 = tf_actnorm.ActNorm(dtype="float64", name="an0")
        self.dense = keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(5))
        self.an1 = tf_actnorm.ActNorm(name="an1")

    def call(self, x, training=None):
        return self.an1(self.dense(self.an0(x, training=training)), training=training)


def test_float64_and_float32_layers_in_one_model(rng, budget):
    """Each layer's statistics in its own dtype (float64 for a float64 layer), also
    when the passes of both share one traced function."""
    # float32 values: the model's float32 autocast of its inputs loses nothing, so float64
    # statistics agree with numpy's to 1e-12 and float32 ones would not.
    data = _data(rng).astype("float64")
    model = _TwoPrecisions()
    model(data[:2])
    tf_actnorm.initialize(model, data, batch_size=32, verbose=0)
    assert model.an0.initial_bias.dtype == "float64"
    bias, log_scale = numpy_init(data)
    np.testing.assert_allclose(model.an0.bias.numpy(), bias, rtol=1e-12)
    np.testing.assert_allclose(model.an0.log_scale.numpy(), log_scale, rtol=1e-12, atol=1e-12)
    hidden = model.dense(model.an0(data)).numpy()
    bias, log_scale = numpy_init(hidden)
    np.testing.assert_allclose(model.an1.bias.numpy(), bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.an1.log_scale.numpy(), log_scale, rtol=1e-5, atol=1e-5)


def test_runs_of_batches_respect_the_smaller_of_their_limits(monkeypatch):
    """A compiled pass may ask for runs smaller than ``_MERGE_BYTES`` (JAX on a CPU);
    every batch is in exactly one run, in order, whatever the limit."""
    data = np.arange(10 * 8 * 4, dtype="float32").reshape(80, 4)  # ten batches of 128 bytes
    source = init._Source(data, None, 8)

    def sizes(limit=None):
        return [n for _, n in source.merged_batches(limit)]

    monkeypatch.setattr(init, "_MERGE_BYTES", 3 * 128)
    assert sizes() == [3, 3, 3, 1]
    assert sizes(2 * 128) == [2, 2, 2, 2, 2]
    assert sizes(10 * 128) == [3, 3, 3, 1]  # never above _MERGE_BYTES
    merged = np.concatenate([np.asarray(b) for b, _ in source.merged_batches(2 * 128)])
    np.testing.assert_array_equal(merged, data)


def test_runs_computed_side_by_side_come_back_in_data_order():
    """A compiled pass (of a model or a flow) computes two runs of batches at once;
    their results are yielded (and combined) in data order whichever finishes first,
    never more than two run at once, and an error in one reaches the caller. A run
    that the function has not compiled for yet, and every run of an eager pass (no
    pool), is computed in the calling thread."""
    running, most, count = [0], [0], [5]
    lock = threading.Lock()
    second_started = threading.Event()

    def fn(batch):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        if batch % 2 == 0 and batch + 1 < count[0]:  # waits until the next run has started
            second_started.wait(5)
            second_started.clear()
        else:
            second_started.set()
        with lock:
            running[0] -= 1
        if batch == 5:
            raise ValueError("run 5 failed")
        return batch * 10

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = [(b, b + 1) for b in range(5)]
        assert list(init.two_at_a_time(pool, fn, runs)) == [(b * 10, b + 1) for b in range(5)]
        assert most[0] == 2
        count[0] = 6
        with pytest.raises(ValueError, match="run 5 failed"):
            list(init.two_at_a_time(pool, fn, [(b, 1) for b in range(6)]))
        # Runs that `in_caller` picks are computed in the calling thread, in their place.
        threads = []
        results = init.two_at_a_time(
            pool, lambda b: threads.append(threading.current_thread()) or b * 10,
            [(b, 1) for b in range(1, 6, 2)], in_caller=lambda b: b == 3)
        assert list(results) == [(10, 1), (30, 1), (50, 1)]
        assert threads.count(threading.current_thread()) == 1
    # Without a pool (eager passes) every run is computed in the calling thread, in order.
    threads.clear()
    assert list(init.two_at_a_time(None, lambda b: threads.append(threading.current_thread())
                                   or b * 10, [(b, 1) for b in range(3)])) == [
        (0, 1), (10, 1), (20, 1)]
    assert threads == [threading.current_thread()] * 3
