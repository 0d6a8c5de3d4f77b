"""``tf_actnorm.initialize`` rows (group ``init``): what multi-batch initialisation
costs against training on the same batches.

* Glow-like flow (``models.GlowLike``: examples/glow_digits.py's multi-scale flow,
  deeper): ``initialize`` from a fresh (built, uninitialised) model, its tracing
  included (median over fresh models), against as many steps of the compiled train
  step (``tf.function``, Adam; its tracing not included). ``steps=16`` (256 KiB of
  images) fits ``initialize``'s 1 MiB one-pass budget; ``steps=128`` (2 MiB) streams:
  one pass per layer over the data.
* Dense model (``models.dense_model``), many batches made on the fly: ``initialize``
  over all of them (batch·layers/s, cold) against as many XLA-compiled SGD train
  steps; and the peak growth of resident memory during ``initialize`` (sampled every
  2 ms from another thread) against the size of the data, which ``initialize`` must
  not hold.
"""

import os
import statistics
import threading
import time

import keras
import numpy as np
import tensorflow as tf

import tf_actnorm
from benchmarks import models
from benchmarks.report import mib
from benchmarks.timing import sync


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
    glow_rows(table, args)
    dense_rows(table, args)


def glow_rows(table, args):
    steps_per_level, hidden = (1, 8) if args.quick else (5, 64)
    rng = np.random.default_rng(0)
    images = tf.data.Dataset.from_tensor_slices(
        (rng.uniform(size=(128 * 64, 8, 8, 1)) - 0.5).astype("float32")).batch(64).cache()
    x = next(iter(images))
    list(images)  # fills the cache

    def fresh_glow():
        keras.utils.set_random_seed(0)
        model = models.GlowLike(steps_per_level, hidden)
        model(x, training=False)  # builds; inference never initialises
        return model

    model = fresh_glow()
    layers = sum(isinstance(l, tf_actnorm.ActNorm) for l in model._flatten_layers())
    train = models.flow_train_step(model)
    start = time.perf_counter()
    train(x)  # traces and initialises
    compile_s = time.perf_counter() - start
    for _ in range(3):
        train(x)
    sync()

    def train_seconds(batches):
        times = []
        for _ in range(1 if args.quick else max(3, args.repeats // 3)):
            start = time.perf_counter()
            for batch in images.take(batches):
                train(batch)
            sync()
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

    one_pass_rounds, streamed_rounds = (2, 1) if args.quick else (5, 3)
    for batches, path, rounds in ((16, "one eager pass (data within the 1 MiB budget)",
                                   one_pass_rounds),
                                  (128, "streamed: one pass per layer, one traced "
                                        "whole-model function, two runs at once",
                                   streamed_rounds)):
        init_s, train_s = init_seconds(batches, rounds), train_seconds(batches)
        table.add(f"init/glow/initialize(steps={batches}) vs {batches} train steps",
                  f"{init_s:.2f} s", f"{train_s:.3f} s", init_s / train_s, 5.0,
                  note=f"{layers} ActNorm layers, batches [64, 8, 8, 1], hidden {hidden}; {path}; "
                       f"each from a fresh model, tracing included (median of {rounds}); train "
                       f"steps compiled (tf.function, Adam), their tracing ({compile_s:.1f} s) "
                       "not included")


def dense_rows(table, args):
    batches, shape = (400, (256, 64)) if args.quick else (2000, (256, 64))
    data = tf.data.Dataset.range(batches).map(
        lambda i: tf.random.stateless_normal(shape, tf.stack([i, 0]), mean=1.0, stddev=3.0))
    tf_actnorm.initialize(models.dense_model(shape[1], 3), data.take(4), verbose=0)  # warm-up
    model = models.dense_model(shape[1], 3)
    layers = sum(isinstance(l, tf_actnorm.ActNorm) for l in model.layers)
    init_s, growth = _timed_with_peak_rss(lambda: tf_actnorm.initialize(model, data, verbose=0))
    train = models.train_step(model, jit=True)
    for batch in data.take(3):
        train(batch)
    start = time.perf_counter()
    for batch in data:
        train(batch)
    sync()
    train_s = time.perf_counter() - start
    data_bytes = batches * int(np.prod(shape)) * 4
    table.add("init/dense/initialize vs train steps, same batches",
              f"{batches * layers / init_s:,.0f} batch·layers/s", f"{batches / train_s:,.0f} steps/s",
              init_s / train_s, 5.0,
              note=f"{batches} batches {list(shape)} f32 made on the fly, {layers} ActNorm layers; "
                   f"{init_s:.2f} s (cold) vs {train_s:.2f} s (XLA, SGD)")
    table.add("init/dense/peak RSS growth vs data size", mib(growth), mib(data_bytes),
              growth / data_bytes, 0.5,
              note=f"initialize over {batches} batches: resident memory sampled every 2 ms")
