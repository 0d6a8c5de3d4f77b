"""Run with ``KERAS_BACKEND=jax`` (TensorFlow installed beside JAX) by test_deploy.py: train
a small model on JAX, export it with ``model.export(format="tf_saved_model")`` (after
checking that the export of an uninitialised one is refused), and write its inputs and
JAX outputs. Prints one line ``RESULT <json>``.

    KERAS_BACKEND=jax python tests/jax_saved_model.py OUT_DIR
"""

import json
import os
import sys

import keras
import numpy as np

import tf_actnorm


def main(out):
    assert keras.backend.backend() == "jax", keras.backend.backend()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 4, 3)) * [1.0, 3.0, 0.5] + [4.0, -2.0, 10.0]).astype("float32")
    model = keras.Sequential([keras.Input((4, 3)), tf_actnorm.ActNorm(name="an"),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    try:
        model.export(os.path.join(out, "uninitialised"), format="tf_saved_model", verbose=False)
        refused = None
    except ValueError as error:
        refused = str(error)
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=True)
    model.fit(x, x[:, 0, :2], batch_size=16, epochs=2, verbose=0)
    model.export(os.path.join(out, "saved_model"), format="tf_saved_model", verbose=False)
    new = (rng.normal(size=(5, 4, 3)) * 2.0 + 1.0).astype("float32")
    np.savez(os.path.join(out, "io.npz"), x=new, y=np.asarray(model.predict(new, verbose=0)))
    return {"refused": refused,
            "initialized": bool(np.asarray(model.get_layer("an").initialized))}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])))
