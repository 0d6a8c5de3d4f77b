"""``tf_actnorm.initialize`` rows on the JAX Keras backend (standalone).

    KERAS_BACKEND=jax python benchmarks/init_rows.py [--quick]

Prints markdown rows in run.py's format: ``initialize(steps=16)`` (256 KiB of images:
one eager initialising pass) and ``initialize(steps=128)`` (2 MiB: streamed, one pass
per layer through one ``jax.jit``-compiled function) of a Glow-like flow written in
``keras.ops`` (30 ActNorm layers, as run.py's TensorFlow flow: ActNorm, an invertible
1x1 convolution, an affine coupling whose network holds two ActNorm layers), each from
a fresh model, compilation included, against as many ``jax.jit``-compiled Adam train
steps of the same model (their compilation not included). Target: <= 5x.
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
from keras import ops  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tf_actnorm  # noqa: E402


class Conv1x1(keras.layers.Layer):
    """An invertible 1x1 convolution (a [C, C] matrix starting as a rotation)."""

    def build(self, input_shape):
        c = input_shape[-1]
        rotation = np.linalg.qr(np.random.default_rng(c).normal(size=(c, c)))[0]
        self.kernel = self.add_weight(shape=(c, c),
                                      initializer=keras.initializers.Constant(rotation))

    def call(self, x):
        log_det = ops.log(ops.abs(ops.linalg.det(self.kernel)))
        return ops.matmul(x, self.kernel), float(x.shape[1] * x.shape[2]) * log_det


class FlowStep(keras.layers.Layer):
    def __init__(self, hidden, **kwargs):
        super().__init__(**kwargs)
        self.actnorm, self.conv1x1, self.hidden = tf_actnorm.ActNorm(), Conv1x1(), hidden

    def build(self, input_shape):
        self.net = keras.Sequential([
            keras.layers.Conv2D(self.hidden, 3, padding="same", use_bias=False),
            tf_actnorm.ActNorm(), keras.layers.ReLU(),
            keras.layers.Conv2D(self.hidden, 1, use_bias=False),
            tf_actnorm.ActNorm(), keras.layers.ReLU(),
            keras.layers.Conv2D(input_shape[-1], 3, padding="same", kernel_initializer="zeros"),
        ])

    def call(self, x, training=None):
        y = self.actnorm(x, training=training)
        log_det = self.actnorm.forward_log_det_jacobian(x)
        y, conv_log_det = self.conv1x1(y)
        y_a, y_b = ops.split(y, 2, axis=-1)
        shift, raw = ops.split(self.net(y_a, training=training), 2, axis=-1)
        scale = ops.sigmoid(raw + 2.0)
        log_det = log_det + conv_log_det + ops.sum(ops.log(scale), axis=(1, 2, 3))
        return ops.concatenate([y_a, (y_b + shift) * scale], axis=-1), log_det


def _space_to_depth(x):
    b, h, w, c = x.shape
    x = ops.reshape(x, (-1, h // 2, 2, w // 2, 2, c))
    return ops.reshape(ops.transpose(x, (0, 1, 3, 2, 4, 5)), (-1, h // 2, w // 2, 4 * c))


class GlowLike(keras.Model):
    """Two levels of ``steps`` flow steps on [8, 8, 1] images (subclassed)."""

    def __init__(self, steps, hidden):
        super().__init__()
        self.levels = [[FlowStep(hidden) for _ in range(steps)] for _ in range(2)]

    def call(self, x, training=None):
        h, log_det, latents = _space_to_depth(x), 0.0, []
        for i, level in enumerate(self.levels):
            if i:
                z, h = ops.split(h, 2, axis=-1)
                latents.append(z)
                h = _space_to_depth(h)
            for step in level:
                h, step_log_det = step(h, training=training)
                log_det = log_det + step_log_det
        latents.append(h)
        log_prior = sum(ops.sum(-0.5 * z ** 2, axis=(1, 2, 3)) for z in latents)
        return log_prior + log_det


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

    device = f"JAX {jax.__version__} {jax.default_backend()}, {platform.machine()}"
    for count, path, rounds in ((16, "one eager pass (data within the 1 MiB budget)", 3),
                                (128, "streamed: one pass per layer, one jit-compiled "
                                      "whole-model function", 2)):
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
