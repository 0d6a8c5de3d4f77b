"""ActNorm benchmark rows on the JAX Keras backend, under ``jax.jit``.

Run by ``benchmarks/run.py`` (group ``jax``) in a subprocess of the same interpreter
with ``KERAS_BACKEND=jax`` (the backend is fixed when Keras is first imported); by hand:

    KERAS_BACKEND=jax python benchmarks/jax_rows.py [--quick]

Needs no TensorFlow. Prints ``Device: ...`` and markdown rows in run.py's format
(``report.py``). Same method as run.py (``pairing.py``):
warm-up, then rounds that time candidate and baseline back to back (order
alternating), each sample lasting ~50 ms (5 ms with ``--quick``); medians of the
times and of the per-round ratios. Every function is ``jax.jit``-compiled and each
sample ends with ``block_until_ready``.

* forward: ``layer.stateless_call`` (what ``predict``/``fit`` run) with
  ``training=False`` and with ``training=True`` once initialised (the "init once"
  ``lax.cond`` is in the graph), against the bare ``x * s + c``.
* train step: ``Conv2D(64, 3, same) -> norm``, loss ``mean(y**2)``,
  ``jax.value_and_grad`` through ``stateless_call`` and an SGD update of the
  trainable variables, the non-trainable ones (ActNorm's flag and initial values,
  BatchNormalization's moving statistics) threaded through; against
  ``BatchNormalization`` and the Conv2D alone.
"""

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
# Measure this checkout's tf_actnorm, and import the modules beside this file as the
# package `benchmarks` (neither imports a framework).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_actnorm  # noqa: E402
from benchmarks import pairing, report  # noqa: E402

ROWS = [
    ("jax/forward 4d/jit/layer(training=False) vs bare", 1.05),
    ("jax/forward 4d/jit/layer(training=True) vs bare", 1.05),
    # Parity with BatchNormalization: a ratio resolves to about +-1% here.
    ("jax/train step/jit/Conv2D+ActNorm vs Conv2D+BatchNorm", 1.02),
    ("jax/train step/jit/Conv2D+ActNorm vs Conv2D alone", None),
]


_JAX = f"JAX {jax.__version__} {jax.default_backend()}"


def _ready(out):
    jax.tree_util.tree_map(lambda a: a.block_until_ready(), out)


def compare_times(candidate, baseline, repeats, target_s):
    return pairing.compare_times(candidate, baseline, repeats, target_s, sync=_ready)


def row(row_id, candidate, baseline, ratio, target, note):
    report.print_row(report.row_cells(row_id, report.ms(candidate), report.ms(baseline), ratio,
                                      target, note=note))


def forward_rows(args):
    shape = (8, 32, 32, 64) if args.quick else (32, 64, 64, 64)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(0.5, 2.0, shape).astype("float32"))
    s = jnp.asarray(rng.uniform(0.5, 2.0, shape[-1:]).astype("float32"))
    c = jnp.asarray(rng.normal(size=shape[-1:]).astype("float32"))
    layer = tf_actnorm.ActNorm()
    layer(x, training=True)  # initialises
    assert bool(np.asarray(layer.initialized))
    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]
    bare = jax.jit(lambda x, s, c: x * s + c)
    fns = {
        training: jax.jit(lambda tv, ntv, x, training=training: layer.stateless_call(
            tv, ntv, x, training=training)[0])
        for training in (False, True)}
    for (row_id, target), training in zip(ROWS[:2], (False, True)):
        tc, tb, ratio = compare_times(lambda: fns[training](tv, ntv, x),  # noqa: B023
                                      lambda: bare(x, s, c), args.repeats, args.sample_s)
        row(row_id, tc, tb, ratio, target, f"x {list(shape)} f32; {_JAX}")


def _train_step(norm, shape):
    keras.utils.set_random_seed(0)
    layers = [keras.Input(shape[1:]), keras.layers.Conv2D(shape[-1], 3, padding="same")]
    if norm == "actnorm":
        layers.append(tf_actnorm.ActNorm())
    elif norm == "batchnorm":
        layers.append(keras.layers.BatchNormalization())
    model = keras.Sequential(layers)

    def loss_fn(tv, ntv, x):
        y, ntv = model.stateless_call(tv, ntv, x, training=True)
        return jnp.mean(y ** 2), ntv

    @jax.jit
    def step(tv, ntv, x):
        (loss, ntv), grads = jax.value_and_grad(loss_fn, has_aux=True)(tv, ntv, x)
        return [v - 1e-3 * g for v, g in zip(tv, grads)], ntv, loss

    state = [[v.value for v in model.trainable_variables],
             [v.value for v in model.non_trainable_variables]]

    def run(x):
        state[0], state[1], loss = step(state[0], state[1], x)
        return loss

    return run


def train_step_rows(args):
    shape = (8, 16, 16, 64) if args.quick else (32, 32, 32, 64)
    x = jnp.asarray(np.random.default_rng(4).normal(0.5, 2.0, shape).astype("float32"))
    steps = {norm: _train_step(norm, shape) for norm in ("actnorm", "batchnorm", "none")}
    for (row_id, target), base in zip(ROWS[2:], ("batchnorm", "none")):
        tc, tb, ratio = compare_times(lambda: steps["actnorm"](x),
                                      lambda: steps[base](x),  # noqa: B023
                                      args.repeats, args.sample_s)
        row(row_id, tc, tb, ratio, target, f"x {list(shape)} f32; forward+backward+SGD; {_JAX}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    assert keras.backend.backend() == "jax", keras.backend.backend()
    if args.repeats is None:
        args.repeats = 5 if args.quick else 21
    args.sample_s = 0.005 if args.quick else 0.05
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    print(f"Device: JAX {jax.__version__} on {jax.default_backend()} ({devices}); "
          f"CPU: {report.cpu_name()}; Keras {keras.__version__}", flush=True)
    forward_rows(args)
    train_step_rows(args)


if __name__ == "__main__":
    main()
