"""Timing TensorFlow functions, and the devices they run on.

Every timed function is a ``tf.function``: "xla" rows with ``jit_compile=True``,
"graph" rows with ``jit_compile=False`` (``MODES``), traced and run a few times first
(warm-up). Then, ``--repeats`` rounds: each round times the candidate and the baseline
back to back (the order alternates between rounds), each over enough calls to last
~50 ms (5 ms with ``--quick``). The table shows the median time of each, and the ratio
is the median of the per-round ratios, so that load from other processes, which
drifts over seconds, hits both sides of a ratio alike (``pairing.py``). On a GPU each
timing ends with a device synchronisation. Two identical functions timed this way (an
A/A test) give ratios within about ±1% on a 2-core CPU shared with other jobs: that is
the resolution of the ratios.
"""

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from benchmarks import pairing, report

MODES = (("xla", True), ("graph", False))
GPUS = tf.config.list_physical_devices("GPU")
GPU = bool(GPUS)


def sync():
    """Waits for the GPU's queued work (nothing to wait for on a CPU)."""
    if GPU:
        tf.test.experimental.sync_devices()


def compare_times(candidate, baseline, args, warmup=3):
    """(median candidate s, median baseline s, median of per-round ratios) over
    ``args.repeats`` rounds of samples lasting ``args.sample_s``; see
    ``pairing.compare_times``."""
    return pairing.compare_times(candidate, baseline, args.repeats, args.sample_s,
                                 sync=lambda out: sync(), warmup=warmup)


def device_description():
    """CPU, GPUs, system and the versions of TensorFlow, Keras and TFP."""
    parts = [report.cpu_description()]
    for gpu in GPUS:
        details = tf.config.experimental.get_device_details(gpu)
        parts.append(f"GPU: {details.get('device_name', gpu.name)}")
    if not GPUS:
        parts.append("no GPU")
    parts.append(f"{report.system_description()}, TensorFlow {tf.__version__}, "
                 f"Keras {keras.__version__}, TFP {tfp.__version__}")
    return "; ".join(parts)
