"""The backend sub-suite: ActNorm on the JAX and PyTorch Keras backends.

Run in an environment without TensorFlow, with the repository root as the working
directory (``tests/test_backends.py`` does this from the TensorFlow suite):

    KERAS_BACKEND=jax python -m pytest -q --confcutdir=tests/backends tests/backends

``--confcutdir`` keeps pytest from loading ``tests/conftest.py``, which imports
TensorFlow. ``TF_ACTNORM_EXCHANGE`` (optional) names a folder in which ``.keras``
files written by other backends are read and this backend's are written.
"""

import os

import keras
import numpy as np
import pytest


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _clear_keras_session():
    yield
    keras.mixed_precision.set_global_policy("float32")
    # Without the full garbage collection (0.2-0.65 s a call late in the suite).
    keras.backend.clear_session(free_memory=False)


@pytest.fixture
def exchange():
    path = os.environ.get("TF_ACTNORM_EXCHANGE")
    if not path:
        pytest.skip("TF_ACTNORM_EXCHANGE is not set: no cross-backend exchange folder")
    return path
