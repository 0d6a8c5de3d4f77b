import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


# The JAX/PyTorch sub-suite runs in its own environment (no TensorFlow), launched by
# tests/test_backends.py; this TensorFlow run does not collect it.
collect_ignore = ["backends"]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _clear_keras_session():
    import keras

    yield
    keras.mixed_precision.set_global_policy("float32")
    # Without the full garbage collection (0.2-0.65 s a call late in the suite).
    keras.backend.clear_session(free_memory=False)

