"""ActNorm on the JAX and PyTorch Keras backends, driven from this suite.

The backend sub-suite (``tests/backends/``) runs in a fresh interpreter per backend, in
this environment but with ``tests/backends/without_tensorflow`` first on ``PYTHONPATH``:
there ``import tensorflow`` (and ``tensorflow_probability``) fails, as it does where only
the ``jax`` or ``torch`` extra is installed, so any code path that needs TensorFlow fails
the sub-suite. That the extras themselves install no TensorFlow is checked against pip's
own resolver (``test_backend_extras_install_no_tensorflow``).

``.keras`` files cross backends both ways: this (TensorFlow) process writes one before
the runs, each backend loads the files of the backends before it and writes its own,
and this process loads theirs at the end.
"""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
WITHOUT_TENSORFLOW = os.path.join(ROOT, "tests", "backends", "without_tensorflow")
JAX_ONLY = "JAX backend only"
TORCH_ONLY = "PyTorch backend only"


def backend_env(backend, **extra):
    """The environment of a process on ``backend`` in which TensorFlow cannot be imported."""
    path = os.pathsep.join(p for p in (WITHOUT_TENSORFLOW, ROOT, os.environ.get("PYTHONPATH"))
                           if p)
    return dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=path, **extra)


def _suite(backend, exchange):
    proc = subprocess.run(
        # `-o addopts=`: one process (not setup.cfg's two workers) for this small sub-suite.
        [sys.executable, "-m", "pytest", "-q", "-rs", "-o", "addopts=", "-p", "no:cacheprovider",
         "--confcutdir=tests/backends", "tests/backends"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=backend_env(backend, TF_ACTNORM_EXCHANGE=exchange))
    last = proc.stdout.splitlines()[-1] if proc.stdout else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", last)}
    skips = re.findall(r"^SKIPPED \[\d+\] \S+: (.*)$", proc.stdout, re.M)
    return {"returncode": proc.returncode, "counts": counts, "skips": skips,
            "output": proc.stdout[-6000:] + proc.stderr[-3000:]}


def _exchange_model(rng):
    import tf_actnorm

    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4, 3)), tf_actnorm.ActNorm(name="an"),
                              keras.layers.Flatten(), keras.layers.Dense(1, name="dense")])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    x = (rng.normal(size=(16, 4, 3)) * [1, 2, 3] + [3, -1, 2]).astype("float32")
    model.fit(x, x[:, 0, :1], batch_size=8, verbose=0)
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The sub-suite on JAX, then on PyTorch; the exchange folder."""
    exchange = str(tmp_path_factory.mktemp("exchange"))
    rng = np.random.default_rng(11)
    model = _exchange_model(rng)
    new = (rng.normal(size=(5, 4, 3)) * 4 + 1).astype("float32")
    model.save(os.path.join(exchange, "tensorflow.keras"))
    np.savez(os.path.join(exchange, "tensorflow.npz"), x=new, y=model.predict(new, verbose=0),
             **{f"w{i}": w for i, w in enumerate(model.get_weights())})
    keras.backend.clear_session(free_memory=False)
    return {"exchange": exchange, "jax": _suite("jax", exchange), "torch": _suite("torch", exchange)}


def _assert_passed(result, allowed_skip):
    assert result["returncode"] == 0, result["output"]
    assert result["counts"].get("passed", 0) >= 30 and not result["counts"].get("failed"), result
    for reason in result["skips"]:
        assert reason.endswith(allowed_skip), result["output"]


def test_jax_backend_matrix_passes(runs):
    """Init, fit under jax.jit, modes, masks, inverse/log-det, mixed precision,
    save/load, 0.1.0 migration, cross-backend .keras, initialize, repeated-call
    warnings and DataParallel on 2 CPU devices: every test of the sub-suite runs and
    passes; only tests of PyTorch-only APIs skip."""
    _assert_passed(runs["jax"], allowed_skip=TORCH_ONLY)


def test_torch_backend_matrix_passes(runs):
    """The same matrix on PyTorch, with the ONNX export route; only tests of JAX-only
    APIs (``jax.jit``, ``keras.distribution``) skip, and nothing else may."""
    _assert_passed(runs["torch"], allowed_skip=JAX_ONLY)


def test_keras_files_written_on_other_backends_load_on_tensorflow(runs):
    written = sorted(f for f in os.listdir(runs["exchange"]) if f.endswith(".keras"))
    assert {"jax.keras", "torch.keras"} <= set(written), written
    for name in written:
        with np.load(os.path.join(runs["exchange"], name.replace(".keras", ".npz"))) as saved:
            saved = dict(saved)
        # Keras records a compiled model's optimizer by its backend class, and PyTorch's
        # (keras.src.backend.torch.optimizers...) needs torch to import: a Keras limitation
        # for every model (a stock Dense one alike), so PyTorch's file loads uncompiled.
        model = keras.models.load_model(os.path.join(runs["exchange"], name),
                                        compile=name != "torch.keras")
        for i, got in enumerate(model.get_weights()):
            np.testing.assert_array_equal(got, saved[f"w{i}"], err_msg=name)
        assert len(model.get_weights()) == len(saved) - 2
        np.testing.assert_allclose(model.predict(saved["x"], verbose=0), saved["y"],
                                   rtol=1e-5, atol=1e-5, err_msg=name)


def test_keras_file_of_tf_actnorm_0_1_0_migrates(rng):
    """A .keras file of the three-weight layout (bias, log_scale, initialized) loads:
    the old values become the data-dependent part, the residuals start at zero, and
    a training call on other data does not initialise again."""
    model = keras.models.load_model(os.path.join(DATA, "actnorm_0.1.0.keras"))
    with np.load(os.path.join(DATA, "actnorm_0.1.0.npz")) as saved:
        saved = dict(saved)
    layer = model.get_layer("an")
    np.testing.assert_array_equal(layer.initial_bias.numpy(), saved["bias"])
    np.testing.assert_array_equal(layer.initial_log_scale.numpy(), saved["log_scale"])
    np.testing.assert_array_equal(layer.bias.numpy(), saved["bias"])
    np.testing.assert_array_equal(layer.log_scale_residual.numpy(), 0.0)
    assert layer.initialized.numpy()
    np.testing.assert_allclose(model(saved["x"], training=False).numpy(), saved["y"], rtol=1e-6)
    model(rng.normal(-30.0, 9.0, (8, 4, 3)).astype("float32"), training=True)
    np.testing.assert_array_equal(layer.bias.numpy(), saved["bias"])


def _resolved(extras):
    """Names of the distributions pip would install for ``.[extras]`` into an empty
    environment (pip's resolver, nothing installed: ``--dry-run --ignore-installed``)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", "-", f".[{extras}]"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    return {item["metadata"]["name"].lower().replace("_", "-") for item in report["install"]}


def test_backend_extras_install_no_tensorflow():
    """``pip install ".[jax,torch]"`` brings Keras, JAX and PyTorch, and no TensorFlow,
    TensorFlow Probability or tf_keras (so neither extra alone does)."""
    names = _resolved("jax,torch")
    assert {"keras", "numpy", "jax", "torch"} <= names, sorted(names)
    assert not names & {"tensorflow", "tensorflow-cpu", "tensorflow-probability", "tf-keras"}, \
        sorted(names)


def _python(code, env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)


def test_import_registers_the_layer_for_keras_files():
    """``import tf_actnorm`` alone is enough to load a ``.keras`` file holding ActNorm."""
    code = ("import keras, tf_actnorm; "
            f"model = keras.models.load_model({os.path.join(DATA, 'actnorm_0.1.0.keras')!r}); "
            "print(type(model.get_layer('an')).__module__)")
    proc = _python(code, dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "tf_actnorm.layer", proc.stderr


def test_import_without_a_backend_names_the_extra():
    """Keras set to a backend that is not installed: ``import tf_actnorm`` works, and the
    layer raises an ImportError that says what to install."""
    code = ("import sys, tf_actnorm\n"
            "try:\n    tf_actnorm.ActNorm\n"
            "except ImportError as error:\n    print(error)\n")
    proc = _python(code, backend_env("tensorflow"))
    assert proc.returncode == 0, proc.stderr
    assert "needs Keras and the backend it is set to (KERAS_BACKEND)" in proc.stdout
    assert 'pip install ".[jax]"' in proc.stdout
