"""benchmarks/run.py --quick completes and prints every row.

No timing assertions: timings depend on the machine and its load; the table's
PASS/FAIL column is for people to read.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run.py"


def _row_ids():
    spec = importlib.util.spec_from_file_location("_benchmarks_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ROWS


def test_quick_run_prints_every_row():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"^Device: CPU: .+", out, re.M), out[:2000]
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 7 and cells[5] in (
                "PASS", "FAIL", "info", "skipped"):
            rows[cells[0]] = cells
    expected = _row_ids()
    assert len(expected) == len(set(expected)) > 0
    missing = [row for row in expected if row not in rows]
    assert not missing, f"rows not printed: {missing}\n{out[-3000:]}"
    assert sorted(rows) == sorted(expected)
    jax_installed = importlib.util.find_spec("jax") is not None
    for row, cells in rows.items():
        if cells[5] == "skipped":
            # Only the JAX rows may be skipped, and only where jax is not installed.
            assert not jax_installed and row.startswith("jax/"), (row, cells)
            assert cells[6] == "jax is not installed", (row, cells)
            continue
        assert re.fullmatch(r"\d+\.\d{3}×", cells[3]), (row, cells)
        if cells[5] == "info":
            assert cells[4] == "—", (row, cells)
        else:
            assert re.fullmatch(r"[≤≥] \d\.\d\d×", cells[4]), (row, cells)
    assert re.search(rf"^{len(expected)} rows, \d+ failed", out, re.M)
