"""``tf_actnorm.torch.ActNorm``, the plain PyTorch module, against independent truths:
NumPy statistics in float64, a re-implementation of taming-transformers' ``ActNorm``
from its published definition, autograd Jacobians, round trips, and a single-process
run on the concatenated batch for ``torch.distributed``."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests import _torch_ddp_worker as ddp_worker
from tests.util import kill_process_group
from tf_actnorm.torch import ActNorm

ROOT = Path(__file__).resolve().parent.parent


class TamingActNorm(nn.Module):
    """taming-transformers' ``ActNorm`` (``taming/modules/util.py``) as published: the
    reference for ``unbiased=True`` and for loading its state dicts."""

    def __init__(self, num_features, logdet=False, affine=True, allow_reverse_init=False):
        assert affine
        super().__init__()
        self.logdet = logdet
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.allow_reverse_init = allow_reverse_init
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def initialize(self, input):
        with torch.no_grad():
            per_channel = input.transpose(0, 1).reshape(input.shape[1], -1)
            self.loc.copy_(-per_channel.mean(1).reshape(1, -1, 1, 1))
            self.scale.copy_(1 / (per_channel.std(1).reshape(1, -1, 1, 1) + 1e-6))

    def forward(self, input, reverse=False):
        if reverse:
            return self.reverse(input)
        squeeze = input.dim() == 2
        if squeeze:
            input = input[:, :, None, None]
        _, _, height, width = input.shape
        if self.training and self.initialized.item() == 0:
            self.initialize(input)
            self.initialized.fill_(1)
        h = self.scale * (input + self.loc)
        if squeeze:
            h = h.squeeze(-1).squeeze(-1)
        if self.logdet:
            logdet = height * width * torch.sum(torch.log(torch.abs(self.scale)))
            return h, logdet * torch.ones(input.shape[0]).to(input)
        return h

    def reverse(self, output):
        if self.training and self.initialized.item() == 0:
            if not self.allow_reverse_init:
                raise RuntimeError("reverse init disabled")
            self.initialize(output)
            self.initialized.fill_(1)
        squeeze = output.dim() == 2
        if squeeze:
            output = output[:, :, None, None]
        h = output / self.scale - self.loc
        return h.squeeze(-1).squeeze(-1) if squeeze else h


SHAPES = {2: (6, 3), 3: (4, 3, 5), 4: (4, 3, 5, 2), 5: (2, 3, 2, 3, 4)}


def data(shape, seed=0, dtype=torch.float32):
    """Channels on dim 1 with distinct means and spreads."""
    gen = torch.Generator().manual_seed(seed)
    channel = [1, -1] + [1] * (len(shape) - 2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64).reshape(channel)
    return (x + torch.tensor([4.0, -1.0, 0.5], dtype=torch.float64).reshape(channel)).to(dtype)


def numpy_init(x, ddof=0, eps=1e-6):
    """(loc, scale) of shape [C] from float64 NumPy statistics of x (channels on axis 1)."""
    values = np.moveaxis(x.detach().double().numpy(), 1, 0).reshape(x.shape[1], -1)
    return -values.mean(1), 1.0 / (values.std(1, ddof=ddof) + eps)


def flat(t):
    return t.detach().double().reshape(-1).numpy()


# ------------------------------------------------------------------ import, construction


def test_import_needs_neither_keras_nor_tensorflow():
    code = (
        "import sys\n"
        "sys.modules['keras'] = None; sys.modules['tensorflow'] = None\n"
        "import torch\n"
        "from tf_actnorm.torch import ActNorm\n"
        "h = ActNorm(2)(torch.randn(4, 2))\n"
        "loaded = sorted(m for m, v in sys.modules.items() if v is not None\n"
        "                and m.split('.')[0] in ('keras', 'tensorflow', 'jax', 'tf_keras'))\n"
        "print('frameworks:', loaded, tuple(h.shape))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "frameworks: [] (4, 2)" in result.stdout


def test_parameters_from_construction_state_in_buffers():
    norm = ActNorm(5)
    assert [(n, tuple(p.shape)) for n, p in norm.named_parameters()] == [
        ("loc", (1, 5, 1, 1)), ("scale", (1, 5, 1, 1))]
    assert [(n, b.dtype) for n, b in norm.named_buffers()] == [("initialized", torch.uint8)]
    assert list(norm.state_dict()) == list(TamingActNorm(5).state_dict())


def test_an_optimizer_built_first_trains_the_initialised_parameters():
    norm = ActNorm(3)
    optimizer = torch.optim.SGD(norm.parameters(), lr=0.1)
    x = data(SHAPES[4])
    (norm(x) - 1.0).square().mean().backward()  # the first forward initialises
    initial = [p.detach().clone() for p in norm.parameters()]
    optimizer.step()
    for before, param in zip(initial, norm.parameters()):
        assert param.grad is not None and not torch.equal(before, param.detach())
    # The step moved the *initialised* values: they were not replaced behind the optimizer.
    np.testing.assert_allclose(flat(initial[1]), numpy_init(x)[1], rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_features=0), "`num_features` must be a positive int"),
    (dict(num_features=2.0), "`num_features` must be a positive int"),
    (dict(num_features=2, affine=False), "only `affine=True`"),
    (dict(num_features=2, eps=0.0), "`eps` must be positive"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ActNorm(**kwargs)


@pytest.mark.parametrize("x, message", [
    (torch.zeros(3), "rank 2 to 5 with channels on dim 1, got shape \\(3,\\)"),
    (torch.zeros(1, 3, 1, 1, 1, 1), "rank 2 to 5"),
    (torch.zeros(2, 4, 5), "expected 3 channels on dim 1, got 4"),
    (torch.zeros(2, 3, dtype=torch.int64), "must be a floating-point tensor"),
])
def test_bad_inputs_raise_and_change_nothing(x, message):
    norm = ActNorm(3)
    with pytest.raises(ValueError, match=message):
        norm(x)
    assert not norm.initialized
    with pytest.raises(ValueError, match=message):
        norm.eval().reverse(x)


# ------------------------------------------------------------------ initialisation


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_first_training_forward_initialises_from_the_batch(rank):
    x = data(SHAPES[rank], seed=rank)
    norm = ActNorm(3)
    h = norm(x)
    loc, scale = numpy_init(x)
    np.testing.assert_allclose(flat(norm.loc), loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat(norm.scale), scale, rtol=1e-5)
    assert norm.initialized.item() == 1 and h.shape == x.shape and h.dtype == x.dtype
    standardised = np.moveaxis(h.detach().double().numpy(), 1, 0).reshape(3, -1)
    np.testing.assert_allclose(standardised.mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(standardised.std(1), 1.0, rtol=1e-4)
    # Once only: a second training batch changes nothing.
    norm(data(SHAPES[rank], seed=99))
    np.testing.assert_allclose(flat(norm.scale), scale, rtol=1e-5)


def test_eval_never_initialises():
    x = data(SHAPES[4])
    norm = ActNorm(3).eval()
    torch.testing.assert_close(norm(x), x)  # loc 0, scale 1: the identity
    assert norm.initialized.item() == 0
    norm.train()(x)
    assert norm.initialized.item() == 1


@pytest.mark.parametrize("rank", [2, 4])
def test_unbiased_reproduces_tamings_initial_values_and_outputs(rank):
    x = data(SHAPES[rank], seed=3)
    ours, theirs = ActNorm(3, logdet=True, unbiased=True), TamingActNorm(3, logdet=True)
    (h, logdet), (h_ref, logdet_ref) = ours(x), theirs(x)
    torch.testing.assert_close(ours.loc, theirs.loc, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.scale, theirs.scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logdet, logdet_ref)
    loc, scale = numpy_init(x, ddof=1)
    np.testing.assert_allclose(flat(ours.scale), scale, rtol=1e-5)
    # The default (biased, as Glow) differs by sqrt(n / (n - 1)) per channel.
    n = x.numel() // 3
    biased = ActNorm(3)
    biased(x)
    np.testing.assert_allclose(flat(biased.scale) / flat(ours.scale), np.sqrt(n / (n - 1)),
                               rtol=1e-5)


def test_one_value_per_channel_gives_a_finite_scale():
    x = torch.tensor([[1.0, -2.0, 3.0]])
    for unbiased in (False, True):
        norm = ActNorm(3, unbiased=unbiased)
        torch.testing.assert_close(norm(x), torch.zeros(1, 3))
        np.testing.assert_allclose(flat(norm.scale), 1e6)
    theirs = TamingActNorm(3)
    with pytest.warns(UserWarning, match="degrees of freedom"):
        theirs(x)
    assert torch.isnan(theirs.scale).all()  # taming's std of one value


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(0, 3, 2, 2), "ActNorm: cannot initialise from an empty batch"),
    (torch.tensor([[1.0, float("nan"), 2.0], [0.0, 1.0, 2.0]]),
     "ActNorm: cannot initialise from data containing NaN or Inf"),
    (torch.tensor([[1.0, float("inf"), 2.0], [0.0, 1.0, 2.0]]),
     "ActNorm: cannot initialise from data containing NaN or Inf"),
])
def test_bad_data_at_init_raises_and_changes_nothing(bad, message):
    norm = ActNorm(3)
    with pytest.raises(ValueError, match=message):
        norm(bad)
    assert norm.initialized.item() == 0
    assert torch.equal(norm.loc, torch.zeros(1, 3, 1, 1))
    assert torch.equal(norm.scale, torch.ones(1, 3, 1, 1))
    x = data(SHAPES[2])
    norm(x)  # good data then initialises
    np.testing.assert_allclose(flat(norm.scale), numpy_init(x)[1], rtol=1e-5)


# ------------------------------------------------------------------ maths


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_reverse_inverts_forward(rank):
    x = data(SHAPES[rank], seed=rank, dtype=torch.float64)
    norm = ActNorm(3).double()
    h = norm(x)
    torch.testing.assert_close(norm.reverse(h), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm(h, reverse=True), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm(norm.reverse(x)), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_logdet_is_the_log_abs_det_of_the_jacobian(rank):
    shape = (2, 3, 2, 2, 2)[:rank]
    norm = ActNorm(3, logdet=True).double().eval()
    with torch.no_grad():
        norm.loc.copy_(torch.tensor([0.3, -1.0, 2.0]).reshape(1, 3, 1, 1))
        norm.scale.copy_(torch.tensor([1.5, -0.4, 2.5]).reshape(1, 3, 1, 1))  # any sign
    x = data(shape, dtype=torch.float64)
    _, logdet = norm(x)
    assert logdet.shape == (shape[0],)
    for i in range(shape[0]):
        jacobian = torch.autograd.functional.jacobian(
            lambda example: norm(example[None])[0][0], x[i])
        size = x[i].numel()
        _, expected = torch.linalg.slogdet(jacobian.reshape(size, size))
        torch.testing.assert_close(logdet[i], expected)


def test_reverse_initialisation():
    y = data(SHAPES[4], seed=5)
    with pytest.raises(RuntimeError, match="allow_reverse_init=True"):
        ActNorm(3).reverse(y)
    norm = ActNorm(3, allow_reverse_init=True)
    x = norm.reverse(y)  # initialises so that the reverse standardises y
    assert norm.initialized.item() == 1
    loc, scale = numpy_init(y)
    standardised = (y.double().numpy() + loc.reshape(1, 3, 1, 1)) * scale.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(x.detach().numpy(), standardised, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm(x), y, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ checkpoints


def test_loads_a_taming_state_dict_and_computes_tamings_function():
    theirs = TamingActNorm(3, logdet=True)
    theirs(data(SHAPES[4], seed=1))  # initialised by taming's rule
    with torch.no_grad():
        theirs.scale[0, 1] *= -0.5  # trained away from the data: any sign
        theirs.loc.add_(0.25)
    ours = ActNorm(3, logdet=True)
    ours.load_state_dict(theirs.state_dict())  # strict: the same keys and shapes
    x = data(SHAPES[4], seed=2)
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        (h, logdet), (h_ref, logdet_ref) = ours(x), theirs(x)  # train: no re-initialisation
        torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logdet, logdet_ref)
        torch.testing.assert_close(ours.reverse(h), theirs.reverse(h_ref), rtol=1e-5, atol=1e-5)
    # And back: our state dict loads into taming's class.
    TamingActNorm(3).load_state_dict(ours.state_dict())


def test_state_dict_round_trips_into_a_fresh_instance():
    trained = ActNorm(3, logdet=True)
    trained(data(SHAPES[5]))
    fresh = ActNorm(3, logdet=True)
    fresh.load_state_dict(trained.state_dict())
    x = data(SHAPES[5], seed=7)  # a training forward must not re-initialise the copy
    for got, want in zip(fresh(x), trained(x)):
        assert torch.equal(got, want)
    # Through a parent module too (the hook of every submodule runs).
    parent = nn.Sequential(nn.Identity(), ActNorm(3, logdet=True))
    parent.load_state_dict(nn.Sequential(nn.Identity(), trained).state_dict())
    for got, want in zip(parent[1](x), trained(x)):
        assert torch.equal(got, want)
    # An uninitialised state dict loads as uninitialised: the next training batch initialises.
    fresh.load_state_dict(ActNorm(3).state_dict())
    fresh(x)
    np.testing.assert_allclose(flat(fresh.scale), numpy_init(x)[1], rtol=1e-5)


# ------------------------------------------------------------------ precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_module_initialises_from_float32_statistics(dtype):
    # A large offset: statistics accumulated in bfloat16/float16 would be far off.
    x = (data((64, 3, 8, 8)) + 300.0).to(dtype)
    norm = ActNorm(3).to(dtype)
    h = norm(x)
    assert h.dtype == dtype and torch.isfinite(h).all()
    loc, scale = numpy_init(x.float())  # the statistics of the values actually given
    np.testing.assert_allclose(flat(norm.scale), scale, rtol=1e-2)  # the parameter's rounding
    np.testing.assert_allclose(flat(norm.loc), loc, rtol=1e-2)


def test_autocast_keeps_float32_parameters_and_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ActNorm(4, logdet=False))
    x = data((16, 3, 8, 8)) + 50.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model[0](x)
        h = model[1](features)
    assert features.dtype == torch.bfloat16 and h.dtype == torch.bfloat16
    assert model[1].scale.dtype == torch.float32
    loc, scale = numpy_init(features.float())
    np.testing.assert_allclose(flat(model[1].scale), scale, rtol=1e-5)
    np.testing.assert_allclose(flat(model[1].loc), loc, rtol=1e-5)
    h.float().square().mean().backward()
    assert model[1].scale.grad.dtype == torch.float32 and torch.isfinite(model[1].scale.grad).all()


# ------------------------------------------------------------------ torch.compile


def test_compile_fullgraph_in_training_once_initialised():
    norm = ActNorm(3, logdet=True)
    fresh = ActNorm(3, logdet=True)
    norm(data(SHAPES[4]))
    fresh.load_state_dict(norm.state_dict())  # initialised by loading, never by a forward
    x = data(SHAPES[4], seed=1).requires_grad_()
    explanation = torch._dynamo.explain(fresh)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    compiled = torch.compile(fresh, fullgraph=True, backend="aot_eager")  # traces the backward too
    h, logdet = compiled(x)
    (h.square().sum() + logdet.sum()).backward()
    h_ref, logdet_ref = norm(x.detach())
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(logdet, logdet_ref)
    assert fresh.scale.grad is not None and torch.isfinite(fresh.scale.grad).all()


# ------------------------------------------------------------------ torch.distributed


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    """Each rank's results, from 2 gloo processes on 127.0.0.1 (a hard deadline)."""
    world_size, port = 2, _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as out:
        procs = [subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "_torch_ddp_worker.py"), str(rank),
             str(world_size), str(port), out], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for rank in range(world_size)]
        try:
            deadline = time.monotonic() + 90
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                if any(p.poll() not in (None, 0) for p in procs):
                    break  # one crashed: the other would wait for it forever
                time.sleep(0.1)
        finally:
            for p in procs:
                kill_process_group(p)
        for rank, p in enumerate(procs):
            if p.returncode != 0:
                pytest.fail(f"rank {rank}: returncode {p.returncode}\n{p.stdout.read()[-4000:]}")
            p.stdout.close()
        return [torch.load(os.path.join(out, f"rank{rank}.pt")) for rank in range(world_size)]


@pytest.mark.parametrize("name", list(ddp_worker.INIT_SCENARIOS))
def test_distributed_init_uses_the_global_batch(ranks, name):
    sizes, example_shape, unbiased = ddp_worker.INIT_SCENARIOS[name]
    seed = list(ddp_worker.INIT_SCENARIOS).index(name)
    batch = torch.cat([ddp_worker.shard(seed, sizes, example_shape, r) for r in range(len(sizes))])
    single = ActNorm(3, unbiased=unbiased)
    single(batch)
    for state in ranks:
        got = state[f"init/{name}"]
        assert got["initialized"].item() == 1
        torch.testing.assert_close(got["loc"], single.loc.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["scale"], single.scale.detach(), rtol=1e-5, atol=0)
    # The truth is the concatenated batch's, not any one shard's.
    loc, scale = numpy_init(batch, ddof=1 if unbiased else 0)
    np.testing.assert_allclose(flat(ranks[1][f"init/{name}"]["scale"]), scale, rtol=1e-5)


def test_ddp_training_keeps_ranks_equal_to_one_process(ranks):
    model = ddp_worker.ddp_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(ddp_worker.DDP_STEPS):
        batch = torch.cat([ddp_worker.ddp_batch(step, r, 2) for r in range(2)])
        loss = model(batch).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expected = model.state_dict()
    assert expected["1.initialized"].item() == 1
    for state in ranks:
        assert list(state["ddp"]) == list(expected)
        for key, value in expected.items():
            torch.testing.assert_close(state["ddp"][key], value, rtol=1e-5, atol=1e-6)
    for key in expected:
        assert torch.equal(ranks[0]["ddp"][key], ranks[1]["ddp"][key])

