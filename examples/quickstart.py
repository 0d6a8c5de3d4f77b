"""Quickstart: ActNorm in a small Keras CNN, where BatchNorm would usually go.

ActNorm is a per-channel affine layer, ``y = s * (x + b)``. The first training call
initialises ``b`` and ``s`` from that batch, so the layer's output has zero mean and
unit variance per channel; from then on they are ordinary trainable weights, and
training and inference compute the same function.

    python examples/quickstart.py [--quick] [--out DIR]
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import tf_actnorm  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="tiny run, for smoke tests")
parser.add_argument("--out", default=".", help="directory for quickstart.png")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)  # before training, so a bad --out fails fast
n_train, epochs = (256, 1) if args.quick else (4000, 5)
keras.utils.set_random_seed(0)


# --- Synthetic data: noisy 16x16 stripes in 4 orientations, in raw pixel units (0..255). ---
def make_images(n, rng):
    labels = rng.integers(0, 4, n)
    angles = labels * np.pi / 4 + rng.normal(0, 0.1, n)
    yy, xx = np.mgrid[:16, :16]
    phase = (np.cos(angles)[:, None, None] * xx + np.sin(angles)[:, None, None] * yy
             + rng.uniform(0, 2 * np.pi, (n, 1, 1)))
    images = 128 + 60 * np.sin(phase) + 40 * rng.normal(size=(n, 16, 16))
    return images[..., None].astype("float32"), labels


rng = np.random.default_rng(0)
x_train, y_train = make_images(n_train, rng)
x_test, y_test = make_images(1000, rng)

# --- The model: ActNorm after each convolution (which needs no bias of its own). ---
model = keras.Sequential([
    keras.Input((16, 16, 1)),
    keras.layers.Conv2D(16, 3, use_bias=False),
    tf_actnorm.ActNorm(),
    keras.layers.ReLU(),
    keras.layers.Conv2D(32, 3, strides=2, use_bias=False),
    tf_actnorm.ActNorm(),
    keras.layers.ReLU(),
    keras.layers.GlobalAveragePooling2D(),
    keras.layers.Dense(4),
])
model.compile(optimizer="adam", metrics=["accuracy"],
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
probe = keras.Model(model.inputs[0], model.layers[1].output)  # the first ActNorm's output


def channel_stats(title, images):
    # training=False only looks: it never initialises ActNorm.
    y = probe(images, training=False).numpy()
    mean, std = y.mean(axis=(0, 1, 2)), y.std(axis=(0, 1, 2))
    print(f"{title:>14}: per-channel mean {mean[0]:7.2f} {mean[1]:7.2f} ... (max |mean| "
          f"{np.abs(mean).max():6.3f}), std {std[0]:6.2f} {std[1]:6.2f} ... "
          f"(range {std.min():.3f} to {std.max():.3f})")
    return mean, std


# Before the first training call ActNorm is the identity: the output has the conv's scale.
x_batch = x_train[:64]
before = channel_stats("before init", x_batch)
# The first call in training mode initialises every ActNorm from its batch. The first batch
# of model.fit would do it too; here it is done explicitly, on a batch we can look at.
model(x_batch, training=True)
after = channel_stats("after init", x_batch)
# From here on, bias and log_scale are trained like any other weights.
model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=2)
channel_stats("after training", x_batch)
print(f"test accuracy: {model.evaluate(x_test, y_test, verbose=0)[1]:.3f}")

# --- Picture: the first ActNorm's per-channel mean +- std, before and after init. ---
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for ax, (mean, std), title in zip(axes, [before, after], ["before init", "after init"]):
    ax.errorbar(np.arange(len(mean)), mean, yerr=std, fmt="o", capsize=3)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set(title=f"first ActNorm output, {title}", xlabel="channel", ylabel="mean ± std",
           xticks=range(0, len(mean), 3))
fig.tight_layout()
path = os.path.join(args.out, "quickstart.png")
fig.savefig(path, dpi=80)
print(f"wrote {path}")
