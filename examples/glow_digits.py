"""Glow on 8x8 digits: a small multi-scale flow built from ActNorm layers.

Each flow step is ActNorm -> invertible 1x1 convolution -> affine coupling (Kingma &
Dhariwal, 2018); two levels of steps with a squeeze before each and half the channels
factored out between them. The coupling networks use ActNorm too, in place of
BatchNorm. Data: scikit-learn's ``load_digits`` (8x8, 17 grey levels), dequantised.

    python examples/glow_digits.py [--quick] [--out DIR]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import tf_actnorm  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="tiny run, for smoke tests")
parser.add_argument("--out", default=".", help="directory for glow_digits.png")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)  # before training, so a bad --out fails fast
steps_per_level, hidden, train_steps, batch = (1, 8, 20, 64) if args.quick else (4, 64, 1500, 64)
keras.utils.set_random_seed(0)

# --- Data: 1797 digits with integer pixels 0..16, split into train and held-out test. ---
LEVELS = 17
pixels = load_digits().images[..., None].astype("int32")  # [N, 8, 8, 1]
order = np.random.default_rng(0).permutation(len(pixels))
train_pixels, test_pixels = pixels[order[300:]], pixels[order[:300]]
DIMS = 8 * 8


def dequantise(k, rng):
    """Uniform dequantisation into [-0.5, 0.5]: x = (k + u) / 17 - 0.5."""
    return ((k + rng.uniform(size=k.shape)) / LEVELS - 0.5).astype("float32")


def bits_per_dim(log_prob):
    """Discrete bits/dim of dequantised data from the continuous log-density of x."""
    return (-tf.reduce_mean(log_prob) / DIMS + np.log(LEVELS)) / np.log(2.0)


# --- The flow. Its call maps data to latents (x -> z) and returns the log-determinant. ---
class InvertibleConv1x1(keras.layers.Layer):
    """Glow's invertible 1x1 convolution, LU-decomposed so log|det| costs O(C)."""

    def build(self, input_shape):
        c = input_shape[-1]
        w = np.linalg.qr(np.random.normal(size=(c, c)))[0]  # a random rotation
        p, lower, upper = scipy.linalg.lu(w)
        s = np.diag(upper)
        self.p, self.sign_s = p.astype("float32"), np.sign(s).astype("float32")
        self.lower_mask = np.tril(np.ones((c, c), "float32"), -1)
        constant = keras.initializers.Constant
        self.lower = self.add_weight(shape=(c, c), initializer=constant(lower))
        self.upper = self.add_weight(shape=(c, c), initializer=constant(np.triu(upper, 1)))
        self.log_s = self.add_weight(shape=(c,), initializer=constant(np.log(np.abs(s))))

    def weight(self):
        lower = self.lower * self.lower_mask + tf.eye(self.lower.shape[0])
        upper = self.upper * self.lower_mask.T + tf.linalg.diag(self.sign_s * tf.exp(self.log_s))
        return tf.matmul(self.p, lower) @ upper

    def call(self, x):
        positions = tf.cast(x.shape[1] * x.shape[2], tf.float32)
        return x @ self.weight(), positions * tf.reduce_sum(self.log_s)

    def inverse(self, y):
        return y @ tf.linalg.inv(self.weight())


class FlowStep(keras.layers.Layer):
    """ActNorm -> invertible 1x1 conv -> affine coupling."""

    def __init__(self, hidden, **kwargs):
        super().__init__(**kwargs)
        self.actnorm = tf_actnorm.ActNorm()
        self.conv1x1 = InvertibleConv1x1()
        self.hidden = hidden

    def build(self, input_shape):
        channels = input_shape[-1]
        self.coupling_net = keras.Sequential([  # half the channels -> shift, scale of the rest
            keras.layers.Conv2D(self.hidden, 3, padding="same", use_bias=False),
            tf_actnorm.ActNorm(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(self.hidden, 1, use_bias=False),
            tf_actnorm.ActNorm(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(channels, 3, padding="same", kernel_initializer="zeros"),
        ])

    def _shift_scale(self, x_a, training):
        shift, raw_scale = tf.split(self.coupling_net(x_a, training=training), 2, axis=-1)
        return shift, tf.sigmoid(raw_scale + 2.0)

    def call(self, x, training=None):
        y = self.actnorm(x, training=training)  # initialises on the first training call...
        log_det = self.actnorm.forward_log_det_jacobian(x)  # ...so take its log-det after it
        y, conv_log_det = self.conv1x1(y)
        y_a, y_b = tf.split(y, 2, axis=-1)
        shift, scale = self._shift_scale(y_a, training)
        y_b = (y_b + shift) * scale
        log_det += conv_log_det + tf.reduce_sum(tf.math.log(scale), axis=[1, 2, 3])
        return tf.concat([y_a, y_b], axis=-1), log_det

    def inverse(self, y):
        y_a, y_b = tf.split(y, 2, axis=-1)
        shift, scale = self._shift_scale(y_a, training=False)
        y = self.conv1x1.inverse(tf.concat([y_a, y_b / scale - shift], axis=-1))
        return self.actnorm.inverse(y)


class Glow(keras.Model):
    """[8,8,1] -squeeze-> [4,4,4] -steps-> split off [4,4,2] -squeeze-> [2,2,8] -steps->."""

    def __init__(self, steps_per_level, hidden):
        super().__init__()
        self.level1 = [FlowStep(hidden) for _ in range(steps_per_level)]
        self.level2 = [FlowStep(hidden) for _ in range(steps_per_level)]

    def call(self, x, training=None):
        h, log_det = tf.nn.space_to_depth(x, 2), 0.0
        for step in self.level1:
            h, step_log_det = step(h, training=training)
            log_det += step_log_det
        z1, h = tf.split(h, 2, axis=-1)  # z1 is factored out: it goes straight to the prior
        h = tf.nn.space_to_depth(h, 2)
        for step in self.level2:
            h, step_log_det = step(h, training=training)
            log_det += step_log_det
        return [z1, h], log_det

    def log_prob(self, x, training=None):
        latents, log_det = self(x, training=training)
        log_normal = [tf.reduce_sum(-0.5 * (z**2 + np.log(2 * np.pi)), axis=[1, 2, 3])
                      for z in latents]
        return tf.add_n(log_normal) + log_det

    def sample(self, n, temperature=0.7):
        z1 = temperature * tf.random.normal([n, 4, 4, 2])
        h = temperature * tf.random.normal([n, 2, 2, 8])
        for step in reversed(self.level2):
            h = step.inverse(h)
        h = tf.concat([z1, tf.nn.depth_to_space(h, 2)], axis=-1)
        for step in reversed(self.level1):
            h = step.inverse(h)
        return tf.nn.depth_to_space(h, 2)


glow = Glow(steps_per_level, hidden)
rng = np.random.default_rng(0)
first_batch = dequantise(train_pixels[:batch], rng)

# --- First-step loss, without and then with data-dependent init. training=False never
# initialises, so the first value is the untouched flow (every ActNorm the identity); the
# training-mode call then initialises every ActNorm from this batch, as a first training
# step would. Nothing else differs between the two numbers.
loss_without = bits_per_dim(glow.log_prob(first_batch, training=False))
loss_with = bits_per_dim(glow.log_prob(first_batch, training=True))
print(f"first-step loss: {loss_with:.3f} bits/dim with data-dependent init, "
      f"{loss_without:.3f} without")

optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
    0.0, train_steps, warmup_target=2e-3, warmup_steps=train_steps // 10))


@tf.function(jit_compile=True)
def train_step(x):
    with tf.GradientTape() as tape:
        loss = bits_per_dim(glow.log_prob(x, training=True))
    grads = tape.gradient(loss, glow.trainable_variables)
    optimizer.apply_gradients(zip(grads, glow.trainable_variables))
    return loss


start = time.perf_counter()
progbar = keras.utils.Progbar(train_steps, stateful_metrics=["bits/dim"], interval=1.0)
for step in range(1, train_steps + 1):
    loss = train_step(dequantise(train_pixels[rng.integers(0, len(train_pixels), batch)], rng))
    if step % 50 == 0 or step == train_steps:
        progbar.update(step, [("bits/dim", float(loss))])
print(f"trained {train_steps} steps in {time.perf_counter() - start:.1f} s")

test_x = dequantise(test_pixels, np.random.default_rng(1))
test_bpd = float(bits_per_dim(glow.log_prob(test_x, training=False)))
print(f"held-out: {test_bpd:.3f} bits/dim (uniform over 17 levels: {np.log2(LEVELS):.3f})")

# --- Picture: held-out digits next to samples. ---
samples = np.clip(glow.sample(64, temperature=0.7).numpy() + 0.5, 0, 1)
fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
for ax, images, title in [(axes[0], test_pixels / 16, "held-out digits"),
                          (axes[1], samples, "Glow samples (T = 0.7)")]:
    padded = np.pad(images[:64, :, :, 0], [(0, 0), (1, 0), (1, 0)], constant_values=0.3)
    tiled = padded.reshape(8, 8, 9, 9).transpose(0, 2, 1, 3).reshape(72, 72)
    ax.imshow(tiled, cmap="gray_r", vmin=0, vmax=1)
    ax.set(title=title, xticks=[], yticks=[])
fig.suptitle(f"held-out {test_bpd:.2f} bits/dim")
fig.tight_layout()
path = os.path.join(args.out, "glow_digits.png")
fig.savefig(path, dpi=80)
print(f"wrote {path}")
