"""Speed rows: forward, train step, ``model.fit``, log-det and first call.

* Forward (group ``forward``): ActNorm against the bare op ``x * s + c`` (``s``,
  ``c``: [C] variables) under the same ``tf.function``/XLA settings: the layer with
  ``training=False``, the layer with ``training=True`` once initialised (the steady
  state of training, where the "init once" guard is still in the graph) and
  ``ActNormBijector.forward`` (guard included). TFP's glow
  ``ActivationNormalization.forward`` (also guarded) is compared with
  ``ActNormBijector.forward``.
* Train step (``train``): ``Conv2D(64, 3, same) -> norm`` on ``[32, 32, 32, 64]``,
  loss ``mean(y**2)``, ``GradientTape`` gradients and a Keras SGD update, in one
  ``tf.function``. Baselines: the same with ``BatchNormalization``, with a
  plain-autodiff affine layer of the same math (``exp(log_scale) * (x + bias)``, no
  custom gradient), and the Conv2D alone (an "info" row: what the normalisation layer
  adds).
* ``model.fit`` (``fit``): a small CNN (3 conv blocks with ActNorm or
  BatchNormalization, then global pooling and a dense softmax), examples/s over whole
  epochs after a warm-up epoch, epochs of the two models interleaved. "auto" is
  Keras' default ``jit_compile`` (XLA where Keras can), "graph" is
  ``jit_compile=False``.
* Log-det (``log-det``): ``forward_log_det_jacobian`` of the layer and of the
  bijector (with ``event_ndims=3``, an image event) on ``[4, H, W, 8]`` inputs,
  H = W = 128 and 512 (``--quick``: 128 and 256), each against H = W = 16.
* First call (``first``): the time of the call that initialises (``training=True``
  after ``reset_initialization()``, same traced function) against the next, steady,
  call.

Timings as described in ``timing.py``.
"""

import statistics
import time

import keras
import numpy as np
import tensorflow as tf
from tensorflow_probability.python.bijectors import glow

import tf_actnorm
from benchmarks import models
from benchmarks.report import ms, us
from benchmarks.timing import MODES, compare_times, sync


def forward_rows(table, args):
    shapes = {"4d": (32, 64, 64, 64), "5d": (4, 8, 32, 32, 64)}
    if args.quick:
        shapes = {"4d": (8, 32, 32, 64), "5d": (2, 4, 16, 16, 64)}
    for key, shape in shapes.items():
        channels = shape[-1]
        x = tf.random.normal(shape, seed=1) * 2.0 + 0.5
        s = tf.Variable(tf.random.uniform([channels], 0.5, 2.0, seed=2))
        c = tf.Variable(tf.random.normal([channels], seed=3))
        layer = tf_actnorm.ActNorm()
        layer(x, training=True)  # initialises
        bijector = tf_actnorm.ActNormBijector(channels)
        bijector.forward(x)
        reference = glow.ActivationNormalization(channels)
        reference.forward(x)
        for mode, jit in MODES:
            fns = {
                "bare": tf.function(lambda x: x * s + c, jit_compile=jit),
                "layer(training=False)": tf.function(
                    lambda x: layer(x, training=False), jit_compile=jit),
                "layer(training=True)": tf.function(
                    lambda x: layer(x, training=True), jit_compile=jit),
                # Closures, as for the bare op: a bound method of a bijector (a
                # CompositeTensor) would make tf.function flatten it on every call.
                "bijector": tf.function(lambda x: bijector.forward(x), jit_compile=jit),
                "tfp-glow": tf.function(lambda x: reference.forward(x), jit_compile=jit),
            }
            for cand, base, target in (("layer(training=False)", "bare", 1.05),
                                       ("layer(training=True)", "bare", 1.05),
                                       ("bijector", "bare", 1.05),
                                       ("bijector", "tfp-glow", 1.00)):
                tc, tb, ratio = compare_times(
                    lambda: fns[cand](x), lambda: fns[base](x), args)
                table.add(f"forward {key}/{mode}/{cand} vs {base}", ms(tc), ms(tb), ratio,
                          target, note=f"x {list(shape)} f32")
        assert bool(layer.initialized.numpy())


def train_step_rows(table, args):
    shape = (8, 16, 16, 64) if args.quick else (32, 32, 32, 64)
    x = tf.random.normal(shape, seed=4) * 2.0 + 0.5
    for mode, jit in MODES:
        steps = {norm: models.train_step(models.conv_model(norm, shape), jit)
                 for norm in ("actnorm", "batchnorm", "plain", "none")}
        for base, key, target in (("batchnorm", "Conv2D+BatchNorm", 1.00),
                                  ("plain", "Conv2D+plain affine", 1.05),
                                  ("none", "Conv2D alone", None)):
            tc, tb, ratio = compare_times(
                lambda: steps["actnorm"](x), lambda: steps[base](x), args)
            table.add(f"train step/{mode}/Conv2D+ActNorm vs {key}", ms(tc), ms(tb), ratio,
                      target, note=f"x {list(shape)} f32; forward+backward+SGD")


class _EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.start


def fit_rows(table, args):
    size, examples, batch = (16, 256, 32) if args.quick else (32, 2048, 64)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(examples, size, size, 3)).astype("float32")
    labels = rng.integers(0, 10, size=examples)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch).cache()
    rounds = max(3, args.repeats // 3)
    for mode, jit in (("auto", "auto"), ("graph", False)):
        cnns = {}
        for norm in ("actnorm", "batchnorm"):
            model = models.small_cnn(norm, size)
            model.compile(optimizer=keras.optimizers.SGD(0.01),
                          loss="sparse_categorical_crossentropy", jit_compile=jit)
            # Warm-up: tracing, compiling, ActNorm's initialisation.
            model.fit(data, epochs=1, verbose=0, shuffle=False)
            cnns[norm] = model
        rates = {"actnorm": [], "batchnorm": []}
        ratios = []
        for i in range(rounds):
            order = ("actnorm", "batchnorm") if i % 2 == 0 else ("batchnorm", "actnorm")
            this = {}
            for norm in order:
                timer = _EpochTimer()
                cnns[norm].fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
                this[norm] = examples / timer.seconds
                rates[norm].append(this[norm])
            ratios.append(this["actnorm"] / this["batchnorm"])
        table.add(f"fit/{mode}/ActNorm CNN vs BatchNorm CNN",
                  f"{statistics.median(rates['actnorm']):.0f} ex/s",
                  f"{statistics.median(rates['batchnorm']):.0f} ex/s",
                  statistics.median(ratios), 1.00, higher_is_better=True,
                  note=f"{size}x{size}x3, batch {batch}, {examples} ex/epoch, {rounds} epochs each")


def log_det_rows(table, args):
    sizes = {"large": 128, "largest": 256} if args.quick else {"large": 128, "largest": 512}
    channels = 8
    layer = tf_actnorm.ActNorm()
    layer(tf.random.normal([4, 16, 16, channels]))
    bijector = tf_actnorm.ActNormBijector(channels)
    bijector.forward(tf.random.normal([4, 16, 16, channels]))
    fns = {
        "layer": tf.function(lambda x: layer.forward_log_det_jacobian(x)),
        "bijector": tf.function(lambda x: bijector.forward_log_det_jacobian(x, event_ndims=3)),
    }
    small = tf.random.normal([4, 16, 16, channels])
    for kind, fn in fns.items():
        for key, hw in sizes.items():
            big = tf.random.normal([4, hw, hw, channels])
            tc, tb, ratio = compare_times(lambda: fn(big), lambda: fn(small), args)
            table.add(f"log-det/{kind}/{key}", us(tc), us(tb), ratio, 1.2,
                      note=f"H·W = {hw}² vs 16² ([4, H, W, {channels}])")


def first_call_rows(table, args):
    shapes = {"4d": (32, 64, 64, 64), "5d": (4, 8, 32, 32, 64)}
    if args.quick:
        shapes = {"4d": (8, 32, 32, 64), "5d": (2, 4, 16, 16, 64)}
    for key, shape in shapes.items():
        x = tf.random.normal(shape, seed=5) * 3.0 + 2.0
        for mode, jit in MODES:
            layer = tf_actnorm.ActNorm()
            layer(x, training=False)  # builds, does not initialise
            fn = tf.function(lambda x: layer(x, training=True), jit_compile=jit)
            for _ in range(3):  # warm-up, initialising and steady
                layer.reset_initialization()
                fn(x)
                fn(x)
            sync()
            first, steady, ratios = [], [], []
            for _ in range(max(5, args.repeats)):
                layer.reset_initialization()
                start = time.perf_counter()
                fn(x)
                sync()
                mid = time.perf_counter()
                fn(x)
                sync()
                end = time.perf_counter()
                first.append(mid - start)
                steady.append(end - mid)
                ratios.append((mid - start) / (end - mid))
            assert bool(layer.initialized.numpy())
            table.add(f"first call/{mode}/{key}", ms(statistics.median(first)),
                      ms(statistics.median(steady)), statistics.median(ratios), 3.0,
                      note=f"layer(x, training=True), x {list(shape)} f32")
