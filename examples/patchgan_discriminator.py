"""A VQGAN-style PatchGAN discriminator with ActNorm in place of BatchNorm.

The discriminator (taming-transformers' ``NLayerDiscriminator``) scores every patch of
its input as real or fake. With ``use_actnorm=True`` its normalisation layers are
ActNorm: after the first training batch initialises them, the score of one image
depends on that image only, never on the rest of the batch, and is the same in
training and inference mode. BatchNorm's is not (and a GAN feeds the discriminator
all-real and all-fake batches, whose statistics differ). The same code builds a
Conv3D discriminator for video clips shaped [B, T, H, W, C].

    python examples/patchgan_discriminator.py [--quick] [--out DIR]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from patchgan_model import patchgan  # noqa: E402 (beside this script)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="tiny run, for smoke tests")
parser.add_argument("--out", default=".", help="directory for patchgan_discriminator.png")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)  # before training, so a bad --out fails fast
adversarial_steps, batch = (3, 16) if args.quick else (300, 32)
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)


def batch_dependence(disc, x, others_a, others_b):
    """How much D's output for x[0] moves with the rest of its batch, and with the mode."""
    batch_a, batch_b = np.concatenate([x[:1], others_a]), np.concatenate([x[:1], others_b])
    train_a, train_b = disc(batch_a, training=True)[0], disc(batch_b, training=True)[0]
    infer_a = disc(batch_a, training=False)[0]
    return (float(tf.reduce_max(tf.abs(train_a - train_b))),
            float(tf.reduce_max(tf.abs(train_a - infer_a))))


def report(title, differences):
    print(f"{title:<17}: one example's patch logits differ by {differences[0]:.1e} between two "
          f"batches (training), {differences[1]:.1e} training vs inference")
    return differences


# --- Images: digits resized to 32x32, in [-1, 1], and a tiny generator. ---
digits = tf.image.resize(load_digits().images[..., None] / 8.0 - 1.0, (32, 32)).numpy()


def make_generator():
    return keras.Sequential([
        keras.Input((16,)),
        keras.layers.Dense(8 * 8 * 64, activation="relu"),
        keras.layers.Reshape((8, 8, 64)),
        keras.layers.UpSampling2D(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.UpSampling2D(),
        keras.layers.Conv2D(1, 3, padding="same", activation="tanh"),
    ])


def train_gan(disc, gen, steps):
    """Hinge-loss adversarial steps (as in VQGAN). D's first call initialises its ActNorms."""
    d_opt, g_opt = keras.optimizers.Adam(2e-4, beta_1=0.5), keras.optimizers.Adam(5e-4, beta_1=0.5)

    @tf.function
    def step(real, noise):
        with tf.GradientTape() as d_tape, tf.GradientTape() as g_tape:
            fake = gen(noise, training=True)
            logits_real, logits_fake = disc(real, training=True), disc(fake, training=True)
            d_loss = (tf.reduce_mean(tf.nn.relu(1.0 - logits_real))
                      + tf.reduce_mean(tf.nn.relu(1.0 + logits_fake)))
            g_loss = -tf.reduce_mean(logits_fake)
        d_opt.apply_gradients(zip(d_tape.gradient(d_loss, disc.trainable_variables),
                                  disc.trainable_variables))
        g_opt.apply_gradients(zip(g_tape.gradient(g_loss, gen.trainable_variables),
                                  gen.trainable_variables))
        return d_loss, g_loss

    for _ in range(steps):
        real = digits[rng.integers(0, len(digits), batch)]
        d_loss, g_loss = step(real, rng.normal(size=(batch, 16)).astype("float32"))
    return float(d_loss), float(g_loss)


results, image_discs = {}, {}
for use_actnorm in (True, False):
    name = "ActNorm" if use_actnorm else "BatchNorm"
    disc, gen = patchgan((32, 32, 1), use_actnorm), make_generator()
    d_loss, g_loss = train_gan(disc, gen, adversarial_steps)
    print(f"images, {name}: {adversarial_steps} adversarial steps, D loss {d_loss:.3f}, "
          f"G loss {g_loss:.3f}")
    image_discs[name] = disc, gen
    x = digits[rng.choice(len(digits), 2 * batch, replace=False)]
    results["images", name] = report(f"images, {name}", batch_dependence(
        disc, x, x[1:batch], x[batch:2 * batch - 1]))


# --- Video: clips of a moving square, [B, T=8, H=16, W=16, C=1], through Conv3D. ---
def moving_squares(n):
    clips = -np.ones((n, 8, 16, 16, 1), "float32")
    for clip, (y, x, dy, dx) in zip(clips, rng.integers([0, 0, -1, -1], [12, 12, 2, 2], (n, 4))):
        for t in range(8):
            yt, xt = np.clip([y + dy * t, x + dx * t], 0, 12)
            clip[t, yt:yt + 4, xt:xt + 4] = 1.0
    return clips


clips = moving_squares(2 * batch)
for use_actnorm in (True, False):
    name = "ActNorm" if use_actnorm else "BatchNorm"
    disc = patchgan((8, 16, 16, 1), use_actnorm)
    disc(clips[:batch], training=True)  # one training call: initialises ActNorm
    results["video", name] = report(f"video, {name}", batch_dependence(
        disc, clips, clips[1:batch], clips[batch:2 * batch - 1]))

# --- Picture: real and generated digits, D's patch logits, the differences above. ---
def tile(images, rows):  # [N, H, W] -> one image, N / rows images per row
    return np.vstack([np.hstack(row) for row in np.split(images, rows)])


disc, gen = image_discs["ActNorm"]
fake = gen(rng.normal(size=(8, 16)).astype("float32"), training=False).numpy()
patches = disc(np.concatenate([digits[:4], fake[:4]]), training=False).numpy()[..., 0]
fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), width_ratios=[1, 1, 1, 1.2])
axes[0].imshow(tile(digits[:8, :, :, 0], 2), cmap="gray_r")
axes[0].set_title("real digits")
axes[1].imshow(tile(fake[..., 0], 2), cmap="gray_r")
axes[1].set_title(f"generator after {adversarial_steps} steps")
limit = np.abs(patches).max()
axes[2].imshow(tile(patches, 2), cmap="RdBu", vmin=-limit, vmax=limit)
axes[2].set_title("ActNorm D's patch logits (blue: real)\ntop: real digits, bottom: generated")
for ax in axes[:3]:
    ax.set(xticks=[], yticks=[])
labels = [f"{data}\n{name}" for data in ("images", "video") for name in ("ActNorm", "BatchNorm")]
values = [results[data, name] for data in ("images", "video") for name in ("ActNorm", "BatchNorm")]
positions = np.arange(len(labels))
for offset, k, label in [(-0.2, 0, "between two batches"), (0.2, 1, "training vs inference")]:
    heights = [max(v[k], 1e-7) for v in values]
    bars = axes[3].bar(positions + offset, heights, width=0.4, label=label)
    axes[3].bar_label(bars, [f"{v[k]:.0e}" if v[k] else "0" for v in values], fontsize=8)
axes[3].set(yscale="log", ylim=(1e-7, 1e3), xticks=positions, xticklabels=labels,
            title="max |Δ logit| of one example")
axes[3].legend(fontsize=8, loc="upper left")
fig.tight_layout()
path = os.path.join(args.out, "patchgan_discriminator.png")
fig.savefig(path, dpi=80)
print(f"wrote {path}")
