"""ActNorm on the JAX and PyTorch Keras backends (issue 16), driven from this suite.

The backend sub-suite (``tests/backends/``) must run where TensorFlow is *not*
installed, so it runs in its own virtual environment, ``.venv-backends/`` at the
repository root (git-ignored): created here on first use with the same Keras as
this environment, ``jax[cpu]``, numpy, pytest and this package (``--no-deps``, so
no TensorFlow), and reused while it has the right Keras. The TensorFlow environment
is never touched.

* JAX: always runs (CI included).
* PyTorch: runs when ``torch`` is importable in that environment, else skips with
  the reason (PyPI's ``torch`` wheel pulls several GB of CUDA libraries, so CI does
  not install it; ``.venv-backends/bin/pip install torch`` enables it).
* ``.keras`` files cross backends both ways: this (TensorFlow) process writes one
  before the runs, each backend loads the files of the backends before it and writes
  its own, and this process loads theirs at the end.
"""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import tf_actnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-backends")
PYTHON = os.path.join(VENV, "bin", "python")
DATA = os.path.join(ROOT, "tests", "data")
PACKAGES = [f"keras=={keras.__version__}", "jax[cpu]", "numpy", "pytest"]
JAX_ONLY = "JAX backend only"


def _run(cmd, timeout, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _venv_ok():
    if not os.path.exists(PYTHON):
        return False
    probe = _run([PYTHON, "-c", "import keras, jax, pytest, tf_actnorm; "
                  "print(keras.__version__, tf_actnorm.__file__)"], 120, cwd="/",
                 env=dict(os.environ, KERAS_BACKEND="jax"))
    want = f"{keras.__version__} {os.path.join(ROOT, 'tf_actnorm', '__init__.py')}"
    return probe.returncode == 0 and probe.stdout.strip() == want


@pytest.fixture(scope="module")
def venv():
    """``.venv-backends``: Keras (same version), jax[cpu], numpy, pytest; no TensorFlow."""
    if not _venv_ok():
        steps = [[sys.executable, "-m", "venv", "--clear", VENV],
                 [PYTHON, "-m", "pip", "install", "-q", *PACKAGES],
                 [PYTHON, "-m", "pip", "install", "-q", "--no-deps", "-e", ROOT]]
        for step in steps:
            proc = _run(step, 900)
            if proc.returncode:
                pytest.fail(f"creating {VENV} failed at {step}:\n{proc.stdout[-2000:]}"
                            f"\n{proc.stderr[-4000:]}")
        assert _venv_ok()
    has_tf = _run([PYTHON, "-c", "import tensorflow"], 120).returncode == 0
    assert not has_tf, f"{VENV} must not have TensorFlow: it proves that no import needs it"
    return PYTHON


def _exchange_model(rng):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4, 3)), tf_actnorm.ActNorm(name="an"),
                              keras.layers.Flatten(), keras.layers.Dense(1, name="dense")])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    x = (rng.normal(size=(16, 4, 3)) * [1, 2, 3] + [3, -1, 2]).astype("float32")
    model.fit(x, x[:, 0, :1], batch_size=8, verbose=0)
    return model


def _suite(python, backend, exchange):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_ACTNORM_EXCHANGE=exchange)
    proc = _run([python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                 "--confcutdir=tests/backends", "tests/backends"], 900, cwd=ROOT, env=env)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b",
                                               proc.stdout.splitlines()[-1] if proc.stdout else "")}
    skips = re.findall(r"^SKIPPED \[\d+\] \S+: (.*)$", proc.stdout, re.M)
    return {"returncode": proc.returncode, "counts": counts, "skips": skips,
            "output": proc.stdout[-6000:] + proc.stderr[-3000:]}


@pytest.fixture(scope="module")
def runs(venv, tmp_path_factory):
    """The sub-suite on JAX, then on PyTorch when it is installed; the exchange folder."""
    exchange = str(tmp_path_factory.mktemp("exchange"))
    rng = np.random.default_rng(11)
    model = _exchange_model(rng)
    new = (rng.normal(size=(5, 4, 3)) * 4 + 1).astype("float32")
    model.save(os.path.join(exchange, "tensorflow.keras"))
    np.savez(os.path.join(exchange, "tensorflow.npz"), x=new, y=model.predict(new, verbose=0),
             **{f"w{i}": w for i, w in enumerate(model.get_weights())})
    keras.backend.clear_session()
    results = {"exchange": exchange, "jax": _suite(venv, "jax", exchange)}
    if _run([venv, "-c", "import torch"], 300).returncode == 0:
        results["torch"] = _suite(venv, "torch", exchange)
    return results


def _assert_passed(result, allowed_skip):
    assert result["returncode"] == 0, result["output"]
    assert result["counts"].get("passed", 0) >= 15 and not result["counts"].get("failed"), result
    for reason in result["skips"]:
        assert allowed_skip and allowed_skip in reason, result["output"]


def test_jax_backend_matrix_passes(runs):
    """Init, fit under jax.jit, modes, masks, inverse/log-det, mixed precision,
    save/load, 0.1.0 migration, cross-backend .keras and DataParallel on 2 CPU
    devices: every test of the sub-suite runs (none skipped) and passes."""
    _assert_passed(runs["jax"], allowed_skip=None)


def test_torch_backend_matrix_passes(runs):
    if "torch" not in runs:
        pytest.skip("torch is not installed in .venv-backends (PyPI's torch wheel pulls several "
                    "GB of CUDA libraries, so CI does not install it): install it there "
                    "(`.venv-backends/bin/pip install torch`) to run the PyTorch matrix")
    _assert_passed(runs["torch"], allowed_skip=JAX_ONLY)


def test_keras_files_written_on_other_backends_load_on_tensorflow(runs):
    written = sorted(f for f in os.listdir(runs["exchange"]) if f.endswith(".keras"))
    assert "jax.keras" in written, written
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

