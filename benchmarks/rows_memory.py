"""Memory rows (group ``memory``): what a train step keeps, with ActNorm and without.

* Peak memory of a train step: ``Conv2D(64, 3, same) -> norm`` (``models.conv_model``)
  with ActNorm against BatchNormalization; the row's note gives the Conv2D alone, for
  the layers' own share.
* Saved activations: ``Conv2D -> norm -> Conv2D`` on ``[16, 32, 32, 32]`` (the norm's
  output is the second convolution's input, which that convolution keeps for its
  weight gradient), ActNorm and ``ActNormBijector`` against no norm (BatchNormalization
  and TFP's glow ActNorm in the note), and a Glow step (ActNorm -> invertible 1x1
  convolution -> affine coupling, loss with the log-determinants) with and without
  ActNorm. "xla" rows trace the step with ``jit_compile=True``.

On a GPU the rows read the allocator's peak during one step; on a CPU, the bytes of
the forward tensors that the backward pass reads (``graph_memory.py`` describes both).
"""

import tensorflow as tf

from benchmarks import graph_memory, models
from benchmarks.report import mib
from benchmarks.timing import GPU, MODES


def memory_rows(table, args):
    shape = (8, 16, 16, 64) if args.quick else (32, 32, 32, 64)
    x = tf.random.normal(shape, seed=6)
    measured = {}
    for norm in ("actnorm", "batchnorm", "none"):
        model = models.conv_model(norm, shape)
        if GPU:
            measured[norm] = graph_memory.gpu_step_peak_bytes(
                models.train_step(model, jit=False), x)
        else:
            measured[norm] = graph_memory.saved_for_backward_bytes(
                lambda x: tf.reduce_mean(tf.square(model(x, training=True))),
                model.trainable_variables, x)
    what = ("GPU peak bytes allocated during one step" if GPU
            else "CPU proxy: bytes of forward tensors kept for the backward pass")
    table.add("peak memory/train step/Conv2D+ActNorm vs Conv2D+BatchNorm",
              mib(measured["actnorm"]), mib(measured["batchnorm"]),
              measured["actnorm"] / measured["batchnorm"], 1.00,
              note=f"{what}; x {list(shape)} f32; bytes: {measured['actnorm']:,} vs "
                   f"{measured['batchnorm']:,}, Conv2D alone {measured['none']:,}")
    saved_activation_rows(table, args)


def _activation_bytes(network, x, jit):
    loss_fn, variables = network
    if GPU:
        step = graph_memory.loss_and_grads(loss_fn, variables, jit)
        return graph_memory.gpu_step_peak_bytes(step, x)
    return graph_memory.saved_for_backward_bytes(loss_fn, variables, x, jit_compile=jit)


def saved_activation_rows(table, args):
    """ActNorm keeps no activation of its own for the backward pass: a network with it
    keeps as much as the same network without it."""
    shape = (4, 16, 16, 16) if args.quick else (16, 32, 32, 32)
    x = tf.random.normal(shape, seed=7)
    what = "GPU peak bytes" if GPU else "CPU proxy"
    for mode, jit in MODES:
        measured = {norm: _activation_bytes(models.conv_norm_conv(norm, x), x, jit)
                    for norm in ("none", "actnorm", "bijector", "batchnorm", "tfp-glow")}
        for norm, key in (("actnorm", "ActNorm"), ("bijector", "ActNormBijector")):
            table.add(f"peak memory/Conv2D-norm-Conv2D/{mode}/{key} vs no norm",
                      mib(measured[norm]), mib(measured["none"]),
                      measured[norm] / measured["none"], 1.01,
                      note=f"{what}; x {list(shape)} f32; BatchNorm "
                           f"{mib(measured['batchnorm'])}, TFP glow {mib(measured['tfp-glow'])}")
        with_norm = _activation_bytes(models.glow_step(True, x), x, jit)
        without = _activation_bytes(models.glow_step(False, x), x, jit)
        table.add(f"peak memory/Glow step/{mode}/with ActNorm vs without", mib(with_norm),
                  mib(without), with_norm / without, 1.01,
                  note=f"{what}; ActNorm -> 1x1 conv -> affine coupling; x {list(shape)} f32")
