"""ActNorm as a plain ``torch.nn.Module``, a drop-in for taming-transformers' ``ActNorm``.

Importing this module needs PyTorch only (no Keras, no TensorFlow)::

    from tf_actnorm.torch import ActNorm

Same constructor, call, parameters and state-dict keys as the ``ActNorm`` of
taming-transformers (``taming/modules/util.py``, copied by CogVideo), so existing
checkpoints load as they are. ``ActNorm``'s docstring says what differs.
"""

import inspect
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tf_actnorm import _checks
from tf_actnorm import _formulas

__all__ = ["ActNorm"]


def _maximum(a, b):
    return torch.clamp(a, min=b) if not torch.is_tensor(b) else torch.maximum(a, b)


#: The array namespace ``xp`` of :mod:`tf_actnorm._formulas`, in PyTorch.
TORCH = types.SimpleNamespace(
    sqrt=torch.sqrt, maximum=_maximum, square=torch.square, log=torch.log, exp=torch.exp,
    sum=torch.sum,
    cast=lambda x, dtype: torch.as_tensor(x, dtype=dtype), all=torch.all,
    isfinite=torch.isfinite, logical_and=torch.logical_and)

_REDUCED = (torch.bfloat16, torch.float16)

# What `torch.compile(fullgraph=True)` says when asked to compile the initialisation
# (`reason` is accepted by newer PyTorch versions only).
_DISABLE_REASON = {"reason": "ActNorm initialises eagerly, once: run one training forward "
                             "(or load an initialised state dict) before compiling with "
                             "fullgraph=True"}
if "reason" not in inspect.signature(torch.compiler.disable).parameters:
    _DISABLE_REASON = {}


def _affine(x, scale, shift):
    """``x * scale + shift`` per channel (dim 1), ``scale`` and ``shift`` of shape [C].

    Computed by ``F.batch_norm`` in inference form with mean 0 and variance 1: one fused
    pass forward, and a backward that needs ``x`` only (not the output, which the usual
    in-place ``LeakyReLU`` after a norm layer overwrites), with the parameter gradients
    ``sum(dy * x)`` and ``sum(dy)`` in the same fused kernel. ``eps=0`` keeps
    ``1 / sqrt(1 + eps)`` exactly 1 (and keeps cuDNN, which needs ``eps >= 1e-5``, out).
    """
    if scale.dtype != x.dtype and not (x.dtype in _REDUCED and scale.dtype == torch.float32):
        # batch_norm takes float32 coefficients with bfloat16/float16 data (autocast),
        # otherwise one dtype.
        scale, shift = scale.to(x.dtype), shift.to(x.dtype)
    zeros = torch.zeros_like(scale)
    return F.batch_norm(x, zeros, torch.ones_like(scale), scale, shift, False, 0.0, 0.0)


def _sync_flag(module, incompatible_keys):
    """Load-state-dict post hook: the Python mirror follows the loaded ``initialized``."""
    module._is_initialized = bool(module.initialized)


class ActNorm(nn.Module):
    """Activation Normalization (Glow), with taming-transformers' interface.

    ``h = scale * (input + loc)`` per channel (dim 1 of an input of rank 2 to 5:
    ``[B, C]``, ``[B, C, L]``, ``[B, C, H, W]`` or ``[B, C, T, H, W]``). The first
    ``forward`` in ``train()`` mode initialises ``loc = -mean_c`` and
    ``scale = 1 / (std_c + eps)`` from its batch, so that batch comes out with zero
    mean and unit variance per channel; ``eval()`` never initialises. After that
    ``loc`` and ``scale`` train like any weights; one example's output never depends
    on the rest of its batch, and ``train()`` and ``eval()`` compute the same function.

    Parameters and state are taming's: ``loc`` and ``scale`` (``nn.Parameter`` of
    shape ``[1, C, 1, 1]`` for every input rank, created at construction, so an
    optimizer built first trains them) and the ``uint8`` buffer ``initialized``.
    ``load_state_dict`` takes a taming-transformers or CogVideo ``ActNorm`` state dict
    as it is, and then computes the same function as that module.

    Differences from taming's class:

    * The initial std is the biased one (divide by ``n``, as Glow and TFP) unless
      ``unbiased=True``, which gives taming's values (divide by ``n - 1``). A single
      value per channel gives ``scale = 1 / eps`` either way, never NaN.
    * Statistics are computed in float32 (float64 for float64 inputs), also for
      bfloat16/float16 inputs and under ``torch.autocast``. Bad data raises
      ``ValueError`` and changes nothing: an empty batch, or NaN/Inf in it.
    * Under ``torch.distributed`` (an initialised process group with more than one
      rank) the first training forward is a collective: every rank initialises from
      the statistics of the global batch (shards of any sizes, empty ones included),
      so replicas start equal. Every rank of the group must run that forward.
    * ``reverse`` first in training (with ``allow_reverse_init=True``) initialises so
      that ``reverse`` standardises its input: ``scale = std + eps``,
      ``loc = mean / scale`` (taming applies the forward's formulas to that input).
    * Once initialised, ``forward`` has no data-dependent branch (a Python copy of
      ``initialized``, re-read by ``load_state_dict``), so
      ``torch.compile(module, fullgraph=True)`` gives one graph in training too; the
      initialising forward itself runs eagerly.
    * Ranks 2 to 5; the output has the input's dtype (as ``BatchNorm2d``), and the
      log-determinant the parameters' dtype.

    Args:
        num_features: Number of channels ``C`` (dim 1 of the input).
        logdet: If true, ``forward`` returns ``(h, logdet)``, ``logdet`` of shape
            ``[B]``: ``log|det dh/dinput|`` per example,
            ``(positions per channel) * sum_c log|scale_c|``, computed in O(C)
            (positions: 1 for rank 2, ``L`` for rank 3, ``H * W`` for rank 4,
            ``T * H * W`` for rank 5).
        affine: Must be true (as in taming's class, which asserts it).
        allow_reverse_init: Whether ``reverse`` may initialise (see above);
            otherwise ``reverse`` before initialisation in training raises
            ``RuntimeError``.
        eps: Added to the std at initialisation (keyword only), so a constant
            channel gets the finite scale ``1 / eps``.
        unbiased: Use the sample std (keyword only), as taming does.
        process_group: The ``torch.distributed`` group whose ranks initialise
            together (keyword only); default: the whole world, when initialised.

    Example:

    ```python
    import torch
    from tf_actnorm.torch import ActNorm

    norm = ActNorm(8)  # a module starts in train() mode
    x = 3.0 + 2.0 * torch.randn(16, 8, 4, 4)
    h = norm(x)        # this first batch initialises loc and scale
    norm.eval()        # from now on, the same function in train() and eval()
    ```
    """

    def __init__(self, num_features, logdet=False, affine=True, allow_reverse_init=False, *,
                 eps=1e-6, unbiased=False, process_group=None):
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"ActNorm: `num_features` must be a positive int, got {num_features!r}")
        if not affine:
            raise ValueError("ActNorm: only `affine=True` is supported (as in taming's ActNorm)")
        if not eps > 0:
            raise ValueError(f"ActNorm: `eps` must be positive, got {eps!r}")
        super().__init__()
        self.num_features = num_features
        self.logdet = logdet
        self.allow_reverse_init = allow_reverse_init
        self.eps = float(eps)
        self.unbiased = bool(unbiased)
        self.process_group = process_group
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        # A Python copy of `initialized`: reading the buffer in `forward` would be a
        # data-dependent branch, which `torch.compile(fullgraph=True)` refuses.
        self._is_initialized = False
        self.register_load_state_dict_post_hook(_sync_flag)

    def extra_repr(self):
        return (f"{self.num_features}, logdet={self.logdet}, eps={self.eps}, "
                f"unbiased={self.unbiased}")

    def forward(self, input, reverse=False):
        """``h = scale * (input + loc)``, or ``(h, logdet)`` if ``logdet``;
        ``reverse=True`` is ``reverse(input)``. Initialises first in ``train()`` mode."""
        if reverse:
            return self.reverse(input)
        self._check_input(input, "input")
        if self.training and not self._is_initialized:
            self._initialize(input, from_outputs=False)
        scale, shift = _formulas.scale_forward_coefficients(
            self.loc.reshape(-1), self.scale.reshape(-1))
        h = _affine(input, scale, shift)
        if not self.logdet:
            return h
        return h, self._log_det(input)

    def reverse(self, output):
        """``output / scale - loc``, the exact inverse of ``forward``.

        In ``train()`` mode before initialisation it initialises from ``output`` if
        ``allow_reverse_init``, so that the result is standardised; otherwise it
        raises ``RuntimeError``.
        """
        self._check_input(output, "output")
        if self.training and not self._is_initialized:
            if not self.allow_reverse_init:
                raise RuntimeError(
                    "ActNorm: initialising in the reverse direction is disabled: run a "
                    "forward in train() mode first, or pass allow_reverse_init=True")
            self._initialize(output, from_outputs=True)
        scale, shift = _formulas.scale_inverse_coefficients(
            self.loc.reshape(-1), self.scale.reshape(-1))
        return _affine(output, scale, shift)

    def _check_input(self, x, what):
        if not torch.is_floating_point(x):
            raise ValueError(f"ActNorm: `{what}` must be a floating-point tensor, got {x.dtype}")
        if not 2 <= x.dim() <= 5:
            raise ValueError(
                f"ActNorm: expected an `{what}` of rank 2 to 5 with channels on dim 1, got "
                f"shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"ActNorm: expected {self.num_features} channels on dim 1, got {x.shape[1]} "
                f"({what} shape {tuple(x.shape)})")

    def _log_det(self, input):
        positions = 1
        for size in input.shape[2:]:
            positions *= size
        log_abs_scale = torch.log(torch.abs(self.scale.reshape(-1)))
        total = _formulas.log_det(TORCH, log_abs_scale, positions)
        return total * torch.ones(input.shape[0], dtype=total.dtype, device=total.device)

    def _sync_group(self):
        """The process group to initialise across, or None when there is one rank."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    @torch.compiler.disable(**_DISABLE_REASON)
    @torch.no_grad()
    def _initialize(self, data, from_outputs):
        """Set ``loc`` and ``scale`` in place from ``data``'s moments (global under
        ``torch.distributed``); ``ValueError`` and no change on bad data."""
        stats_dtype = getattr(torch, _formulas.stats_dtype(str(data.dtype).split(".")[-1]))
        x = data.detach().to(stats_dtype)
        dims = [0, *range(2, x.dim())]
        channel_shape = [1, -1] + [1] * (x.dim() - 2)
        group = self._sync_group()
        # Count and sum, then squared deviations about the global mean: two passes,
        # exact for shards of different sizes.
        count_and_total = torch.cat([
            torch.full((1,), x.numel() // self.num_features, dtype=stats_dtype, device=x.device),
            x.sum(dims)])
        if group is not None:
            dist.all_reduce(count_and_total, group=group)
        count, total = count_and_total[0], count_and_total[1:]
        mean = _formulas.mean(TORCH, count, total)
        m2 = (x - mean.reshape(channel_shape)).square().sum(dims)
        if group is not None:
            dist.all_reduce(m2, group=group)
        if not bool(_formulas.is_valid(TORCH, count, mean, m2)):
            raise ValueError(_checks.cannot_initialise("ActNorm", bool(count > 0)))
        variance = _formulas.variance(TORCH, count, m2, ddof=1 if self.unbiased else 0)
        init = _formulas.scale_init_from_outputs if from_outputs else _formulas.scale_init_from_inputs
        loc, scale = init(TORCH, mean, variance, self.eps)
        self.loc.copy_(loc.reshape(self.loc.shape))
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.initialized.fill_(1)
        self._is_initialized = True
