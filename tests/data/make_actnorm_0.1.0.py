"""Writes the fixture tests/data/actnorm_0.1.0.{keras,npz}: a model saved by tf_actnorm 0.1.0,
whose ActNorm had three weights (bias, log_scale, initialized), with its outputs on new data.

Made with the code of commit 1285ee1 (before the residual layout), TensorFlow backend:

    git archive 1285ee1 tf_actnorm | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/data/make_actnorm_0.1.0.py tests/data/actnorm_0.1.0
"""

import sys

import keras
import numpy as np

import tf_actnorm

out = sys.argv[1]
keras.utils.set_random_seed(3)
rng = np.random.default_rng(3)
model = keras.Sequential([keras.Input((4, 3)), tf_actnorm.ActNorm(name="an"),
                          keras.layers.Dense(2, name="dense")], name="old")
x = (rng.normal(size=(16, 4, 3)) * [1, 2, 3] + [3, -1, 2]).astype("float32")
model(x, training=True)
layer = model.get_layer("an")
layer.bias.assign(layer.bias + [0.1, -0.2, 0.3])  # as training would move them
layer.log_scale.assign(layer.log_scale + [0.05, 0.0, -0.05])
assert [w.name for w in layer.weights] == ["bias", "log_scale", "initialized"]
model.save(out + ".keras")
new = (rng.normal(size=(5, 4, 3)) * 4 - 1).astype("float32")
np.savez(out + ".npz", x=new, y=model(new, training=False).numpy(),
         bias=layer.bias.numpy(), log_scale=layer.log_scale.numpy())
