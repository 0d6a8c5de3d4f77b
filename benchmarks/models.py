"""The models the benchmark rows run, built the same way for candidate and baseline
(``keras.utils.set_random_seed(0)`` first, so both start from the same weights).

* ``conv_model`` / ``train_step``: ``Conv2D(C, 3, same) -> norm`` (ActNorm,
  BatchNormalization, ``PlainAffine`` or none) and its train step: loss
  ``mean(y**2)``, ``GradientTape`` gradients and a Keras SGD update in one
  ``tf.function``.
* ``small_cnn``: 3 conv blocks (Conv2D -> ActNorm or BatchNormalization -> ReLU),
  global pooling and a dense softmax, for ``model.fit``.
* ``conv_norm_conv`` and ``glow_step``: ``(loss_fn, variables)`` of networks whose
  saved activations the memory rows read.
* ``GlowLike`` (from ``glow_model.py``) / ``flow_train_step`` and ``dense_model``: the models that
  ``tf_actnorm.initialize`` is timed on.
"""

import keras
import numpy as np
import tensorflow as tf
from tensorflow_probability.python.bijectors import glow

import tf_actnorm
from benchmarks.glow_model import GlowLike  # noqa: F401 (the rows' Glow-like flow)


class PlainAffine(keras.layers.Layer):
    """``exp(log_scale) * (x + bias)`` differentiated by TensorFlow: ActNorm's math with
    no custom gradient and no data-dependent initialisation (a baseline)."""

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros")
        self.log_scale = self.add_weight(shape=(input_shape[-1],), initializer="zeros")

    def call(self, x):
        return tf.exp(self.log_scale) * (x + self.bias)


def norm_layer(norm):
    """A new normalisation layer: "actnorm", "batchnorm" or "plain" (``PlainAffine``)."""
    return {"actnorm": tf_actnorm.ActNorm, "batchnorm": keras.layers.BatchNormalization,
            "plain": PlainAffine}[norm]()


def conv_model(norm, shape):
    """``Conv2D(C, 3, same) -> norm`` for inputs of ``shape`` (norm "none": the Conv2D
    alone)."""
    keras.utils.set_random_seed(0)
    layers = [keras.Input(shape[1:]), keras.layers.Conv2D(shape[-1], 3, padding="same")]
    if norm != "none":
        layers.append(norm_layer(norm))
    return keras.Sequential(layers)


def train_step(model, jit):
    """One ``tf.function`` (``jit_compile=jit``): loss ``mean(model(x)**2)``, its
    ``GradientTape`` gradients and an SGD update; returns the loss."""
    optimizer = keras.optimizers.SGD(1e-3)
    optimizer.build(model.trainable_variables)

    def step(x):
        with tf.GradientTape() as tape:
            y = model(x, training=True)
            loss = tf.reduce_mean(tf.square(y))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    return tf.function(step, jit_compile=jit)


def small_cnn(norm, size):
    """3 conv blocks with ActNorm ("actnorm") or BatchNormalization, global average
    pooling and a dense softmax over 10 classes, on ``[size, size, 3]`` images."""
    keras.utils.set_random_seed(0)
    layers = [keras.Input((size, size, 3))]
    for filters, strides in ((32, 1), (64, 2), (64, 2)):
        layers.append(keras.layers.Conv2D(filters, 3, strides=strides, padding="same"))
        layers.append(tf_actnorm.ActNorm() if norm == "actnorm"
                      else keras.layers.BatchNormalization())
        layers.append(keras.layers.ReLU())
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")]
    return keras.Sequential(layers)


class BijectorLayer(keras.layers.Layer):
    """A bijector's ``forward`` as a layer (its variables are passed to the tape)."""

    def __init__(self, bijector, **kwargs):
        super().__init__(**kwargs)
        self.inner = bijector

    def call(self, x, training=None):
        return self.inner.forward(x)


def conv_norm_conv(norm, x):
    """``Conv2D -> norm -> Conv2D`` (the norm's output feeds a layer that keeps it for
    its own weight gradient): ``(loss_fn, variables)`` of ``mean(out**2)``.

    ``norm``: "actnorm", "batchnorm", "plain", "bijector" (``ActNormBijector``),
    "tfp-glow" (TFP's glow ``ActivationNormalization``) or "none".
    """
    keras.utils.set_random_seed(0)
    channels = x.shape[-1]
    first, second = (keras.layers.Conv2D(channels, 3, padding="same") for _ in range(2))
    bijector = {"bijector": lambda: tf_actnorm.ActNormBijector(channels),
                "tfp-glow": lambda: glow.ActivationNormalization(channels)}.get(norm)
    layers = [first, second]
    if bijector is not None:
        layers.insert(1, BijectorLayer(bijector()))
    elif norm != "none":
        layers.insert(1, norm_layer(norm))
    model = keras.Sequential(layers)
    model(x, training=True)  # builds and initialises
    variables = list(model.trainable_variables)
    if bijector is not None:
        variables += list(layers[1].inner.trainable_variables)
    return lambda x: tf.reduce_mean(tf.square(model(x, training=True))), variables


class GlowStep(keras.layers.Layer):
    """One Glow step: [ActNorm ->] invertible 1x1 convolution -> affine coupling.

    Returns ``(z, log_det)``; the coupling's network is ``Conv2D(hidden, 3) -> ReLU ->
    Conv2D(C, 3)`` on the first half of the channels, giving ``log s`` and ``t`` for the
    second half (``s = sigmoid(log s + 2)``, as in Glow).
    """

    def __init__(self, actnorm, hidden, **kwargs):
        super().__init__(**kwargs)
        self.actnorm = tf_actnorm.ActNorm() if actnorm else None
        self.hidden = hidden

    def build(self, input_shape):
        channels = input_shape[-1]
        self.mix = self.add_weight(shape=(channels, channels), initializer="orthogonal")
        self.net = keras.Sequential([
            keras.layers.Conv2D(self.hidden, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(channels, 3, padding="same", kernel_initializer="zeros")])
        if self.actnorm is not None:
            self.actnorm.build(input_shape)

    def call(self, x, training=None):
        log_det = 0.0
        if self.actnorm is not None:
            log_det += self.actnorm.forward_log_det_jacobian(x)
            x = self.actnorm(x, training=training)
        positions = tf.cast(tf.reduce_prod(tf.shape(x)[1:-1]), x.dtype)
        x = tf.einsum("bhwc,cd->bhwd", x, self.mix)
        log_det += positions * tf.linalg.slogdet(self.mix)[1]
        xa, xb = tf.split(x, 2, axis=-1)
        log_s, shift = tf.split(self.net(xa), 2, axis=-1)
        scale = tf.sigmoid(log_s + 2.0)
        log_det += tf.reduce_sum(tf.math.log(scale), [1, 2, 3])
        return tf.concat([xa, (xb + shift) * scale], -1), log_det


def glow_step(actnorm, x):
    """A ``GlowStep`` (with or without ActNorm) built on ``x``: ``(loss_fn, variables)``
    of its negative log-likelihood per dimension (standard normal prior)."""
    keras.utils.set_random_seed(0)
    step = GlowStep(actnorm, hidden=x.shape[-1])
    step(x, training=True)  # builds and initialises

    def loss_fn(x):
        z, log_det = step(x, training=True)
        return 0.5 * tf.reduce_mean(tf.square(z)) - tf.reduce_mean(log_det) / x.shape[1:].num_elements()

    return loss_fn, step.trainable_variables


def flow_train_step(model):
    """As examples/glow_digits.py: Adam on the negative log-likelihood."""
    optimizer = keras.optimizers.Adam(1e-4)

    @tf.function  # Keras' default on CPU ("auto": no XLA); XLA compiles for ~1 minute here
    def step(x):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def dense_model(width, depth):
    """``depth`` blocks of ActNorm -> Dense(width, tanh), then ActNorm -> Dense(1)."""
    keras.utils.set_random_seed(0)
    layers = [keras.Input((width,))]
    for _ in range(depth):
        layers += [tf_actnorm.ActNorm(), keras.layers.Dense(width, activation="tanh")]
    return keras.Sequential(layers + [tf_actnorm.ActNorm(), keras.layers.Dense(1)])
