"""Every ```python fence in README.md and docs/**/*.md runs.

Per page, the page's ```python fences are joined in order and run top to bottom as one
script (cwd a temporary directory of its own, Keras' state cleared first), so a snippet may
use what an earlier one on the same page defined, as a reader going down the page would.
The pages' scripts share two fresh interpreters (``run_examples.py``). Fences that are not meant to
run carry another tag (``text``, ``console``, ``bash``); an untagged fence is an error, so a
snippet cannot drop out of the test by accident.

A ```python fence that sets ``KERAS_BACKEND`` (``os.environ["KERAS_BACKEND"] = "jax"``) is
a backend example: it runs on its own, in a fresh interpreter in which TensorFlow cannot be
imported (as with only that backend's extra installed), and the ```text fence right after
it is what it must print.
"""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
FENCE = re.compile(r"^(`{3,})([^\n`]*)\n(.*?)^\1[ \t]*$", re.M | re.S)
NOT_RUN = {"text", "console", "bash", "yaml", "none"}


def fences(page):
    """(tag, code) of every top-level fenced block of ``page``, in order."""
    return [(m.group(2).strip(), m.group(3)) for m in FENCE.finditer(page.read_text())]


BACKEND_BLOCK = re.compile(r'^os\.environ\["KERAS_BACKEND"\] = "(\w+)"', re.M)


def python_source(page):
    """The page's ```python fences, in order, less its backend examples."""
    return "\n".join(code for tag, code in fences(page)
                     if tag == "python" and not BACKEND_BLOCK.search(code))


def backend_examples(page):
    """``(backend, code, expected output)`` of each backend example on ``page``."""
    found = fences(page)
    examples = []
    for i, (tag, code) in enumerate(found):
        match = BACKEND_BLOCK.search(code) if tag == "python" else None
        if match:
            follows = found[i + 1] if i + 1 < len(found) else ("", "")
            assert follows[0] == "text", (
                f"{_page_id(page)}: a {match.group(1)} example must be followed by a ```text "
                "fence with what it prints")
            examples.append((match.group(1), code, follows[1]))
    return examples


def _page_id(page):
    return str(page.relative_to(ROOT))


def test_fence_parser_sees_every_fence():
    # Three backticks at a line start that the parser did not consume would mean a fence it
    # missed (e.g. an indented one): its code would silently not run.
    for page in PAGES:
        text = page.read_text()
        opened = len(re.findall(r"^[ \t]*```", text, re.M))
        assert opened == 2 * len(fences(page)), f"{_page_id(page)}: unparsed or indented fence"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_fences_are_tagged(page):
    tags = {tag for tag, _ in fences(page)}
    unknown = tags - NOT_RUN - {"python"}
    assert not unknown, f"{_page_id(page)}: fence tags {unknown}: use python, or one of {NOT_RUN}"


def _run_pages(scripts):
    """Runs page scripts one after another in one fresh interpreter (``run_examples.py``),
    each in its own directory: ``{script: {"stdout", "error"}}``."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    specs = [arg for script in scripts for arg in (str(script), str(script.parent / "out"),
                                                   str(script.parent))]
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("run_examples.py")), *specs],
        env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def page_runs(request, tmp_path_factory):
    """Each selected page's run. The pages share two fresh interpreters, run side by side
    (starting TensorFlow costs a fresh interpreter several seconds on one core): a page
    that configures TensorFlow's devices runs first in its interpreter, as TensorFlow
    allows that only before it starts."""
    pages = sorted({item.callspec.params["page"] for item in request.session.items
                    if getattr(item, "originalname", None) == "test_page_snippets_run"})
    root = tmp_path_factory.mktemp("snippets")
    scripts = {}
    for i, page in enumerate(pages):
        (root / f"page{i}").mkdir()
        scripts[page] = root / f"page{i}" / "snippets.py"
        scripts[page].write_text(python_source(page))
    first = [page for page in pages if "set_logical_device_configuration" in python_source(page)]
    rest = [page for page in pages if page not in first]
    groups = [first + rest[::2], rest[1::2]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(_run_pages, [[scripts[page] for page in group] for group in groups]))
    results = {k: v for run in runs for k, v in run.items()}
    return {page: results[str(scripts[page])] for page in pages}


@pytest.mark.parametrize(
    "page", [p for p in PAGES if python_source(p)], ids=_page_id)
def test_page_snippets_run(page, page_runs):
    result = page_runs[page]
    assert result["error"] is None, (
        f"{_page_id(page)}: snippets failed\n{result['stdout'][-3000:]}\n{result['error'][-5000:]}")


BACKEND_EXAMPLES = [(page, *example) for page in PAGES for example in backend_examples(page)]


@pytest.mark.parametrize("page,backend,code,expected", BACKEND_EXAMPLES,
                         ids=[f"{_page_id(p)}-{b}" for p, b, _, _ in BACKEND_EXAMPLES])
def test_backend_example_prints_what_the_page_shows(page, backend, code, expected, tmp_path):
    from tests.test_backends import backend_env

    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=backend_env(backend))
    assert result.returncode == 0, result.stderr[-5000:]
    assert result.stdout == expected, (result.stdout, expected)


def test_backends_page_has_a_jax_example():
    assert [b for p, b, _, _ in BACKEND_EXAMPLES if p.name == "backends.md"] == ["jax"]


def test_readme_and_guides_have_snippets():
    # The pages that teach the API by example must keep runnable examples.
    for name in ["README.md", "docs/getting-started.md", "docs/flows.md", "docs/keras.md"]:
        assert "```python" in (ROOT / name).read_text(), name
