"""``keras.distribution.DataParallel`` scenario for test_backend_layer.py, in a fresh
process (``XLA_FLAGS=--xla_force_host_platform_device_count=2`` must be set before
JAX starts). Runs fit and ``initialize``, each distributed and on one device, and prints
one line ``RESULT <json>`` of the four results.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 KERAS_BACKEND=jax \\
        python tests/backends/data_parallel.py
"""

import json
import sys

import jax
import keras
import numpy as np

import tf_actnorm


def batches():
    """One global batch whose halves (one per device) have very different statistics,
    so an init from one shard, or an average of per-shard statistics, cannot pass."""
    rng = np.random.default_rng(0)
    first = rng.normal([5.0, -1.0, 0.5], [1.0, 0.5, 2.0], (4, 2, 3))
    second = rng.normal([-5.0, 3.0, 0.0], [3.0, 0.5, 0.1], (4, 2, 3))
    x = np.concatenate([first, second]).astype("float32")
    later = rng.normal(50.0, 10.0, (8, 2, 3)).astype("float32")  # must not re-initialise
    return np.concatenate([x, later])


def run(distributed):
    devices = keras.distribution.list_devices("cpu")
    if distributed:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2, 3)), tf_actnorm.ActNorm(name="an"),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=True)
    x = batches()
    model.fit(x, np.zeros((len(x), 1), "float32"), batch_size=8, epochs=1, shuffle=False, verbose=0)
    layer = model.get_layer("an")
    keras.distribution.set_distribution(None)
    return {
        "devices": len(devices),
        "sharding_devices": len(layer.initial_bias.value.sharding.device_set),
        "bias": np.asarray(layer.bias).tolist(),
        "log_scale": np.asarray(layer.log_scale).tolist(),
        "initialized": bool(np.asarray(layer.initialized)),
        "x": x[:8].tolist(),
    }


def run_initialize(distributed):
    """``tf_actnorm.initialize`` streaming (one batch at a time, compiled passes) over
    batches whose halves differ: the statistics of all of them."""
    from tf_actnorm import init

    init._MERGE_BYTES = 1
    devices = keras.distribution.list_devices("cpu")
    if distributed:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2, 3)), tf_actnorm.ActNorm(name="an"),
                              keras.layers.Flatten(), keras.layers.Dense(3),
                              tf_actnorm.ActNorm(name="an1")])
    x = batches()
    tf_actnorm.initialize(model, [x[:8], x[8:]], verbose=0)
    hidden = model.layers[2](model.layers[1](model.layers[0](x)))
    result = {
        "devices": len(devices),
        "sharding_devices": len(model.get_layer("an").initial_bias.value.sharding.device_set),
        "bias": np.asarray(model.get_layer("an").bias).tolist(),
        "log_scale": np.asarray(model.get_layer("an").log_scale).tolist(),
        "hidden": np.asarray(hidden).tolist(),
        "bias1": np.asarray(model.get_layer("an1").bias).tolist(),
        "log_scale1": np.asarray(model.get_layer("an1").log_scale).tolist(),
        "x": x.tolist(),
    }
    keras.distribution.set_distribution(None)
    return result


if __name__ == "__main__":
    assert keras.backend.backend() == "jax", keras.backend.backend()
    # One process for the four runs: each sets, and then clears, its own distribution.
    print("RESULT " + json.dumps({
        "distributed": run(True), "single": run(False),
        "initialize-distributed": run_initialize(True), "initialize": run_initialize(False)}))
    print("jax", jax.__version__, file=sys.stderr)
