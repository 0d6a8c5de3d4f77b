"""The benchmark table and the machine it ran on; imports no framework, so the
TensorFlow rows (``run.py``) and the JAX rows (``jax_rows.py``) print alike.

Each row is one markdown table line: the row's id, the candidate's and the baseline's
measurement, their ratio, the target and the verdict (PASS/FAIL against the target,
"info" where there is no target, "skipped" with the reason in the notes), then notes.
"""

import os
import platform


class Table:
    """Prints rows as they are measured and keeps them for the summary line."""

    def __init__(self):
        self.rows = []

    def add(self, row_id, candidate, baseline, ratio, target, higher_is_better=False, note=""):
        """A measured row: ``candidate``/``baseline`` already formatted, ``ratio`` a
        number compared with ``target`` (None: an "info" row)."""
        self.add_cells(row_cells(row_id, candidate, baseline, ratio, target,
                                 higher_is_better, note))

    def add_cells(self, cells):
        """A row already formatted (measured elsewhere, e.g. by ``jax_rows.py``)."""
        self.rows.append(tuple(cells))
        print_row(cells)

    @staticmethod
    def header():
        print("| row | candidate | baseline | ratio | target | result | notes |")
        print("|---|---:|---:|---:|---:|:---:|---|", flush=True)


def row_cells(row_id, candidate, baseline, ratio, target, higher_is_better=False, note=""):
    """The seven cells of a row, with the verdict of ``ratio`` against ``target``."""
    if target is None:
        verdict, target_text = "info", "—"
    elif higher_is_better:
        verdict, target_text = ("PASS" if ratio >= target else "FAIL"), f"≥ {target:.2f}×"
    else:
        verdict, target_text = ("PASS" if ratio <= target else "FAIL"), f"≤ {target:.2f}×"
    return (row_id, candidate, baseline, f"{ratio:.3f}×", target_text, verdict, note)


def print_row(cells):
    print("| " + " | ".join(cells) + " |", flush=True)


def ms(seconds):
    return f"{seconds * 1e3:.3f} ms"


def us(seconds):
    return f"{seconds * 1e6:.1f} µs"


def mib(nbytes):
    return f"{nbytes / 2**20:.2f} MiB"


def cpu_name():
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


def cpu_description():
    """``CPU: <model>, <n> logical cores``."""
    return f"CPU: {cpu_name()}, {os.cpu_count()} logical cores"


def system_description():
    """Operating system and Python versions."""
    return f"{platform.system()} {platform.release()}, Python {platform.python_version()}"


def load_average():
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())
