"""The Glow-like flow of the ``initialize`` rows, in ``keras.ops`` so that the same model
runs on every Keras backend (``rows_init.py`` on TensorFlow, ``init_rows.py`` on JAX).

It is examples/glow_digits.py's multi-scale flow on [8, 8, 1] images, deeper: two levels
of ``steps`` flow steps, each ActNorm -> invertible 1x1 convolution (LU-decomposed) ->
affine coupling whose network holds two ActNorm layers (3 ActNorm layers a step). The
model returns each example's log-likelihood under a standard normal prior.
"""

import keras
import numpy as np
import scipy.linalg
from keras import ops

import tf_actnorm


def space_to_depth(x):
    """``tf.nn.space_to_depth(x, 2)``: [B, H, W, C] -> [B, H/2, W/2, 4C]."""
    _, h, w, c = x.shape
    x = ops.reshape(x, (-1, h // 2, 2, w // 2, 2, c))
    return ops.reshape(ops.transpose(x, (0, 1, 3, 2, 4, 5)), (-1, h // 2, w // 2, 4 * c))


class Conv1x1(keras.layers.Layer):
    """Glow's invertible 1x1 convolution, LU-decomposed (as in examples/glow_digits.py)."""

    def build(self, input_shape):
        c = input_shape[-1]
        rotation = np.linalg.qr(np.random.default_rng(c).normal(size=(c, c)))[0]
        p, lower, upper = scipy.linalg.lu(rotation)
        s = np.diag(upper)
        self.p, self.sign_s = p.astype("float32"), np.sign(s).astype("float32")
        self.mask = np.tril(np.ones((c, c), "float32"), -1)
        constant = keras.initializers.Constant
        self.lower = self.add_weight(shape=(c, c), initializer=constant(lower))
        self.upper = self.add_weight(shape=(c, c), initializer=constant(np.triu(upper, 1)))
        self.log_s = self.add_weight(shape=(c,), initializer=constant(np.log(np.abs(s))))

    def call(self, x):
        lower = self.lower * self.mask + ops.eye(self.mask.shape[0])
        upper = self.upper * self.mask.T + ops.diag(self.sign_s * ops.exp(self.log_s))
        kernel = ops.matmul(ops.matmul(self.p, lower), upper)
        positions = float(x.shape[1] * x.shape[2])
        return ops.matmul(x, kernel), positions * ops.sum(self.log_s)


class FlowStep(keras.layers.Layer):
    """ActNorm -> 1x1 convolution -> affine coupling; returns ``(y, log_det)``."""

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


class GlowLike(keras.Model):
    """Two levels of ``steps`` flow steps on [8, 8, 1] images (subclassed)."""

    def __init__(self, steps, hidden):
        super().__init__()
        self.levels = [[FlowStep(hidden) for _ in range(steps)] for _ in range(2)]

    def call(self, x, training=None):
        h, log_det, latents = space_to_depth(x), 0.0, []
        for i, level in enumerate(self.levels):
            if i:
                z, h = ops.split(h, 2, axis=-1)
                latents.append(z)
                h = space_to_depth(h)
            for step in level:
                h, step_log_det = step(h, training=training)
                log_det = log_det + step_log_det
        latents.append(h)
        log_prior = sum(ops.sum(-0.5 * z ** 2, axis=(1, 2, 3)) for z in latents)
        return log_prior + log_det
