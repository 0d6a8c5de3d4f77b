"""Smoke tests: every example runs with ``--quick``, prints its key lines and writes its
picture. The scripts run one after another in one fresh process (``run_examples.py``),
which starts TensorFlow once for all of them."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NUMBER = r"(-?[0-9.]+(?:e[-+][0-9]+)?)"
# script: (its picture, its --out below the run's directory: quickstart's is missing and
# nested, which the script must create)
OUTPUTS = {
    "quickstart.py": ("quickstart.png", "missing/nested"),
    "two_moons_flow.py": ("two_moons.png", "two_moons"),
    "glow_digits.py": ("glow_digits.png", "glow_digits"),
    "patchgan_discriminator.py": ("patchgan_discriminator.png", "patchgan"),
    "taming_discriminator.py": ("taming_discriminator.png", "taming"),
    "serve_savedmodel.py": ("serve_savedmodel.png", "serve"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    specs = []
    for script, (_, out) in OUTPUTS.items():
        cwd = root / "cwd" / script.removesuffix(".py")
        cwd.mkdir(parents=True)
        specs += [str(EXAMPLES / script), str(root / out), str(cwd)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("run_examples.py")), *specs],
        env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    return root, json.loads(lines[-1].removeprefix("RESULT "))


def run_example(script, runs):
    """What ``script`` printed, once it ran without error and wrote its picture."""
    root, results = runs
    run = results[str(EXAMPLES / script)]
    assert run["error"] is None, run["stdout"][-3000:] + run["error"]
    png, out = OUTPUTS[script]
    picture = root / out / png
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {picture}" in run["stdout"]
    return run["stdout"]


def numbers(pattern, text):
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in output:\n{text}"
    return [float(g) for g in match.groups()]


def test_quickstart(runs):
    """Its key lines, and its picture in an ``--out`` directory it creates (missing, nested)."""
    out = run_example("quickstart.py", runs)
    (before_mean,) = numbers(r"before init: .*max \|mean\| +" + NUMBER, out)
    after_mean, low, high = numbers(
        r"after init: .*max \|mean\| +" + NUMBER + r"\), std .*range " + NUMBER + " to " + NUMBER,
        out)
    assert before_mean > 1.0  # the conv output of raw pixels is far from standardised
    assert after_mean < 1e-3 and 0.999 <= low <= high <= 1.001
    assert "after training:" in out and "test accuracy:" in out


def test_two_moons_flow(runs):
    out = run_example("two_moons_flow.py", runs)
    assert "initial NLL (first batch, ActNorm initialised)" in out
    flow, gaussian = numbers(r"held-out NLL: flow " + NUMBER + " nats, Gaussian " + NUMBER, out)
    assert 0.0 < flow < 10.0 and 1.5 < gaussian < 2.5  # --quick trains too little to win


def test_glow_digits(runs):
    out = run_example("glow_digits.py", runs)
    with_init, without = numbers(
        r"first-step loss: " + NUMBER + " bits/dim with data-dependent init, " + NUMBER, out)
    assert with_init < without
    (held_out,) = numbers(r"held-out: " + NUMBER + " bits/dim", out)
    assert 0.0 < held_out < 8.0


def test_patchgan_discriminator(runs):
    out = run_example("patchgan_discriminator.py", runs)
    for data in ("images", "video"):
        pattern = data + r", {}\s*: .* by " + NUMBER + " between two batches .*, " + NUMBER
        assert numbers(pattern.format("ActNorm"), out) == [0.0, 0.0]
        assert min(numbers(pattern.format("BatchNorm"), out)) > 1e-3
    assert "images, ActNorm: 3 adversarial steps" in out


def test_taming_discriminator(runs):
    out = run_example("taming_discriminator.py", runs)
    layers = re.findall(r"^ +\d+ +\d+ +" + NUMBER + " +" + NUMBER + " to " + NUMBER + "$", out,
                        re.MULTILINE)
    assert len(layers) == 3  # one row per ActNorm of NLayerDiscriminator(n_layers=3)
    for mean, low, high in (map(float, row) for row in layers):
        assert mean < 1e-5 and 0.99 < low <= high < 1.001  # standardised by its first batch
    assert numbers(r"ActNorm +" + NUMBER + " +" + NUMBER, out) == [0.0, 0.0]
    assert min(numbers(r"BatchNorm2d +" + NUMBER + " +" + NUMBER, out)) > 1e-3
    assert "ActNorm: step   2: D loss" in out


def test_serve_savedmodel(runs):
    out = run_example("serve_savedmodel.py", runs)
    assert "server: tf_actnorm imported: False" in out
    assert len(re.findall(r"max \|served - in-process\| = ", out)) == 3
    assert "served outputs match the in-process model" in out


# Scripts take `--quick`; other files (`patchgan_model.py`) are modules they import.
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if "--quick" in p.read_text())


def test_modules_beside_the_scripts_are_imported_by_one():
    modules = {p.stem for p in EXAMPLES.glob("*.py")} - {s.removesuffix(".py") for s in SCRIPTS}
    sources = "".join((EXAMPLES / s).read_text() for s in SCRIPTS)
    assert modules == {"patchgan_model"} and "from patchgan_model import" in sources


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_example_has_a_smoke_test(script):
    assert f"test_{script.removesuffix('.py')}" in globals() and script in OUTPUTS
