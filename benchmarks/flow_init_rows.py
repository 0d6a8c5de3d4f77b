"""``tf_actnorm.initialize`` on a TFP flow: a Glow-like bijector chain with 30
ActNormBijectors, against as many compiled (XLA) training steps of the flow.

``python benchmarks/flow_init_rows.py [--repeats N] [--quick]`` prints a Markdown table
(the same columns as ``run.py``) headed by the CPU's name. ``initialize`` runs on a fresh
flow each time (couplings built, ActNorms uninitialised), its tracing included; the
training steps' tracing and XLA compilation are not.
"""

import argparse
import os
import platform
import statistics
import subprocess
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

import tf_actnorm  # noqa: E402

tfb, tfd = tfp.bijectors, tfp.distributions

BATCH, DIM = 64, 64  # a batch of 64 float32 events of 64 values: 16 KiB


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def coupling(dim, hidden):
    """A RealNVP affine coupling whose shift and log-scale come from a small Keras net."""
    net = keras.Sequential([keras.layers.Dense(hidden, activation="relu"),
                            keras.layers.Dense(2 * (dim - dim // 2), kernel_initializer="zeros")])
    net.build((None, dim // 2))

    def shift_and_log_scale(x, output_units):
        shift, log_scale = tf.split(net(x), 2, axis=-1)
        return shift, tf.tanh(log_scale)

    return tfb.RealNVP(num_masked=dim // 2, shift_and_log_scale_fn=shift_and_log_scale), net


def glow_like_flow(blocks, dim=DIM, hidden=64, seed=0):
    """``blocks`` x (ActNorm -> reverse permutation -> affine coupling), from the data side:
    ``TransformedDistribution(N(0, I), Invert(Chain([...])))``, so ``log_prob(data)`` runs
    each ActNorm forward on its inputs. Returns the flow, its ActNorms (data order) and the
    trainable variables (the couplings' nets are Keras layers, outside the flow's)."""
    keras.utils.set_random_seed(seed)
    steps, actnorms, variables = [], [], []
    for i in range(blocks):
        actnorm = tf_actnorm.ActNormBijector(dim, name=f"actnorm_{i}")
        layer, net = coupling(dim, hidden)
        steps += [actnorm, tfb.Permute(np.arange(dim)[::-1]), layer]
        actnorms.append(actnorm)
        variables += net.trainable_variables
    flow = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(dim)),
                                       tfb.Invert(tfb.Chain(steps[::-1])))
    return flow, actnorms, variables + [v for a in actnorms for v in a.trainable_variables]


def train_step_fn(flow, variables):
    optimizer = keras.optimizers.Adam(1e-4)

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(flow.log_prob(x))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="6 ActNorms, for a smoke test")
    args = parser.parse_args()
    blocks = 6 if args.quick else 30
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(128 * BATCH, DIM)) * rng.uniform(0.5, 4.0, DIM)
            + rng.uniform(-5, 5, DIM)).astype("float32")
    batches = tf.data.Dataset.from_tensor_slices(data).batch(BATCH).cache()
    list(batches)  # fills the cache

    warm, _, _ = glow_like_flow(blocks)  # TensorFlow's and Keras' one-time costs
    tf_actnorm.initialize(warm, batches, steps=2, verbose=0)
    flow, _, variables = glow_like_flow(blocks)
    train = train_step_fn(flow, variables)
    start = time.perf_counter()
    train(data[:BATCH])  # traces, compiles and initialises
    compile_s = time.perf_counter() - start
    for batch in batches.take(3):
        train(batch)

    def train_seconds(n):
        start = time.perf_counter()
        for batch in batches.take(n):
            loss = train(batch)
        float(loss)  # waits for the last step
        return time.perf_counter() - start

    def init_seconds(n):
        fresh, _, _ = glow_like_flow(blocks)  # initialize on a fresh flow: tracing included
        start = time.perf_counter()
        tf_actnorm.initialize(fresh, batches, steps=n, verbose=0)
        return time.perf_counter() - start

    def paired(n):
        """Median init and train times and the median of per-round ratios; each round
        times both back to back, alternating which goes first (as pairing.py does)."""
        inits, trains, ratios = [], [], []
        for i in range(args.repeats):
            if i % 2:
                train_s = train_seconds(n)
                init_s = init_seconds(n)
            else:
                init_s = init_seconds(n)
                train_s = train_seconds(n)
            inits.append(init_s)
            trains.append(train_s)
            ratios.append(init_s / train_s)
        return statistics.median(inits), statistics.median(trains), statistics.median(ratios)

    print(f"CPU: {cpu_name()}; {os.cpu_count()} logical cores; load average "
          f"{os.getloadavg()[0]:.2f}; TensorFlow {tf.__version__}, TFP {tfp.__version__}")
    print("| row | candidate | baseline | ratio | target | result | notes |")
    print("|---|---:|---:|---:|---:|:---:|---|")
    for n, path in ((16, "one eager pass (256 KiB, within the 1 MiB budget)"),
                    (128, "streamed (2 MiB): one pass per ActNorm")):
        init_s, train_s, ratio = paired(n)
        print(f"| init/flow/initialize(steps={n}) vs {n} train steps | {init_s:.2f} s | "
              f"{train_s:.3f} s | {ratio:.3f}× | ≤ 5.00× | {'PASS' if ratio <= 5 else 'FAIL'} | "
              f"{blocks} ActNormBijectors + RealNVP couplings, batches [{BATCH}, {DIM}]; {path}; "
              f"each from a fresh flow, tracing included; median of {args.repeats} paired rounds; "
              f"train steps XLA-compiled (Adam), their compilation ({compile_s:.1f} s) not "
              "included |")


if __name__ == "__main__":
    main()
