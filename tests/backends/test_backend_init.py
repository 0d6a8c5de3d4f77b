"""``tf_actnorm.initialize`` and repeated calls on the JAX / PyTorch Keras backends.

The truths are numpy's statistics (``tests/util.py``) and one training call of an
identical model on all the batches at once.
"""


import keras
import numpy as np
import pytest

import tf_actnorm
from backend_util import BACKEND, npy
from tests.repeated_calls import initialised_layer_fit_warnings
from tests.repeated_calls import initialize_standardises_every_step, step_data
from tests.repeated_calls import training_calls_warn_once
from tests.util import numpy_init
from tf_actnorm import init


def _three_layer_model():
    return keras.Sequential([
        keras.Input((6,)),
        tf_actnorm.ActNorm(name="an0"),
        keras.layers.Dense(5, activation="tanh", kernel_initializer=keras.initializers.GlorotUniform(1)),
        tf_actnorm.ActNorm(name="an1"),
        keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(2)),
        tf_actnorm.ActNorm(name="an2"),
    ])


class _Subclassed(keras.Model):
    """The same layers and weights, without a layer graph."""

    def __init__(self):
        super().__init__()
        self.an0 = tf_actnorm.ActNorm(name="an0")
        self.dense1 = keras.layers.Dense(
            5, activation="tanh", kernel_initializer=keras.initializers.GlorotUniform(1))
        self.an1 = tf_actnorm.ActNorm(name="an1")
        self.dense2 = keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(2))
        self.an2 = tf_actnorm.ActNorm(name="an2")

    def call(self, x, training=None):
        h = self.an1(self.dense1(self.an0(x, training=training)), training=training)
        return self.an2(self.dense2(h), training=training)


def _data(rng, n=128):
    return (rng.normal(size=(n, 6)) * [1, 2, 3, 4, 5, 6] + [10, -3, 0, 1, 2, 100]).astype("float32")


def _layers(model):
    return [model.get_layer(name) for name in ("an0", "an1", "an2")]


@pytest.mark.parametrize("kind", ["sequential", "subclassed"])
@pytest.mark.parametrize("merge_bytes", [1 << 20, 1], ids=["one-pass", "streamed"])
def test_initialize_equals_one_training_call_on_all_batches(rng, kind, merge_bytes, monkeypatch):
    """Layer by layer equal to one training call on the concatenation, whether the data
    fits one eager pass or streams one batch at a time through the compiled passes (on
    JAX, in two compiled functions: the first, for two layers, a prefix of the model)."""
    monkeypatch.setattr(init, "_MERGE_BYTES", merge_bytes)
    monkeypatch.setattr(init, "_JIT_FUNCTIONS", 2)
    compiled = []
    compile_pass = init._compile
    monkeypatch.setattr(init, "_compile", lambda *args: compiled.append(1) or compile_pass(*args))
    data = _data(rng)
    make = _three_layer_model if kind == "sequential" else _Subclassed
    model, reference = make(), make()
    model(data[:1]), reference(data[:1])
    batches = [data[i:i + 32] for i in range(0, 128, 32)]
    summary = tf_actnorm.initialize(model, batches, verbose=0)
    assert list(summary) == ["an0", "an1", "an2"]
    streamed = merge_bytes == 1
    assert len(compiled) == (0 if not streamed else 2 if BACKEND == "jax" else 1)
    reference(data, training=True)
    for ours, theirs in zip(_layers(model), _layers(reference), strict=True):
        for a, b in zip(ours.weights, theirs.weights, strict=True):
            np.testing.assert_allclose(npy(a), npy(b), rtol=1e-5, atol=1e-5)
    bias, log_scale = numpy_init(data)
    np.testing.assert_allclose(npy(model.get_layer("an0").bias), bias, rtol=1e-5)
    np.testing.assert_allclose(npy(model.get_layer("an0").log_scale), log_scale, rtol=1e-5, atol=1e-6)


def test_masks_and_a_generator_read_once(rng, monkeypatch):
    """Masked positions do not count; a one-shot generator is read once."""
    monkeypatch.setattr(init, "_MERGE_BYTES", 1)
    tokens = rng.integers(1, 10, size=(64, 5))
    tokens[rng.random(64) < 0.5, 3:] = 0  # padding
    embed = keras.layers.Embedding(10, 4, mask_zero=True,
                                   embeddings_initializer=keras.initializers.RandomNormal(3.0, 2.0, seed=1))
    layer = tf_actnorm.ActNorm()
    model = keras.Sequential([keras.Input((5,), dtype="int32"), embed, layer, keras.layers.Dense(2)])
    reads = []

    def batches():
        for i in range(0, 64, 16):
            reads.append(i)
            yield tokens[i:i + 16]

    tf_actnorm.initialize(model, batches(), verbose=0)
    assert reads == [0, 16, 32, 48]
    bias, log_scale = numpy_init(npy(embed(tokens))[tokens != 0])
    np.testing.assert_allclose(npy(layer.bias), bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(npy(layer.log_scale), log_scale, rtol=1e-5, atol=1e-6)


def test_progress_refusals_and_nothing_to_do(rng, capsys):
    model = _three_layer_model()
    tf_actnorm.initialize(model, _data(rng, 64), batch_size=32, verbose=1)
    out = capsys.readouterr().out
    assert "6/6" in out and out.index("0/6") < out.index("6/6")  # 3 layers x 2 batches
    assert tf_actnorm.initialize(model, _data(rng, 64), verbose=1) == {}
    assert "nothing to initialise" in capsys.readouterr().out
    fresh = _three_layer_model()
    with pytest.raises(ValueError, match=r"single examples.*\.batch\(n\)"):
        tf_actnorm.initialize(fresh, list(_data(rng, 8)), verbose=0)
    with pytest.raises(ValueError, match="no batches"):
        tf_actnorm.initialize(fresh, [], verbose=0)
    with pytest.raises(ValueError, match="`steps`"):
        tf_actnorm.initialize(fresh, _data(rng, 8), steps=0)
    assert not any(bool(npy(layer.initialized)) for layer in _layers(fresh))


def test_bad_init_data_raises_value_error_naming_the_layer(rng):
    data = _data(rng, 64)
    data[3, 2] = np.nan
    model = _three_layer_model()
    with pytest.raises(ValueError, match="an0: cannot initialise from data containing NaN or Inf"):
        tf_actnorm.initialize(model, data, verbose=0)
    assert not bool(npy(model.get_layer("an0").initialized))


@pytest.mark.parametrize("kind", ["time_distributed", "shared"])
@pytest.mark.parametrize("fit", [False, True], ids=["eager", "fit"])
def test_repeated_calls_in_one_forward_pass_warn_once(rng, kind, fit):
    """One warning naming the layer and pointing to `initialize`, eagerly and in a
    compiled `fit` (`jax.jit` on JAX); the first call's inputs initialised it."""
    x = step_data(rng)
    found, layer = training_calls_warn_once(kind, x, fit=fit)
    assert len(found) == 1, found
    assert "tf_actnorm.initialize" in str(found[0].message)
    batch = x[:len(x) // 2] if fit else x
    first = batch[:, 0] if kind == "time_distributed" else batch[:, :3]
    bias, _ = numpy_init(first.reshape(-1, x.shape[-1]))
    np.testing.assert_allclose(npy(layer.bias), bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["time_distributed", "shared"])
def test_initialize_counts_every_call(rng, kind):
    initialize_standardises_every_step(kind, step_data(rng))


def test_an_initialised_layer_called_per_step_does_not_warn_in_fit(rng):
    assert initialised_layer_fit_warnings("time_distributed", step_data(rng)) == []


@pytest.mark.skipif(BACKEND != "torch",
                    reason="model.export(format='onnx') through PyTorch's exporter: PyTorch backend only")
def test_onnx_export_refuses_an_uninitialised_layer_and_serves_an_initialised_one(rng, tmp_path):
    """The same refusal (and message) as a TensorFlow SavedModel's; once initialised the
    export serves `predict`'s outputs in onnxruntime."""
    import onnxruntime

    model = keras.Sequential([keras.Input((4,)), tf_actnorm.ActNorm(name="an"), keras.layers.Dense(2)])
    x = (rng.normal(size=(16, 4)) * 3 + 5).astype("float32")
    model(x)  # built and called: only ActNorm's state stands in the way
    with pytest.raises(ValueError, match="ActNorm 'an' was never initialised, so exporting it"):
        model.export(str(tmp_path / "uninitialised.onnx"), format="onnx", verbose=False)
    static = [keras.InputSpec(shape=(16, 4), dtype="float32")]  # Keras tries dynamo first
    with pytest.raises(ValueError, match="ActNorm 'an' was never initialised, so exporting it"):
        model.export(str(tmp_path / "static.onnx"), format="onnx", verbose=False,
                     input_signature=static)
    model(x, training=True)
    path = str(tmp_path / "model.onnx")
    model.export(path, format="onnx", verbose=False)
    session = onnxruntime.InferenceSession(path)
    served = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(served, npy(model.predict(x, verbose=0)), rtol=1e-5, atol=1e-5)
