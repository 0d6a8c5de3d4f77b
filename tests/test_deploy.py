"""Every route out of TensorFlow, and JAX's SavedModel route into it: TFLite (from a SavedModel and from a Keras model), ONNX
(`model.export(format="onnx")` run in onnxruntime), and a flow's bijector in a `tf.Module`
converted to TFLite. Each route's output must equal in-process `model(x, training=False)`
to 1e-5, and the served graphs hold no variable write and no initialisation branch."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

import tf_actnorm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from patchgan_model import patchgan  # noqa: E402

TOLERANCE = 1e-5
WRITES = {"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp"}
BRANCHES = {"If", "StatelessIf"}


def _conv_two_actnorms():
    return keras.Sequential([keras.Input((8, 8, 3)), tf_actnorm.ActNorm(),
                             keras.layers.Conv2D(4, 3), tf_actnorm.ActNorm()])


def _channels_first():
    return keras.Sequential([keras.Input((3, 5, 5)), tf_actnorm.ActNorm(axis=1),
                             keras.layers.Flatten(), keras.layers.Dense(2)])


MODELS = {
    "conv_two_actnorms": (_conv_two_actnorms, (4, 8, 8, 3)),
    "patchgan_2d": (lambda: patchgan((16, 16, 1), filters=4), (3, 16, 16, 1)),
    "patchgan_5d": (lambda: patchgan((4, 16, 16, 1), filters=4), (2, 4, 16, 16, 1)),
    "channels_first": (_channels_first, (4, 3, 5, 5)),
}


@pytest.fixture(params=sorted(MODELS), scope="module")
def initialised(request):
    """(model, x, reference): a model initialised on data far from standardised, then
    moved off its initial values, and its in-process inference output on new data."""
    build, shape = MODELS[request.param]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = build()
    model(rng.normal(5.0, 3.0, shape).astype("float32"), training=True)
    for layer in model.layers:
        if isinstance(layer, tf_actnorm.ActNorm):
            assert bool(layer.initialized.numpy())
            for w in layer.trainable_weights:  # a trained layer, not just an initialised one
                w.assign(w + rng.normal(0.0, 0.1, w.shape).astype("float32"))
    x = rng.normal(5.0, 3.0, shape).astype("float32")
    return model, x, model(x, training=False).numpy()


def _run_tflite(content, x, signature=None):
    interpreter = Interpreter(model_content=content)
    if signature is not None:
        runner = interpreter.get_signature_runner(signature)
        (name,) = runner.get_input_details()
        (out,) = runner(**{name: x}).values()
        return out
    (inp,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _assert_close(actual, expected):
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE)


def test_saved_model_to_tflite(initialised, tmp_path):
    model, x, reference = initialised
    model.export(str(tmp_path / "sm"), verbose=False)
    content = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm")).convert()
    _assert_close(_run_tflite(content, x), reference)


def test_keras_model_to_tflite(initialised):
    model, x, reference = initialised
    content = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    _assert_close(_run_tflite(content, x), reference)


def test_onnx_export_runs_in_onnxruntime(initialised, tmp_path):
    import onnxruntime  # noqa: PLC0415

    model, x, reference = initialised
    path = str(tmp_path / "model.onnx")
    model.export(path, format="onnx", verbose=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    _assert_close(out, reference)


# ------------------------------------------------------------------ a flow's bijector

class _Flow(tf.Module):
    """What a user serves of a flow: its bijector's two directions."""

    def __init__(self, bijector, event_shape):
        super().__init__()
        self.bijector = bijector
        spec = [tf.TensorSpec([None, *event_shape], tf.float32)]
        self.forward = tf.function(bijector.forward, input_signature=spec)
        self.inverse = tf.function(bijector.inverse, input_signature=spec)


@pytest.mark.parametrize("axis, event_shape", [(-1, (3,)), (-3, (2, 4, 4))],
                         ids=["vector", "channels_first_image"])
def test_bijector_module_to_tflite(tmp_path, axis, event_shape):
    rng = np.random.default_rng(1)
    bijector = tf_actnorm.ActNormBijector(event_shape[axis], axis=axis)
    flow = _Flow(bijector, event_shape)
    x = rng.normal(-2.0, 4.0, (8, *event_shape)).astype("float32")
    flow.forward(x)  # initialises (and traces a function that holds the init branch)
    assert bool(bijector.initialized.numpy())
    tf.saved_model.save(flow, str(tmp_path), signatures={
        "forward": flow.forward, "inverse": flow.inverse})
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(tmp_path), signature_keys=["forward", "inverse"])
    content = converter.convert()
    y = rng.normal(size=x.shape).astype("float32")
    _assert_close(_run_tflite(content, x, "forward"), bijector.forward(x).numpy())
    _assert_close(_run_tflite(content, y, "inverse"), bijector.inverse(y).numpy())
    assert _served_op_counts(tmp_path) == {}


# ------------------------------------------------- no writes, no init branch when served

def _op_counts(graph_def):
    """Counts of variable writes and conditionals in a graph and every function body in
    its library (nested functions, cond branches)."""
    ops = [n.op for n in graph_def.node]
    ops += [n.op for f in graph_def.library.function for n in f.node_def]
    return {op: ops.count(op) for op in set(ops) & (WRITES | BRANCHES)}


def _served_op_counts(path):
    """Op counts over every signature of a SavedModel (what a server or converter runs)."""
    loaded = tf.saved_model.load(str(path))
    counts = {}
    for function in loaded.signatures.values():
        for op, n in _op_counts(function.graph.as_graph_def()).items():
            counts[op] = counts.get(op, 0) + n
    return counts


def test_exported_functions_hold_no_variable_write_or_branch(tmp_path):
    model = _conv_two_actnorms()
    x = np.random.default_rng(2).normal(3.0, 2.0, (4, 8, 8, 3)).astype("float32")
    # The counter sees what it looks for: a training call's graph holds both.
    training_graph = tf.function(lambda t: model(t, training=True)).get_concrete_function(
        tf.TensorSpec([None, 8, 8, 3])).graph.as_graph_def()
    training_counts = _op_counts(training_graph)
    assert training_counts.get("AssignVariableOp", 0) >= 6 and set(training_counts) & BRANCHES
    model(x, training=True)
    model.export(str(tmp_path / "sm"), verbose=False)
    assert _served_op_counts(tmp_path / "sm") == {}
    # Inference traces (what `model.export` and converters trace) hold none either.
    inference_graph = tf.function(lambda t: model(t)).get_concrete_function(
        tf.TensorSpec([None, 8, 8, 3])).graph.as_graph_def()
    assert _op_counts(inference_graph) == {}


def test_saved_model_serves_in_process_outputs(initialised, tmp_path):
    model, x, reference = initialised
    model.export(str(tmp_path / "sm"), verbose=False)
    assert _served_op_counts(tmp_path / "sm") == {}
    served = tf.saved_model.load(str(tmp_path / "sm"))
    _assert_close(served.serve(x).numpy(), reference)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax beside TensorFlow")
def test_jax_model_exports_a_saved_model_that_serves_in_tensorflow(tmp_path):
    """A model trained on the JAX backend, exported with
    `model.export(format="tf_saved_model")`, serves in TensorFlow the JAX model's
    outputs; exporting it before its ActNorm initialised is refused with the message
    TensorFlow gives. JAX runs in a subprocess (KERAS_BACKEND is fixed per process)."""
    script = Path(__file__).resolve().parent / "jax_saved_model.py"
    env = dict(os.environ, KERAS_BACKEND="jax",
               PYTHONPATH=os.pathsep.join([str(script.parent.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["refused"] is not None
    assert "ActNorm 'an' was never initialised, so exporting it" in result["refused"]
    assert result["initialized"]
    with np.load(tmp_path / "io.npz") as io:
        x, expected = io["x"], io["y"]
    loaded = tf.saved_model.load(str(tmp_path / "saved_model"))  # kept: it owns the variables
    served = loaded.serve(tf.constant(x))
    np.testing.assert_allclose(served.numpy(), expected, rtol=1e-6, atol=1e-6)
