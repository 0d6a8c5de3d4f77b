"""``tf_actnorm.initialize`` rows on the JAX Keras backend (standalone).

    KERAS_BACKEND=jax python benchmarks/init_rows.py [--quick]

Prints markdown rows in run.py's format: ``initialize(steps=16)`` (256 KiB of images:
one eager initialising pass) and ``initialize(steps=128)`` (2 MiB: streamed, one pass
per layer through ``jax.jit``-compiled functions) of a Glow-like flow written in
``keras.ops`` (30 ActNorm layers, as run.py's TensorFlow flow: ActNorm, an invertible
1x1 convolution, an affine coupling whose network holds two ActNorm layers), each from
a fresh model, compilation included (medians of 5 and 3 fresh models, as the
TensorFlow rows), against as many ``jax.jit``-compiled Adam train steps of the same
model (their compilation not included). Target: <= 5x.
"""

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tf_actnorm  # noqa: E402
from tf_actnorm import init  # noqa: E402
from benchmarks.glow_model import GlowLike  # noqa: E402


def _train_step(model):
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)

    def loss_fn(tv, ntv, x):
        log_likelihood, ntv = model.stateless_call(tv, ntv, x, training=True)
        return -jnp.mean(log_likelihood), ntv

    @jax.jit
    def step(tv, ntv, ov, x):
        (loss, ntv), grads = jax.value_and_grad(loss_fn, has_aux=True)(tv, ntv, x)
        tv, ov = optimizer.stateless_apply(ov, grads, tv)
        return tv, ntv, ov, loss

    state = [[v.value for v in model.trainable_variables],
             [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables]]

    def run(x):
        state[0], state[1], state[2], loss = step(*state, x)
        return loss

    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps_per_level, hidden = (1, 8) if args.quick else (5, 64)
    rng = np.random.default_rng(0)
    images = (rng.uniform(size=(128 * 64, 8, 8, 1)) - 0.5).astype("float32")
    batches = [images[i:i + 64] for i in range(0, len(images), 64)]

    def fresh_glow():
        keras.utils.set_random_seed(0)
        model = GlowLike(steps_per_level, hidden)
        model(batches[0], training=False)  # builds; inference never initialises
        return model

    model = fresh_glow()
    layers = sum(isinstance(l, tf_actnorm.ActNorm) for l in model._flatten_layers())
    train = _train_step(model)
    start = time.perf_counter()
    jax.block_until_ready(train(batches[0]))  # compiles and initialises
    compile_s = time.perf_counter() - start
    for _ in range(3):
        jax.block_until_ready(train(batches[0]))

    def train_seconds(count):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for batch in batches[:count]:
                loss = train(batch)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def init_seconds(count, rounds):
        times = []
        for _ in range(rounds):  # each from a fresh model: its compilation included
            fresh = fresh_glow()
            start = time.perf_counter()
            tf_actnorm.initialize(fresh, batches, steps=count, verbose=0)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    plan = init._pass_plan()
    run_kib = (plan.run_bytes or init._MERGE_BYTES) // 1024
    device = f"JAX {jax.__version__} {jax.default_backend()}, {platform.machine()}"
    for count, path, rounds in ((16, "one eager pass (data within the 1 MiB budget)", 5),
                                (128, "streamed: one pass per layer, two runs of "
                                      f"{run_kib} KiB at once, {plan.functions} jit-compiled "
                                      "functions (the first: a prefix of the model)", 3)):
        init_s, train_s = init_seconds(count, rounds), train_seconds(count)
        ratio = init_s / train_s
        cells = (f"jax/init/glow/initialize(steps={count}) vs {count} train steps",
                 f"{init_s:.2f} s", f"{train_s:.3f} s", f"{ratio:.3f}×", "≤ 5.00×",
                 "PASS" if ratio <= 5.0 else "FAIL",
                 f"{layers} ActNorm layers, batches [64, 8, 8, 1], hidden {hidden}; {path}; "
                 f"each from a fresh model, compilation included (median of {rounds}); train "
                 f"steps jax.jit (Adam), their compilation ({compile_s:.1f} s) not included; "
                 f"{device}")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
