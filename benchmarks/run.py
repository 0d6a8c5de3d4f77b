"""ActNorm benchmarks (issue 8): does ActNorm cost nothing over a bare affine op, and
does it beat the alternatives?

Usage::

    python benchmarks/run.py            # full sizes (about 1.5 minutes on a 2-core CPU)
    python benchmarks/run.py --quick    # small sizes, fewer repeats (well under a minute)
    python benchmarks/run.py --only forward --repeats 31

Prints the machine, then one markdown table row per comparison: the candidate's and
the baseline's measurement, their ratio, the target and PASS/FAIL ("info" rows have
no target). Exits 0 whatever the outcome; pass/fail is for people to read.

How it measures
---------------
* Timings: every function is a ``tf.function`` (XLA rows: ``jit_compile=True``;
  "graph" rows: ``jit_compile=False``), traced and run a few times first (warm-up).
  Then, ``--repeats`` rounds: each round times the candidate and the baseline back to
  back (the order alternates between rounds), each over enough calls to last
  ~50 ms (5 ms with ``--quick``). The table shows the median time of each, and the
  ratio is the median of the per-round ratios, so that load from other processes,
  which drifts over seconds, hits both sides of a ratio alike. On a GPU each timing
  ends with a device synchronisation. Two identical functions timed this way
  (an A/A test) give ratios within about ±1% on a 2-core CPU shared with other jobs:
  that is the resolution of the ratios.
* Forward rows compare ActNorm with the bare op ``x * s + c`` (``s``, ``c``: [C]
  variables) under the same ``tf.function``/XLA settings: the layer with
  ``training=False``, the layer with ``training=True`` once initialised (the
  steady state of training, where the "init once" guard is still in the graph) and
  ``ActNormBijector.forward`` (guard included). TFP's glow
  ``ActivationNormalization.forward`` (also guarded) is compared with
  ``ActNormBijector.forward``.
* Train step: ``Conv2D(64, 3, same) -> norm`` on ``[32, 32, 32, 64]``, loss
  ``mean(y**2)``, ``GradientTape`` gradients and a Keras SGD update, in one
  ``tf.function``. Baselines: the same with ``BatchNormalization``, with a
  plain-autodiff affine layer of the same math (``exp(log_scale) * (x + bias)``, no
  custom gradient), and the Conv2D alone (an "info" row: what the normalisation
  layer adds).
* ``model.fit``: a small CNN (3 conv blocks with ActNorm or BatchNormalization, then
  global pooling and a dense softmax), examples/s over whole epochs after a warm-up
  epoch, epochs of the two models interleaved. "auto" is Keras' default
  ``jit_compile`` (XLA where Keras can), "graph" is ``jit_compile=False``.
* Log-det: ``forward_log_det_jacobian`` of the layer and of the bijector (with
  ``event_ndims=3``, an image event) on ``[4, H, W, 8]`` inputs, H = W = 128 and 512
  (``--quick``: 128 and 256), each against H = W = 16.
* First call: the time of the call that initialises (``training=True`` after
  ``reset_initialization()``, same traced function) against the next, steady, call.
* Peak memory of a train step: on a GPU, ``tf.config.experimental``'s peak bytes
  allocated during one step (after warm-up), above what was allocated before it. On
  a CPU TensorFlow keeps no allocator statistics (``get_memory_info("CPU:0")`` reads
  0), so the proxy is the bytes that the forward pass must keep alive until the
  backward pass, read off the traced graph of loss and gradients: forward ops are the
  data-flow ancestors of the loss, backward ops those of the gradients less the
  forward ones, and every forward tensor read by a backward op counts once (views such
  as Reshape/Identity resolved to the tensor they view; constants and variables, i.e.
  the weights, not counted). These saved activations are what grows a train step's
  peak over the weights; the backward pass's own short-lived temporaries are not
  counted. The row's note gives the Conv2D alone, for the layers' own share.
* Saved activations (the same proxy, or the GPU peak): ``Conv2D -> norm -> Conv2D``
  on ``[16, 32, 32, 32]`` (the norm's output is the second convolution's input, which
  that convolution keeps for its weight gradient), ActNorm and ``ActNormBijector``
  against no norm (BatchNormalization and TFP's glow ActNorm in the note), and a Glow
  step (ActNorm -> invertible 1x1 convolution -> affine coupling, loss with the
  log-determinants) with and without ActNorm. "xla" rows trace the step with
  ``jit_compile=True``: the graph that XLA compiles, read the same way.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Measure this checkout's tf_actnorm, not whichever copy is installed; `pairing` lies
# beside this file (also when it is loaded as a module, as tests/test_benchmarks.py does).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

import keras  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402
from tensorflow_probability.python.bijectors import glow  # noqa: E402

import pairing  # noqa: E402 (beside this script)
import tf_actnorm  # noqa: E402

MODES = (("xla", True), ("graph", False))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Printed by benchmarks/jax_rows.py (JAX backend, jax.jit) in the TensorFlow-free
# environment of tests/test_backends.py; targets: forward <= 1.05x, train step <= 1.00x.
JAX_PYTHON = os.environ.get("TF_ACTNORM_JAX_PYTHON",
                            os.path.join(ROOT, ".venv-backends", "bin", "python"))
JAX_ROWS = [
    "jax/forward 4d/jit/layer(training=False) vs bare",
    "jax/forward 4d/jit/layer(training=True) vs bare",
    "jax/train step/jit/Conv2D+ActNorm vs Conv2D+BatchNorm",
    "jax/train step/jit/Conv2D+ActNorm vs Conv2D alone",
]

# Every row the script prints, by id (the test checks that each is printed).
ROWS = (
    [f"forward {shape}/{mode}/{cand} vs {base}"
     for shape in ("4d", "5d") for mode, _ in MODES
     for cand, base in (("layer(training=False)", "bare"), ("layer(training=True)", "bare"),
                        ("bijector", "bare"), ("bijector", "tfp-glow"))]
    + [f"train step/{mode}/Conv2D+ActNorm vs {base}" for mode, _ in MODES
       for base in ("Conv2D+BatchNorm", "Conv2D+plain affine", "Conv2D alone")]
    + [f"fit/{mode}/ActNorm CNN vs BatchNorm CNN" for mode in ("auto", "graph")]
    + [f"log-det/{kind}/{hw}" for kind in ("layer", "bijector") for hw in ("large", "largest")]
    + [f"first call/{mode}/{shape}" for shape in ("4d", "5d") for mode, _ in MODES]
    + ["peak memory/train step/Conv2D+ActNorm vs Conv2D+BatchNorm"]
    + [f"peak memory/Conv2D-norm-Conv2D/{mode}/{key} vs no norm" for mode, _ in MODES
       for key in ("ActNorm", "ActNormBijector")]
    + [f"peak memory/Glow step/{mode}/with ActNorm vs without" for mode, _ in MODES]
    + ["init/glow/initialize(steps=16) vs 16 train steps",
       "init/glow/initialize(steps=128) vs 128 train steps",
       "init/dense/initialize vs train steps, same batches",
       "init/dense/peak RSS growth vs data size"]
    + JAX_ROWS
)


# ----------------------------------------------------------------------------- timing


def _sync():
    if _GPU:
        tf.test.experimental.sync_devices()


def compare_times(candidate, baseline, repeats, warmup=3, target_s=None):
    """(median candidate s, median baseline s, median of per-round ratios); see
    ``pairing.compare_times``."""
    target_s = _SAMPLE_S if target_s is None else target_s
    return pairing.compare_times(candidate, baseline, repeats, target_s,
                                 sync=lambda out: _sync(), warmup=warmup)


# ----------------------------------------------------------------------------- report


class Table:
    def __init__(self):
        self.rows = []

    def add(self, row_id, candidate, baseline, ratio, target, higher_is_better=False, note=""):
        if target is None:
            verdict, target_text = "info", "—"
        elif higher_is_better:
            verdict, target_text = ("PASS" if ratio >= target else "FAIL"), f"≥ {target:.2f}×"
        else:
            verdict, target_text = ("PASS" if ratio <= target else "FAIL"), f"≤ {target:.2f}×"
        row = (row_id, candidate, baseline, f"{ratio:.3f}×", target_text, verdict, note)
        self.rows.append(row)
        print("| " + " | ".join(row) + " |", flush=True)

    def add_cells(self, cells):
        """A row measured elsewhere (benchmarks/jax_rows.py), already formatted."""
        self.rows.append(tuple(cells))
        print("| " + " | ".join(cells) + " |", flush=True)

    @staticmethod
    def header():
        print("| row | candidate | baseline | ratio | target | result | notes |")
        print("|---|---:|---:|---:|---:|:---:|---|", flush=True)


def _ms(seconds):
    return f"{seconds * 1e3:.3f} ms"


def _us(seconds):
    return f"{seconds * 1e6:.1f} µs"


def _mib(nbytes):
    return f"{nbytes / 2**20:.2f} MiB"


# ----------------------------------------------------------------------------- rows


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
                    lambda: fns[cand](x), lambda: fns[base](x), args.repeats)
                table.add(f"forward {key}/{mode}/{cand} vs {base}", _ms(tc), _ms(tb), ratio,
                          target, note=f"x {list(shape)} f32")
        assert bool(layer.initialized.numpy())


class PlainAffine(keras.layers.Layer):
    """``exp(log_scale) * (x + bias)`` differentiated by TensorFlow: ActNorm's math with
    no custom gradient and no data-dependent initialisation (a baseline)."""

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros")
        self.log_scale = self.add_weight(shape=(input_shape[-1],), initializer="zeros")

    def call(self, x):
        return tf.exp(self.log_scale) * (x + self.bias)


def _norm_layer(norm):
    return {"actnorm": tf_actnorm.ActNorm, "batchnorm": keras.layers.BatchNormalization,
            "plain": PlainAffine}[norm]()


def _conv_model(norm, shape):
    keras.utils.set_random_seed(0)
    layers = [keras.Input(shape[1:]), keras.layers.Conv2D(shape[-1], 3, padding="same")]
    if norm != "none":
        layers.append(_norm_layer(norm))
    return keras.Sequential(layers)


def _train_step(model, jit):
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


def train_step_rows(table, args):
    shape = (8, 16, 16, 64) if args.quick else (32, 32, 32, 64)
    x = tf.random.normal(shape, seed=4) * 2.0 + 0.5
    for mode, jit in MODES:
        steps = {norm: _train_step(_conv_model(norm, shape), jit)
                 for norm in ("actnorm", "batchnorm", "plain", "none")}
        for base, key, target in (("batchnorm", "Conv2D+BatchNorm", 1.00),
                                  ("plain", "Conv2D+plain affine", 1.05),
                                  ("none", "Conv2D alone", None)):
            tc, tb, ratio = compare_times(
                lambda: steps["actnorm"](x), lambda: steps[base](x), args.repeats)
            table.add(f"train step/{mode}/Conv2D+ActNorm vs {key}", _ms(tc), _ms(tb), ratio,
                      target, note=f"x {list(shape)} f32; forward+backward+SGD")


def _small_cnn(norm, size):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((size, size, 3))]
    for filters, strides in ((32, 1), (64, 2), (64, 2)):
        layers.append(keras.layers.Conv2D(filters, 3, strides=strides, padding="same"))
        layers.append(tf_actnorm.ActNorm() if norm == "actnorm"
                      else keras.layers.BatchNormalization())
        layers.append(keras.layers.ReLU())
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")]
    return keras.Sequential(layers)


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
        models = {}
        for norm in ("actnorm", "batchnorm"):
            model = _small_cnn(norm, size)
            model.compile(optimizer=keras.optimizers.SGD(0.01),
                          loss="sparse_categorical_crossentropy", jit_compile=jit)
            # Warm-up: tracing, compiling, ActNorm's initialisation.
            model.fit(data, epochs=1, verbose=0, shuffle=False)
            models[norm] = model
        rates = {"actnorm": [], "batchnorm": []}
        ratios = []
        for i in range(rounds):
            order = ("actnorm", "batchnorm") if i % 2 == 0 else ("batchnorm", "actnorm")
            this = {}
            for norm in order:
                timer = _EpochTimer()
                models[norm].fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
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
            tc, tb, ratio = compare_times(lambda: fn(big), lambda: fn(small), args.repeats)
            table.add(f"log-det/{kind}/{key}", _us(tc), _us(tb), ratio, 1.2,
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
            _sync()
            first, steady, ratios = [], [], []
            for _ in range(max(5, args.repeats)):
                layer.reset_initialization()
                start = time.perf_counter()
                fn(x)
                _sync()
                mid = time.perf_counter()
                fn(x)
                _sync()
                end = time.perf_counter()
                first.append(mid - start)
                steady.append(end - mid)
                ratios.append((mid - start) / (end - mid))
            assert bool(layer.initialized.numpy())
            table.add(f"first call/{mode}/{key}", _ms(statistics.median(first)),
                      _ms(statistics.median(steady)), statistics.median(ratios), 3.0,
                      note=f"layer(x, training=True), x {list(shape)} f32")


# Ops whose output is (a view of) an input: output i views input i for IdentityN,
# input 0 for the others.
_VIEWS = {"Identity", "IdentityN", "Reshape", "Squeeze", "ExpandDims", "Snapshot"}
_NOT_ACTIVATIONS = {"Const", "VarHandleOp", "ReadVariableOp"}


def _loss_and_grads(loss_fn, variables, jit_compile):
    def step(x):
        with tf.GradientTape() as tape:
            loss = loss_fn(x)
        return loss, tape.gradient(loss, variables)

    return tf.function(step, jit_compile=jit_compile)


def saved_for_backward_bytes(loss_fn, variables, x, jit_compile=False):
    """Bytes of the forward tensors that the backward pass of a train step reads.

    Traces ``loss_fn(x)`` and its ``GradientTape`` gradients with respect to
    ``variables`` (with ``jit_compile``: the graph that XLA compiles). Forward ops:
    the data-flow ancestors of the loss; backward ops: those of the gradients, less
    the forward ones. A forward tensor read by a backward op must be kept from the
    forward pass to the backward pass. Views are resolved to what they view;
    constants and variables (the weights) are not counted.
    """
    graph = _loss_and_grads(loss_fn, variables, jit_compile).get_concrete_function(x).graph
    loss, *grads = graph.outputs

    def ancestors(tensors):
        seen, stack = set(), [t.op for t in tensors]
        while stack:
            op = stack.pop()
            if op not in seen:
                seen.add(op)
                stack.extend(t.op for t in op.inputs)
        return seen

    def root(tensor):
        while tensor.op.type in _VIEWS and tensor.op.inputs:
            index = tensor.value_index if tensor.op.type == "IdentityN" else 0
            tensor = tensor.op.inputs[index]
        return tensor

    forward = ancestors([loss])
    backward = ancestors(grads) - forward
    saved = {}
    for op in backward:
        for tensor in op.inputs:
            if tensor.op not in forward:
                continue
            tensor = root(tensor)
            if tensor.op.type in _NOT_ACTIVATIONS or tensor.dtype == tf.resource:
                continue
            if not tensor.shape.is_fully_defined():
                raise ValueError(f"unknown shape of saved tensor {tensor.name}")
            saved[tensor.name] = tensor.shape.num_elements() * tensor.dtype.size
    return sum(saved.values())


def gpu_step_peak_bytes(step, x):
    for _ in range(3):
        step(x)
    _sync()
    device = "GPU:0"
    before = tf.config.experimental.get_memory_info(device)["current"]
    tf.config.experimental.reset_memory_stats(device)
    step(x)
    _sync()
    return tf.config.experimental.get_memory_info(device)["peak"] - before


def memory_rows(table, args):
    shape = (8, 16, 16, 64) if args.quick else (32, 32, 32, 64)
    x = tf.random.normal(shape, seed=6)
    measured = {}
    for norm in ("actnorm", "batchnorm", "none"):
        model = _conv_model(norm, shape)
        if _GPU:
            measured[norm] = gpu_step_peak_bytes(_train_step(model, jit=False), x)
        else:
            measured[norm] = saved_for_backward_bytes(
                lambda x: tf.reduce_mean(tf.square(model(x, training=True))),
                model.trainable_variables, x)
    what = ("GPU peak bytes allocated during one step" if _GPU
            else "CPU proxy: bytes of forward tensors kept for the backward pass")
    table.add("peak memory/train step/Conv2D+ActNorm vs Conv2D+BatchNorm",
              _mib(measured["actnorm"]), _mib(measured["batchnorm"]),
              measured["actnorm"] / measured["batchnorm"], 1.00,
              note=f"{what}; x {list(shape)} f32; bytes: {measured['actnorm']:,} vs "
                   f"{measured['batchnorm']:,}, Conv2D alone {measured['none']:,}")
    saved_activation_rows(table, args)


class _BijectorLayer(keras.layers.Layer):
    """A bijector's ``forward`` as a layer (its variables are passed to the tape)."""

    def __init__(self, bijector, **kwargs):
        super().__init__(**kwargs)
        self.inner = bijector

    def call(self, x, training=None):
        return self.inner.forward(x)


def _conv_norm_conv(norm, x):
    """``Conv2D -> norm -> Conv2D`` (the norm's output feeds a layer that keeps it for
    its own weight gradient): ``(loss_fn, variables)`` of ``mean(out**2)``."""
    keras.utils.set_random_seed(0)
    channels = x.shape[-1]
    first, second = (keras.layers.Conv2D(channels, 3, padding="same") for _ in range(2))
    bijector = {"bijector": lambda: tf_actnorm.ActNormBijector(channels),
                "tfp-glow": lambda: glow.ActivationNormalization(channels)}.get(norm)
    layers = [first, second]
    if bijector is not None:
        layers.insert(1, _BijectorLayer(bijector()))
    elif norm != "none":
        layers.insert(1, _norm_layer(norm))
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


def _glow_step(actnorm, x):
    keras.utils.set_random_seed(0)
    step = GlowStep(actnorm, hidden=x.shape[-1])
    step(x, training=True)  # builds and initialises

    def loss_fn(x):
        z, log_det = step(x, training=True)
        return 0.5 * tf.reduce_mean(tf.square(z)) - tf.reduce_mean(log_det) / x.shape[1:].num_elements()

    return loss_fn, step.trainable_variables


def _activation_bytes(network, x, jit):
    loss_fn, variables = network
    if _GPU:
        step = _loss_and_grads(loss_fn, variables, jit)
        return gpu_step_peak_bytes(step, x)
    return saved_for_backward_bytes(loss_fn, variables, x, jit_compile=jit)


def saved_activation_rows(table, args):
    """ActNorm keeps no activation of its own for backprop (issue 14)."""
    shape = (4, 16, 16, 16) if args.quick else (16, 32, 32, 32)
    x = tf.random.normal(shape, seed=7)
    what = "GPU peak bytes" if _GPU else "CPU proxy"
    for mode, jit in MODES:
        measured = {norm: _activation_bytes(_conv_norm_conv(norm, x), x, jit)
                    for norm in ("none", "actnorm", "bijector", "batchnorm", "tfp-glow")}
        for norm, key in (("actnorm", "ActNorm"), ("bijector", "ActNormBijector")):
            table.add(f"peak memory/Conv2D-norm-Conv2D/{mode}/{key} vs no norm",
                      _mib(measured[norm]), _mib(measured["none"]),
                      measured[norm] / measured["none"], 1.01,
                      note=f"{what}; x {list(shape)} f32; BatchNorm "
                           f"{_mib(measured['batchnorm'])}, TFP glow {_mib(measured['tfp-glow'])}")
        with_norm = _activation_bytes(_glow_step(True, x), x, jit)
        without = _activation_bytes(_glow_step(False, x), x, jit)
        table.add(f"peak memory/Glow step/{mode}/with ActNorm vs without", _mib(with_norm),
                  _mib(without), with_norm / without, 1.01,
                  note=f"{what}; ActNorm -> 1x1 conv -> affine coupling; x {list(shape)} f32")


def jax_rows(table, args):
    """The JAX rows, from benchmarks/jax_rows.py run in the JAX environment; printed as
    "skipped" (with the reason) where that environment does not exist."""
    if not os.path.exists(JAX_PYTHON):
        for row_id in JAX_ROWS:
            table.add_cells((row_id, "—", "—", "—", "—", "skipped",
                             f"no JAX environment at {JAX_PYTHON} (tests/test_backends.py "
                             "creates it)"))
        return
    cmd = [JAX_PYTHON, os.path.join(ROOT, "benchmarks", "jax_rows.py"),
           "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| jax/")]
    for line in rows:
        table.add_cells([c.strip() for c in line.strip().strip("|").split("|")])
    if proc.returncode or len(rows) != len(JAX_ROWS):
        print(f"benchmarks/jax_rows.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


# ----------------------------------------------------------------------------- initialize


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
        lower = self.lower * self.mask + tf.eye(self.mask.shape[0])
        upper = self.upper * self.mask.T + tf.linalg.diag(self.sign_s * tf.exp(self.log_s))
        positions = float(x.shape[1] * x.shape[2])
        return x @ (tf.matmul(self.p, lower) @ upper), positions * tf.reduce_sum(self.log_s)


class FlowStep(keras.layers.Layer):
    """examples/glow_digits.py's flow step: ActNorm -> 1x1 conv -> affine coupling whose
    network has two ActNorm layers."""

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
        y_a, y_b = tf.split(y, 2, axis=-1)
        shift, raw = tf.split(self.net(y_a, training=training), 2, axis=-1)
        scale = tf.sigmoid(raw + 2.0)
        log_det += conv_log_det + tf.reduce_sum(tf.math.log(scale), axis=[1, 2, 3])
        return tf.concat([y_a, (y_b + shift) * scale], axis=-1), log_det


class GlowLike(keras.Model):
    """examples/glow_digits.py's multi-scale flow on [8, 8, 1] (subclassed), deeper:
    ``steps`` flow steps per level, 3 ActNorm layers each."""

    def __init__(self, steps, hidden):
        super().__init__()
        self.levels = [[FlowStep(hidden) for _ in range(steps)] for _ in range(2)]

    def call(self, x, training=None):
        h, log_det, latents = tf.nn.space_to_depth(x, 2), 0.0, []
        for i, level in enumerate(self.levels):
            if i:
                z, h = tf.split(h, 2, axis=-1)
                latents.append(z)
                h = tf.nn.space_to_depth(h, 2)
            for step in level:
                h, step_log_det = step(h, training=training)
                log_det += step_log_det
        latents.append(h)
        log_prior = tf.add_n([tf.reduce_sum(-0.5 * z**2, axis=[1, 2, 3]) for z in latents])
        return log_prior + log_det


def _dense_model(width, depth):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((width,))]
    for _ in range(depth):
        layers += [tf_actnorm.ActNorm(), keras.layers.Dense(width, activation="tanh")]
    return keras.Sequential(layers + [tf_actnorm.ActNorm(), keras.layers.Dense(1)])


def _flow_train_step(model):
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


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _timed_with_peak_rss(fn):
    """(seconds, peak resident memory growth in bytes) of ``fn()``, RSS sampled every 2
    ms from another thread (0 where /proc is missing)."""
    if not os.path.exists("/proc/self/statm"):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start, 0
    peak, stop = [_rss_bytes()], threading.Event()

    def sample():
        while not stop.wait(0.002):
            peak.append(_rss_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
    return seconds, max(peak) - peak[0]


def init_rows(table, args):
    # Glow-like flow: initialize from a fresh (built, uninitialised) model, its traces
    # included, against as many steps of the compiled train step (its tracing not
    # included). steps=16 (256 KiB of images) fits initialize's 1 MiB one-pass
    # budget; steps=128 (2 MiB) streams: one pass per layer over the data.
    steps_per_level, hidden = (1, 8) if args.quick else (5, 64)
    rng = np.random.default_rng(0)
    images = tf.data.Dataset.from_tensor_slices(
        (rng.uniform(size=(128 * 64, 8, 8, 1)) - 0.5).astype("float32")).batch(64).cache()
    x = next(iter(images))
    list(images)  # fills the cache

    def fresh_glow():
        keras.utils.set_random_seed(0)
        model = GlowLike(steps_per_level, hidden)
        model(x, training=False)  # builds; inference never initialises
        return model

    model = fresh_glow()
    layers = sum(isinstance(l, tf_actnorm.ActNorm) for l in model._flatten_layers())
    train = _flow_train_step(model)
    start = time.perf_counter()
    train(x)  # traces and initialises
    compile_s = time.perf_counter() - start
    for _ in range(3):
        train(x)
    _sync()

    def train_seconds(batches):
        times = []
        for _ in range(max(3, args.repeats // 3)):
            start = time.perf_counter()
            for batch in images.take(batches):
                train(batch)
            _sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def init_seconds(batches, rounds):
        times = []
        for _ in range(rounds):  # each from a fresh model: its traces included
            model = fresh_glow()
            start = time.perf_counter()
            tf_actnorm.initialize(model, images, steps=batches, verbose=0)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    for batches, path, rounds in ((16, "one eager pass (data within the 1 MiB budget)", 5),
                                  (128, "streamed: one pass per layer, one traced "
                                        "whole-model function", 3)):
        init_s, train_s = init_seconds(batches, rounds), train_seconds(batches)
        table.add(f"init/glow/initialize(steps={batches}) vs {batches} train steps",
                  f"{init_s:.2f} s", f"{train_s:.3f} s", init_s / train_s, 5.0,
                  note=f"{layers} ActNorm layers, batches [64, 8, 8, 1], hidden {hidden}; {path}; "
                       f"each from a fresh model, tracing included (median of {rounds}); train "
                       f"steps compiled (tf.function, Adam), their tracing ({compile_s:.1f} s) "
                       "not included")

    # Small dense model, many batches made on the fly: throughput and memory.
    batches, shape = (400, (256, 64)) if args.quick else (2000, (256, 64))
    data = tf.data.Dataset.range(batches).map(
        lambda i: tf.random.stateless_normal(shape, tf.stack([i, 0]), mean=1.0, stddev=3.0))
    tf_actnorm.initialize(_dense_model(shape[1], 3), data.take(4), verbose=0)  # warm-up
    model = _dense_model(shape[1], 3)
    layers = sum(isinstance(l, tf_actnorm.ActNorm) for l in model.layers)
    init_s, growth = _timed_with_peak_rss(lambda: tf_actnorm.initialize(model, data, verbose=0))
    train = _train_step(model, jit=True)
    for batch in data.take(3):
        train(batch)
    start = time.perf_counter()
    for batch in data:
        train(batch)
    _sync()
    train_s = time.perf_counter() - start
    data_bytes = batches * int(np.prod(shape)) * 4
    table.add("init/dense/initialize vs train steps, same batches",
              f"{batches * layers / init_s:,.0f} batch·layers/s", f"{batches / train_s:,.0f} steps/s",
              init_s / train_s, 5.0,
              note=f"{batches} batches {list(shape)} f32 made on the fly, {layers} ActNorm layers; "
                   f"{init_s:.2f} s (cold) vs {train_s:.2f} s (XLA, SGD)")
    table.add("init/dense/peak RSS growth vs data size", _mib(growth), _mib(data_bytes),
              growth / data_bytes, 0.5,
              note=f"initialize over {batches} batches: resident memory sampled every 2 ms")


GROUPS = {
    "forward": forward_rows,
    "train": train_step_rows,
    "fit": fit_rows,
    "log-det": log_det_rows,
    "first": first_call_rows,
    "memory": memory_rows,
    "init": init_rows,
    "jax": jax_rows,
}


# ----------------------------------------------------------------------------- main


def _cpu_name():
    """The CPU model as /proc/cpuinfo (and ``lscpu``) name it, with its family and model
    numbers: a virtual machine may report only "AMD EPYC" or "Intel Xeon", and CPU fast
    paths differ between generations."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in info:
        return platform.processor() or platform.machine()
    numbers = [f"{key} {info[key]}" for key in ("cpu family", "model") if key in info]
    return info["model name"] + (f" ({', '.join(numbers)})" if numbers else "")


def device_description():
    parts = [f"CPU: {_cpu_name()}, {os.cpu_count()} logical cores"]
    for gpu in _GPUS:
        details = tf.config.experimental.get_device_details(gpu)
        parts.append(f"GPU: {details.get('device_name', gpu.name)}")
    if not _GPUS:
        parts.append("no GPU")
    parts.append(f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
                 f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
                 f"TFP {tfp.__version__}")
    return "; ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats (a smoke run; ratios are rough)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timing rounds per row (default 21, or 5 with --quick)")
    parser.add_argument("--only", action="append", choices=sorted(GROUPS),
                        help="run only these groups of rows (repeatable)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 21
    global _SAMPLE_S
    _SAMPLE_S = 0.005 if args.quick else 0.05
    tf.get_logger().setLevel("ERROR")

    print(f"Device: {device_description()}")
    print(f"Mode: {'quick' if args.quick else 'full'}, {args.repeats} rounds per timing row; "
          f"load average at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print()
    Table.header()
    table = Table()
    start = time.perf_counter()
    for name, run in GROUPS.items():
        if args.only and name not in args.only:
            continue
        run(table, args)
    print()
    failed = [row[0] for row in table.rows if row[5] == "FAIL"]
    print(f"{len(table.rows)} rows, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else "")
          + f"; {time.perf_counter() - start:.0f} s; load average at end: "
          + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    return 0


_SAMPLE_S = 0.05  # seconds per timing sample (several calls); --quick: 0.005
_GPUS = tf.config.list_physical_devices("GPU")
_GPU = bool(_GPUS)

if __name__ == "__main__":
    sys.exit(main())
