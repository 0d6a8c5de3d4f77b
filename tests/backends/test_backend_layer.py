"""ActNorm on the JAX / PyTorch Keras backends: the layer test matrix.

The truths are numpy's (``tests/util.py``), the backend's own autodiff Jacobian,
round trips, and files written by other backends and by tf_actnorm 0.1.0.
"""

import glob
import importlib.util
import os
import sys

import keras
import numpy as np
import pytest
from keras import ops

import tf_actnorm
from backend_util import BACKEND, data, grad, jacobian, npy, weights
from tests.util import assign_parameters, numpy_init

DATA = os.path.join(os.path.dirname(__file__), os.pardir, "data")
TOL = dict(rtol=1e-5, atol=1e-5)
JIT = {"jit_compile": True} if BACKEND == "jax" else {}  # fit runs under jax.jit

SHAPES = [((16, 3), -1), ((6, 3, 5), 1), ((4, 5, 6, 3), -1), ((3, 3, 2, 4, 5), 1)]
IDS = [f"rank{len(s)}-axis{a}" for s, a in SHAPES]


def _model(shape, lr=0.0, name="an", **layer_kwargs):
    model = keras.Sequential([keras.Input(shape), tf_actnorm.ActNorm(name=name, **layer_kwargs),
                              keras.layers.Flatten(), keras.layers.Dense(1, name="dense")])
    model.compile(keras.optimizers.SGD(lr), "mse", **JIT)
    return model


def test_import_and_layer_need_no_tensorflow():
    layer = tf_actnorm.ActNorm()
    layer(np.ones((2, 3), "float32"), training=True)
    assert "tensorflow" not in sys.modules
    with pytest.raises(NotImplementedError, match="TensorFlow Keras backend"):
        layer.bijector  # noqa: B018
    if importlib.util.find_spec("tensorflow") is None:
        with pytest.raises(ImportError, match=r'needs tensorflow: install the tensorflow extra .*pip install "\.\[tensorflow\]"'):
            tf_actnorm.ActNormBijector  # noqa: B018
    assert callable(tf_actnorm.initialize)  # any Keras backend
    assert "tensorflow" not in sys.modules


def test_the_backend_module_provides_every_hook():
    """The layer's one implementation (``_ops``) asks ``_backend.kernels()`` for what this
    backend does its own way; the module chosen for it has every name it may ask for."""
    from tf_actnorm import _backend

    kernels = _backend.kernels()
    assert kernels.__name__ == f"tf_actnorm._{BACKEND}_backend"
    assert [name for name in _backend.HOOKS if not hasattr(kernels, name)] == []
    assert kernels.OUTPUT_GRADIENT is False  # autodiff here (measured: docs/benchmarks.md)


@pytest.mark.parametrize("shape,axis", SHAPES, ids=IDS)
def test_init_matches_numpy_and_standardises(rng, shape, axis):
    x = data(rng, shape, axis)
    layer = tf_actnorm.ActNorm(axis=axis)
    y = npy(layer(x, training=True))
    bias, log_scale = numpy_init(x, axis)
    np.testing.assert_allclose(npy(layer.bias), bias, **TOL)
    np.testing.assert_allclose(npy(layer.log_scale), log_scale, **TOL)
    assert npy(layer.initialized)
    reduce = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    np.testing.assert_allclose(y.mean(reduce), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.std(reduce), 1.0, atol=1e-4)


def test_fit_initialises_once_from_the_first_batch(rng):
    x = data(rng, (24, 4, 3))
    model = _model((4, 3))
    layer = model.get_layer("an")
    model.fit(x, x[:, 0, :1], batch_size=8, epochs=1, shuffle=False, verbose=0)
    bias, log_scale = numpy_init(x[:8])  # the first batch, not the whole epoch
    np.testing.assert_allclose(npy(layer.bias), bias, **TOL)
    np.testing.assert_allclose(npy(layer.log_scale), log_scale, **TOL)
    np.testing.assert_array_equal(npy(layer.bias_residual), 0.0)
    assert npy(layer.initialized)
    initial = [npy(layer.initial_bias), npy(layer.initial_log_scale)]
    # A second fit, with a learning rate, on data with very different statistics:
    # the residuals train, the data-dependent part never changes again.
    model.compile(keras.optimizers.SGD(0.05), "mse", **JIT)
    other = data(rng, (16, 4, 3), loc=-50.0, scale=20.0) / 10.0
    model.fit(other, other[:, 0, :1], batch_size=8, epochs=1, verbose=0)
    np.testing.assert_array_equal(npy(layer.initial_bias), initial[0])
    np.testing.assert_array_equal(npy(layer.initial_log_scale), initial[1])
    assert np.abs(npy(layer.bias_residual)).max() > 1e-4
    np.testing.assert_allclose(npy(layer.bias), initial[0] + npy(layer.bias_residual), rtol=1e-6)


def test_predict_evaluate_and_frozen_layers_never_initialise(rng):
    x = data(rng, (8, 4, 3))
    model = _model((4, 3))
    layer = model.get_layer("an")
    before = weights(layer)
    model.predict(x, verbose=0)
    model.evaluate(x, x[:, 0, :1], verbose=0)
    np.testing.assert_allclose(npy(layer(x)), x)  # training unset: inference, identity
    layer.trainable = False
    model.compile(keras.optimizers.SGD(0.1), "mse", **JIT)
    model.fit(x, x[:, 0, :1], batch_size=8, verbose=0)
    for b, a in zip(before, weights(layer), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape,axis", [((3, 4, 2), -1), ((2, 3, 2, 2), 1)])
def test_forward_inverse_and_log_det_jacobian(rng, shape, axis):
    layer = tf_actnorm.ActNorm(axis=axis)
    layer(data(rng, shape, axis), training=True)
    channels = shape[axis]
    assign_parameters(layer, bias=rng.normal(size=channels),
                      log_scale=rng.normal(scale=0.5, size=channels))
    x = rng.normal(size=shape).astype("float32")
    cshape = [1] * len(shape)
    cshape[axis] = channels
    b, ls = npy(layer.bias).reshape(cshape), npy(layer.log_scale).reshape(cshape)
    y = npy(layer(x))
    np.testing.assert_allclose(y, np.exp(ls) * (x + b), **TOL)
    np.testing.assert_allclose(npy(layer.inverse(y)), x, **TOL)
    jac = jacobian(lambda t: layer(t), x)
    n, dims = shape[0], int(np.prod(shape[1:]))
    jac = jac.reshape(n, dims, n, dims)
    expected = [np.linalg.slogdet(jac[i, :, i, :].astype(np.float64))[1] for i in range(n)]
    np.testing.assert_allclose(npy(layer.forward_log_det_jacobian(x)), expected, rtol=1e-5, atol=1e-4)


def test_no_gradient_flows_through_initialisation(rng):
    """As on TensorFlow (variables read after the assignment), the initialising call's
    gradient is that of the initialised transform: ``dy/dx = s``, no path through the
    batch statistics."""
    x = data(rng, (6, 3))
    w = rng.normal(size=(6, 3)).astype("float32")
    layer = tf_actnorm.ActNorm()
    g = grad(lambda t: layer(t, training=True) * ops.convert_to_tensor(w), x)
    assert npy(layer.initialized)
    np.testing.assert_allclose(g, w * np.exp(npy(layer.log_scale)), rtol=1e-5)


def test_masked_init_and_log_det(rng):
    lengths = [4, 1, 3]
    x = data(rng, (3, 4, 2))
    mask = np.arange(4)[None, :] < np.asarray(lengths)[:, None]
    x[~mask] = 0.0  # padding, which would drag the statistics toward 0 if counted
    layer = tf_actnorm.ActNorm()
    layer(x, mask=mask, training=True)
    bias, log_scale = numpy_init(x, valid=mask)
    np.testing.assert_allclose(npy(layer.bias), bias, **TOL)
    np.testing.assert_allclose(npy(layer.log_scale), log_scale, **TOL)
    log_det = npy(layer.forward_log_det_jacobian(x, mask=mask))
    np.testing.assert_allclose(log_det, np.asarray(lengths) * npy(layer.log_scale).sum(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["nan", "empty"])
def test_bad_init_data_raises_eagerly_and_changes_nothing(rng, kind):
    layer = tf_actnorm.ActNorm(name="my_actnorm")
    layer.build((None, 3))
    before = weights(layer)
    x = data(rng, (8, 3))
    if kind == "nan":
        x[2, 1] = np.nan
    message = "empty batch" if kind == "empty" else "NaN or Inf"
    with pytest.raises(ValueError, match=f"my_actnorm: cannot initialise from .*{message}"):
        layer(x[:0] if kind == "empty" else x, training=True)
    for b, a in zip(before, weights(layer), strict=True):
        np.testing.assert_array_equal(a, b)
    layer(data(rng, (8, 3)), training=True)  # a good batch still initialises afterwards
    assert npy(layer.initialized)


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit: JAX backend only")
def test_bad_init_data_under_jit_changes_nothing(rng):
    import jax

    layer = tf_actnorm.ActNorm()
    layer.build((None, 3))
    x = data(rng, (8, 3))
    x[2, 1] = np.inf
    call = jax.jit(lambda tv, ntv, t: layer.stateless_call(tv, ntv, t, training=True))
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    _, new = call(trainable, non_trainable, x)
    for b, a in zip(non_trainable, new, strict=True):
        np.testing.assert_array_equal(npy(a), npy(b))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_statistics_in_float32(rng, policy):
    keras.mixed_precision.set_global_policy(policy)
    compute = policy.removeprefix("mixed_")
    layer = tf_actnorm.ActNorm()
    # Magnitude ~300: squares (~9e4) overflow float16 (max 65504).
    x = (rng.normal(size=(64, 4)) * 20 + [300, -300, 250, 0]).astype("float32")
    y = layer(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == compute
    assert layer.initial_bias.dtype == "float32" and layer.log_scale_residual.dtype == "float32"
    x_seen = npy(ops.cast(ops.cast(x, compute), "float32")).astype(np.float64)
    bias, log_scale = numpy_init(x_seen)
    np.testing.assert_allclose(npy(layer.bias), bias, rtol=1e-5)
    np.testing.assert_allclose(npy(layer.log_scale), log_scale, rtol=1e-4, atol=1e-5)


def test_keras_file_round_trip_never_reinitialises(rng, tmp_path):
    x = data(rng, (16, 4, 3))
    model = _model((4, 3), lr=0.05)
    model.fit(x, x[:, 0, :1], batch_size=8, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    new = data(rng, (5, 4, 3), loc=40.0)
    np.testing.assert_array_equal(npy(loaded.predict(new, verbose=0)), npy(model.predict(new, verbose=0)))
    layer = loaded.get_layer("an")
    before = npy(layer.initial_bias)
    layer(new, training=True)  # training mode on other data: restored, so no init
    np.testing.assert_array_equal(npy(layer.initial_bias), before)


def test_keras_file_of_tf_actnorm_0_1_0_migrates():
    """A .keras file written by tf_actnorm 0.1.0 on TensorFlow (three weights: bias,
    log_scale, initialized) loads: the old values become the data-dependent part."""
    model = keras.models.load_model(os.path.join(DATA, "actnorm_0.1.0.keras"))
    with np.load(os.path.join(DATA, "actnorm_0.1.0.npz")) as saved:
        saved = dict(saved)
    layer = model.get_layer("an")
    np.testing.assert_array_equal(npy(layer.initial_bias), saved["bias"])
    np.testing.assert_array_equal(npy(layer.initial_log_scale), saved["log_scale"])
    np.testing.assert_array_equal(npy(layer.bias_residual), 0.0)
    assert npy(layer.initialized)
    np.testing.assert_allclose(npy(model(saved["x"], training=False)), saved["y"], rtol=1e-5, atol=1e-5)


def _exchange_model(rng):
    keras.utils.set_random_seed(5)
    model = _model((4, 3), lr=0.05)
    x = data(rng, (16, 4, 3))
    model.fit(x, x[:, 0, :1], batch_size=8, verbose=0)
    return model


def test_cross_backend_keras_files(rng, exchange):
    """Loads every ``.keras`` file other backends wrote into the exchange folder and
    checks its outputs there, then writes this backend's for the next ones."""
    found = sorted(glob.glob(os.path.join(exchange, "*.keras")))
    written_by = [os.path.basename(p).removesuffix(".keras") for p in found]
    assert "tensorflow" in written_by, found  # the TensorFlow suite writes it first
    for path, backend in zip(found, written_by, strict=True):
        with np.load(path.removesuffix(".keras") + ".npz") as saved:
            saved = dict(saved)
        # Keras records a compiled model's optimizer by its backend class; PyTorch's needs
        # torch to import (a Keras limitation, every model), so that file loads uncompiled.
        model = keras.models.load_model(path, compile=backend != "torch")
        for got, want in zip(model.get_weights(), [saved[f"w{i}"] for i in range(len(saved) - 2)],
                             strict=True):
            np.testing.assert_array_equal(got, want, err_msg=backend)
        np.testing.assert_allclose(npy(model.predict(saved["x"], verbose=0)), saved["y"],
                                   rtol=1e-5, atol=1e-5, err_msg=backend)
    model = _exchange_model(rng)
    new = data(rng, (5, 4, 3), loc=-7.0)
    model.save(os.path.join(exchange, f"{BACKEND}.keras"))
    np.savez(os.path.join(exchange, f"{BACKEND}.npz"), x=new, y=npy(model.predict(new, verbose=0)),
             **{f"w{i}": w for i, w in enumerate(model.get_weights())})


@pytest.mark.skipif(BACKEND != "jax", reason="stateless_call under jax.jit: JAX backend only")
def test_keras_drops_trainable_assignments_in_jax_fit():
    """Why the data-dependent values live in non-trainable variables: Keras 3's JAX
    ``fit`` returns new values only for non-trainable variables (measured here, so a
    Keras change that lifts this shows up)."""

    class Probe(keras.layers.Layer):
        def build(self, shape):
            self.t = self.add_weight(shape=(), initializer="zeros")
            self.n = self.add_weight(shape=(), initializer="zeros", trainable=False)

        def call(self, x, training=None):
            if training:
                self.t.assign(ops.mean(x))
                self.n.assign(ops.mean(x))
            return x + 0.0 * self.t

    probe = Probe()
    model = keras.Sequential([keras.Input((1,)), probe])
    model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=True)
    x = np.full((4, 1), 5.0, "float32")
    model.fit(x, x, verbose=0)
    assert npy(probe.n) == 5.0 and npy(probe.t) == 0.0


@pytest.fixture(scope="module")
def data_parallel():
    """The runs of ``data_parallel.py`` (one fresh process with 2 CPU devices), by mode."""
    import json
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "data_parallel.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution.DataParallel: JAX backend only")
def test_data_parallel_fit_initialises_from_the_global_batch(data_parallel):
    """DataParallel over 2 CPU devices: the first fit batch (4 examples per device, with
    very different statistics per device) initialises from the global batch, equal to
    numpy and to the single-device init on the same data; later batches change nothing."""
    distributed, single = data_parallel["distributed"], data_parallel["single"]
    assert distributed["devices"] == 2 and distributed["sharding_devices"] == 2
    assert distributed["initialized"]
    bias, log_scale = numpy_init(np.asarray(distributed["x"]))
    np.testing.assert_allclose(distributed["bias"], bias, **TOL)
    np.testing.assert_allclose(distributed["log_scale"], log_scale, **TOL)
    np.testing.assert_allclose(distributed["bias"], single["bias"], **TOL)
    np.testing.assert_allclose(distributed["log_scale"], single["log_scale"], **TOL)


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution.DataParallel: JAX backend only")
def test_data_parallel_initialize_gives_the_statistics_of_all_batches(data_parallel):
    """`initialize` under DataParallel over 2 CPU devices (each batch split over the
    devices, halves with very different statistics), streaming through its compiled
    passes: numpy's statistics of all the batches, layer by layer, as on one device."""
    distributed, single = data_parallel["initialize-distributed"], data_parallel["initialize"]
    assert distributed["devices"] == 2 and distributed["sharding_devices"] == 2
    bias, log_scale = numpy_init(np.asarray(distributed["x"]))
    np.testing.assert_allclose(distributed["bias"], bias, **TOL)
    np.testing.assert_allclose(distributed["log_scale"], log_scale, **TOL)
    bias, log_scale = numpy_init(np.asarray(distributed["hidden"]))
    np.testing.assert_allclose(distributed["bias1"], bias, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(distributed["log_scale1"], log_scale, rtol=1e-4, atol=1e-4)
    for key in ("bias", "log_scale", "bias1", "log_scale1"):
        np.testing.assert_allclose(distributed[key], single[key], **TOL)
