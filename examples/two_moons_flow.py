"""Two moons: a RealNVP normalising flow with ActNorm between its couplings.

Data is mapped to a standard normal through blocks of
ActNorm -> affine coupling -> swap of the two coordinates. Each ActNorm initialises
itself from the first batch that reaches it (the first ``log_prob(data)``), so every
coupling starts out seeing standardised inputs.

    python examples/two_moons_flow.py [--quick] [--out DIR]
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
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402
from sklearn.datasets import make_moons  # noqa: E402

import tf_actnorm  # noqa: E402

tfb, tfd = tfp.bijectors, tfp.distributions

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="tiny run, for smoke tests")
parser.add_argument("--out", default=".", help="directory for two_moons.png")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)  # before training, so a bad --out fails fast
blocks, hidden, steps, batch = (2, 16, 30, 128) if args.quick else (6, 64, 2500, 256)
keras.utils.set_random_seed(0)

# --- Data: a large training set, a held-out test set. ---
x_train = make_moons(20_000, noise=0.05, random_state=0)[0].astype("float32")
x_test = make_moons(5_000, noise=0.05, random_state=1)[0].astype("float32")


# --- The flow. ---
def affine_coupling(hidden):
    """RealNVP coupling: x0 passes through, x1 -> x1 * exp(log_scale(x0)) + shift(x0)."""
    net = keras.Sequential([
        keras.Input((1,)),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(2, kernel_initializer="zeros"),  # starts as the identity
    ])

    def shift_and_log_scale(x0, output_units):
        shift, log_scale = tf.split(net(x0), 2, axis=-1)
        return shift, tf.tanh(log_scale)  # a bounded log-scale keeps training stable

    return tfb.RealNVP(num_masked=1, shift_and_log_scale_fn=shift_and_log_scale), net


# Listed from the data side: log_prob(x) runs x through these in order (as inverses).
bijectors, nets = [], []
for _ in range(blocks):
    coupling, net = affine_coupling(hidden)
    bijectors += [tfb.Invert(tf_actnorm.ActNormBijector(2)), coupling, tfb.Permute([1, 0])]
    nets.append(net)
flow = tfd.TransformedDistribution(
    tfd.MultivariateNormalDiag(loc=tf.zeros(2)), bijector=tfb.Chain(bijectors))

# Data-dependent initialisation: the first log_prob standardises what reaches each ActNorm
# (and builds the coupling networks).
print(f"initial NLL (first batch, ActNorm initialised): "
      f"{-tf.reduce_mean(flow.log_prob(x_train[:1024])):.3f} nats")
variables = list(flow.trainable_variables) + [v for n in nets for v in n.trainable_variables]
optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps))


@tf.function(jit_compile=True)
def train_step(x):
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(flow.log_prob(x))
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss


# --- Training. ---
start = time.perf_counter()
progbar = keras.utils.Progbar(steps, stateful_metrics=["nll"], interval=1.0)
rng = np.random.default_rng(0)
for step in range(1, steps + 1):
    loss = train_step(x_train[rng.integers(0, len(x_train), batch)])
    if step % 50 == 0 or step == steps:
        progbar.update(step, [("nll", float(loss))])
print(f"trained {steps} steps in {time.perf_counter() - start:.1f} s")

# --- Held-out NLL against a Gaussian fitted to the training data. ---
gaussian = tfd.MultivariateNormalTriL(
    x_train.mean(0), np.linalg.cholesky(np.cov(x_train, rowvar=False)).astype("float32"))
nll_gauss = -float(tf.reduce_mean(gaussian.log_prob(x_test)))
nll_flow = -float(tf.reduce_mean(flow.log_prob(x_test)))
print(f"held-out NLL: flow {nll_flow:.3f} nats, Gaussian {nll_gauss:.3f} nats")

# --- Picture: data, samples, learned density. ---
samples = flow.sample(2000, seed=0).numpy()
grid = np.stack(np.meshgrid(np.linspace(-1.5, 2.5, 200), np.linspace(-1, 1.5, 125)), -1)
log_density = flow.log_prob(grid.reshape(-1, 2).astype("float32")).numpy()
density = np.exp(log_density).reshape(grid.shape[:2])
fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharex=True, sharey=True)
axes[0].scatter(*x_test[:2000].T, s=1, c="tab:blue")
axes[0].set_title("data (held out)")
axes[1].scatter(*samples.T, s=1, c="tab:orange")
axes[1].set_title("flow samples")
axes[2].imshow(density, origin="lower", extent=(-1.5, 2.5, -1, 1.5), cmap="magma", aspect="auto")
axes[2].set_title(f"learned density (NLL {nll_flow:.2f} vs Gaussian {nll_gauss:.2f})")
for ax in axes:
    ax.set(xlim=(-1.5, 2.5), ylim=(-1, 1.5), xticks=[-1, 0, 1, 2])
fig.tight_layout()
path = os.path.join(args.out, "two_moons.png")
fig.savefig(path, dpi=80)
print(f"wrote {path}")
