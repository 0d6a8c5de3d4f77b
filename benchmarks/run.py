"""ActNorm benchmarks: does ActNorm cost nothing over a bare affine op, and does it beat
the alternatives?

Usage::

    python benchmarks/run.py            # full sizes (about 1.5 minutes on a 2-core CPU)
    python benchmarks/run.py --quick    # small sizes, fewer repeats (well under a minute)
    python benchmarks/run.py --only forward --repeats 31

Prints the machine, then one markdown table row per comparison: the candidate's and
the baseline's measurement, their ratio, the target and PASS/FAIL ("info" rows have
no target). Exits 0 whatever the outcome; pass/fail is for people to read.

Where things are (each module's docstring says how its part measures):

* ``timing.py``: paired timing of ``tf.function``s ("xla"/"graph" modes, GPU
  synchronisation, the machine's description); ``pairing.py``: the framework-free
  pairing of candidate and baseline rounds, shared with ``jax_rows.py``.
* ``report.py``: the table, number formatting, the CPU's name.
* ``models.py``: the models and train steps the rows run.
* ``graph_memory.py``: the GPU peak and the CPU proxy for a train step's memory (the
  forward tensors the backward pass reads).
* Row groups (``--only``): ``rows_speed.py`` (``forward``, ``train``, ``fit``,
  ``log-det``, ``first``), ``rows_memory.py`` (``memory``), ``rows_init.py``
  (``init``); ``jax`` runs ``jax_rows.py`` in a subprocess with
  ``KERAS_BACKEND=jax`` (its rows print as "skipped" where jax is not installed).
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Measure this checkout's tf_actnorm, not whichever copy is installed, and import the
# modules beside this file as the package `benchmarks` (also when this file is loaded
# as a module, as tests/test_benchmarks.py does).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tensorflow as tf  # noqa: E402

from benchmarks import rows_init, rows_memory, rows_speed  # noqa: E402
from benchmarks.report import Table, load_average  # noqa: E402
from benchmarks.timing import MODES, device_description  # noqa: E402

# Printed by benchmarks/jax_rows.py (JAX backend, jax.jit); targets: forward <= 1.05x,
# train step <= 1.00x.
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


def jax_rows(table, args):
    """The JAX rows: benchmarks/jax_rows.py run by this interpreter with
    ``KERAS_BACKEND=jax`` (a fresh process: the backend is fixed when Keras is first
    imported); "skipped" where jax is not installed."""
    if importlib.util.find_spec("jax") is None:
        for row_id in JAX_ROWS:
            table.add_cells((row_id, "—", "—", "—", "—", "skipped", "jax is not installed"))
        return
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "jax_rows.py"),
           "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| jax/")]
    for line in rows:
        table.add_cells([c.strip() for c in line.strip().strip("|").split("|")])
    if proc.returncode or len(rows) != len(JAX_ROWS):
        print(f"benchmarks/jax_rows.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


GROUPS = {
    "forward": rows_speed.forward_rows,
    "train": rows_speed.train_step_rows,
    "fit": rows_speed.fit_rows,
    "log-det": rows_speed.log_det_rows,
    "first": rows_speed.first_call_rows,
    "memory": rows_memory.memory_rows,
    "init": rows_init.init_rows,
    "jax": jax_rows,
}


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
    args.sample_s = 0.005 if args.quick else 0.05  # seconds per timing sample (several calls)
    tf.get_logger().setLevel("ERROR")

    print(f"Device: {device_description()}")
    print(f"Mode: {'quick' if args.quick else 'full'}, {args.repeats} rounds per timing row; "
          f"load average at start: {load_average()}")
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
          + f"; {time.perf_counter() - start:.0f} s; load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
