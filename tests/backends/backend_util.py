"""Backend-neutral helpers for the backend sub-suite (numpy truths live in tests/util.py)."""

import keras
import numpy as np
from keras import ops

from tests.util import channel_data as data  # noqa: F401 (re-exported for the tests)

BACKEND = keras.backend.backend()


def npy(t):
    return np.asarray(ops.convert_to_numpy(t))


def weights(layer):
    return [npy(w) for w in layer.weights]


def jacobian(fn, x):
    """d fn(x) / dx by the backend's own autodiff, shape ``y.shape + x.shape``."""
    if BACKEND == "jax":
        import jax

        return np.asarray(jax.jacfwd(fn)(x))
    import torch

    return torch.autograd.functional.jacobian(fn, torch.as_tensor(x)).numpy()


def grad(fn, x):
    """d sum(fn(x)) / dx by the backend's own autodiff."""
    if BACKEND == "jax":
        import jax

        return np.asarray(jax.grad(lambda t: fn(t).sum())(x))
    import torch

    t = torch.as_tensor(x).requires_grad_(True)
    fn(t).sum().backward()
    return t.grad.numpy()
