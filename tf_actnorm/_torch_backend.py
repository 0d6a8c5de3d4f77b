"""What ActNorm does its own way on PyTorch (see ``_backend``)."""

import warnings

import keras
import torch

from tf_actnorm._backend import channel_sum  # noqa: F401 (the plain keras.ops ones)
from tf_actnorm._backend import checked  # noqa: F401
from tf_actnorm._backend import compiled_moments  # noqa: F401
from tf_actnorm._backend import initialized_by_call  # noqa: F401
from tf_actnorm._backend import assigns_in_branches  # noqa: F401
from tf_actnorm._backend import replicated  # noqa: F401
from tf_actnorm._backend import sum_over_replicas  # noqa: F401

# Autodiff: Keras' `custom_gradient` on PyTorch saves every input of the function for
# the backward pass, so an output-based gradient would keep more, not less.
OUTPUT_GRADIENT = False


def is_traced(tensor):
    """False: Keras on PyTorch runs eagerly; every value is known when it is computed."""
    del tensor
    return False


def exporting():
    """True while PyTorch's TorchScript ONNX exporter traces the layer."""
    return torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling()


serving = exporting


def stored_flag(variable):
    """The stored value of a bool variable, read without tracing anything."""
    with keras.StatelessScope():  # no state mapping: reads the variable itself
        value = variable.value
    with warnings.catch_warnings():
        # The value is read for this check only and enters no traced graph.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return bool(value.detach().cpu().numpy())


def run_if(condition, fn):
    """Call ``fn()`` if the bool ``condition`` is true."""
    if bool(condition):
        fn()
