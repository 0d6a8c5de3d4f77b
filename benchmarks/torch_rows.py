"""Benchmark rows for ``tf_actnorm.torch.ActNorm`` (plain PyTorch; no Keras, no TensorFlow).

    python benchmarks/torch_rows.py [--quick] [--repeats N] [--no-compile] [--only forward|train]

Prints ``Device: ...`` and markdown rows in run.py's format. Same method as run.py
(``pairing.py``; rows printed by ``report.py``): warm-up, then rounds that time candidate and baseline
back to back, alternating which goes first, each sample lasting ~50 ms for the forward
rows and ~250 ms (several steps) for the train steps (5 and 20 ms with ``--quick``);
medians of the times and of the per-round ratios. ``--threads N`` sets
``torch.set_num_threads`` (default: PyTorch's choice); on a CPU shared with other jobs,
one thread gives steadier ratios, since a multi-threaded op waits for its slowest thread. ``eager`` rows run the
modules as they are; ``compile`` rows run ``torch.compile`` of both sides (the
default inductor backend), compiled during the warm-up.

* forward: an initialised ``ActNorm`` in ``train()`` mode against the bare
  ``x * s + c`` (two ``[1, C, 1, 1]`` tensors).
* train step: ``Conv2d(C, C, 3, padding=1)`` -> norm, loss ``mean(y ** 2)``,
  ``backward`` and an SGD step; against ``BatchNorm2d``, against taming-transformers'
  ``ActNorm`` (re-implemented below from its published definition:
  ``scale * (x + loc)`` in plain autograd), and against the Conv2d alone (info).
"""

import argparse
import os
import sys

# Measure this checkout's tf_actnorm, and import the modules beside this file as the
# package `benchmarks` (neither imports a framework).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import pairing, report  # noqa: E402
from tf_actnorm.torch import ActNorm  # noqa: E402

FORWARD_TARGET = 1.05
TRAIN_TARGET = 1.00
TRAIN_BASELINES = (("batchnorm", TRAIN_TARGET, "Conv2d+BatchNorm2d"),
                   ("taming", TRAIN_TARGET, "Conv2d+taming ActNorm"),
                   ("none", None, "Conv2d alone"))
# Every row id and its target (None: information only), in the order printed.
ROWS = [(f"torch/forward 4d/{mode}/ActNorm(train) vs bare", FORWARD_TARGET)
        for mode in ("eager", "compile")] + [
    (f"torch/train step/{mode}/Conv2d+ActNorm vs {label}", target)
    for mode in ("eager", "compile") for _, target, label in TRAIN_BASELINES]


class TamingActNorm(nn.Module):
    """taming-transformers' ActNorm as published (the parts a train step runs)."""

    def __init__(self, num_features):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, input):
        if self.training and self.initialized.item() == 0:
            with torch.no_grad():
                flat = input.transpose(0, 1).reshape(input.shape[1], -1)
                self.loc.copy_(-flat.mean(1).reshape(self.loc.shape))
                self.scale.copy_(1 / (flat.std(1).reshape(self.scale.shape) + 1e-6))
            self.initialized.fill_(1)
        return self.scale * (input + self.loc)


def _sync(out):
    del out  # CPU ops are synchronous; nothing to wait for


def compare_times(candidate, baseline, args, sample_s=None):
    return pairing.compare_times(candidate, baseline, args.repeats, sample_s or args.sample_s,
                                 sync=_sync)


def row(row_id, candidate, baseline, ratio, target, note):
    report.print_row(report.row_cells(row_id, report.ms(candidate), report.ms(baseline), ratio,
                                      target, note=note))


def _modes(args):
    return ("eager",) if args.no_compile else ("eager", "compile")


def forward_rows(args):
    shape = (8, 32, 32, 32) if args.quick else (32, 64, 64, 64)
    gen = torch.Generator().manual_seed(1)
    x = 0.5 + 2.0 * torch.randn(shape, generator=gen)
    s = torch.rand(1, shape[1], 1, 1, generator=gen) + 0.5
    c = torch.randn(1, shape[1], 1, 1, generator=gen)
    norm = ActNorm(shape[1])
    norm(x)  # train() mode: initialises
    assert bool(norm.initialized)

    def bare(x, s, c):
        return x * s + c

    for mode in _modes(args):
        fn, base = (norm, bare) if mode == "eager" else (torch.compile(norm), torch.compile(bare))
        with torch.no_grad():
            tc, tb, ratio = compare_times(lambda: fn(x), lambda: base(x, s, c), args)  # noqa: B023
        row(f"torch/forward 4d/{mode}/ActNorm(train) vs bare", tc, tb, ratio, FORWARD_TARGET,
            f"x {list(shape)} f32, no_grad")


def _train_step(norm, channels, compiled):
    torch.manual_seed(0)
    layers = [nn.Conv2d(channels, channels, 3, padding=1)]
    if norm == "actnorm":
        layers.append(ActNorm(channels))
    elif norm == "taming":
        layers.append(TamingActNorm(channels))
    elif norm == "batchnorm":
        layers.append(nn.BatchNorm2d(channels))
    model = nn.Sequential(*layers).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compiled else model

    def step(x):
        loss = forward(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def train_step_rows(args):
    shape = (8, 32, 16, 16) if args.quick else (32, 64, 32, 32)
    x = 0.5 + 2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(4))
    note = f"x {list(shape)} f32; Conv2d 3x3 + norm; forward+backward+SGD"
    for mode in _modes(args):
        compiled = mode == "compile"
        steps = {norm: _train_step(norm, shape[1], compiled)
                 for norm in ("actnorm", "batchnorm", "taming", "none")}
        for base, target, label in TRAIN_BASELINES:
            tc, tb, ratio = compare_times(lambda: steps["actnorm"](x),
                                          lambda: steps[base](x),  # noqa: B023
                                          args, args.train_sample_s)
            extra = ("; taming's forward breaks the graph at `initialized.item()`"
                     if compiled and base == "taming" else "")
            row(f"torch/train step/{mode}/Conv2d+ActNorm vs {label}", tc, tb, ratio, target,
                note + extra)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, short samples")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--only", choices=("forward", "train"), action="append",
                        help="run these groups only (repeatable)")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 5 if args.quick else 21
    args.sample_s = 0.005 if args.quick else 0.05
    args.train_sample_s = 0.02 if args.quick else 0.25
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"Device: PyTorch {torch.__version__} on CPU, {torch.get_num_threads()} threads; "
          f"{report.cpu_description()}; {report.system_description()}; "
          f"load average {report.load_average()}", flush=True)
    report.Table.header()
    groups = args.only or ("forward", "train")
    if "forward" in groups:
        forward_rows(args)
    if "train" in groups:
        train_step_rows(args)


if __name__ == "__main__":
    main()
