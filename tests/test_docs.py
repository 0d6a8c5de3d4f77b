"""The documentation site builds strictly (MkDocs + Material + mkdocstrings).

``mkdocs build --strict`` turns every warning into a failure: a broken link or anchor, a
page missing from the navigation, a picture that is not there, a docstring section the API
reference cannot render, an object that cannot be found. The build uses the `docs` tools
that the `test` extra installs.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API_OBJECTS = {"api/actnorm": "tf_actnorm.ActNorm",
               "api/actnorm-bijector": "tf_actnorm.ActNormBijector",
               "api/initialize": "tf_actnorm.initialize",
               "api/torch-actnorm": "tf_actnorm.torch.ActNorm"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


def test_site_builds_strictly(site):
    assert (site / "index.html").is_file()


@pytest.mark.parametrize("page", sorted(API_OBJECTS))
def test_api_reference_is_generated_from_docstrings(site, page):
    html = (site / page / "index.html").read_text()
    assert f'id="{API_OBJECTS[page]}"' in html  # mkdocstrings' anchor for the object
    text = re.sub(r"<[^>]+>", " ", html)
    assert "Parameters:" in text


def test_call_arguments_render_as_a_parameter_list(site):
    # Keras' `Call arguments:` section becomes a list of named arguments, not run-on text.
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", (site / "api/actnorm/index.html").read_text()))
    assert "Call arguments:" in text
    for name in ("inputs", "training", "mask"):
        assert re.search(rf"{name} – ", text), name
    assert "_state" not in (site / "api/actnorm-bijector/index.html").read_text()


def test_every_picture_is_shown(site):
    # Each example's picture in docs/ appears on the Examples page and is copied to the site.
    html = (site / "examples" / "index.html").read_text()
    for picture in sorted((ROOT / "docs").glob("*.png")):
        assert f'src="../{picture.name}"' in html, picture.name
        assert (site / picture.name).read_bytes() == picture.read_bytes()


def test_readme_is_a_landing_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    # It states how long the test suite takes on a 2-core machine.
    assert re.search(r"test suite takes about \d+ minutes on a 2-core", readme)
    # Its relative links (into docs/, LICENSE, pictures) point at files that exist.
    targets = re.findall(r"\]\((?!https?://)([^)#]+)(?:#[^)]*)?\)", readme)
    assert any(t.startswith("docs/") for t in targets)
    for target in targets:
        assert (ROOT / target).is_file(), target


def test_no_tracker_numbers_in_docs_code_or_tests():
    """Pages, docstrings, comments and test docstrings say what the behaviour is; a reader
    of the repository cannot follow a tracker number."""
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    for folder in ("tf_actnorm", "tests", "benchmarks", "examples"):
        files += sorted((ROOT / folder).rglob("*.py"))
    pattern = re.compile(r"\b(?:issues?|tasks?) #?\d+|(?<![\w&/])#\d{1,3}\b", re.I)
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in files
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line)]
    assert not found, "\n".join(found)
