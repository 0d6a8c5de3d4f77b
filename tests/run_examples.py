"""Runs scripts (the examples with ``--quick``; the documentation pages' snippets), one
after another in this one process, each as ``__main__`` with its own ``sys.argv`` and cwd
and from a fresh Keras state (session cleared, float32 dtype policy), and prints one line
``RESULT <json>``: per script, what it printed and the traceback if it raised. Starting
TensorFlow once instead of once per script saves several seconds a script.

    python tests/run_examples.py SCRIPT OUT CWD [SCRIPT OUT CWD ...]
"""

import contextlib
import io
import json
import os
import runpy
import sys
import traceback

import keras


def run(script, out, cwd):
    printed = io.StringIO()
    argv, path, here = sys.argv, sys.path[:], os.getcwd()
    sys.argv = [script, "--quick", "--out", out]
    sys.path.insert(0, os.path.dirname(script))  # as `python script.py` does (its helpers)
    error = None
    try:
        os.chdir(cwd)
        keras.utils.clear_session()  # each script starts from a fresh Keras state
        keras.config.set_dtype_policy("float32")  # a script may set mixed precision
        with contextlib.redirect_stdout(printed):
            runpy.run_path(script, run_name="__main__")
    except BaseException:  # noqa: BLE001 - reported to the test, which fails on it
        error = traceback.format_exc()
    finally:
        sys.argv, sys.path[:] = argv, path
        os.chdir(here)
    return {"stdout": printed.getvalue(), "error": error}


if __name__ == "__main__":
    specs = sys.argv[1:]
    results = {specs[i]: run(*specs[i:i + 3]) for i in range(0, len(specs), 3)}
    print("RESULT " + json.dumps(results))
