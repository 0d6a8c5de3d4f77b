"""Checkpoints, .keras files, SavedModel export and resuming.

In-process tests cover checkpoints, get/set_weights and the uninitialised-export guard.
The fresh-process items run tests/persistence_helper.py twice (``train`` then ``fresh``,
each its own ``sys.executable`` process, op determinism on) and compare what the fresh
process loaded, served and resumed with what the training process had in memory.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_actnorm
from tests import persistence_helper as helper
from tests.util import assert_unchanged, snapshot

HELPER = os.path.join(os.path.dirname(__file__), "persistence_helper.py")
SERVE_TOL = dict(rtol=1e-6, atol=1e-6)


def _data(rng, loc, scale, shape=(16, 4, helper.CHANNELS)):
    return rng.normal(loc, scale, shape).astype("float32")


def _initialised_model(rng):
    model = helper.make_model()
    model(_data(rng, 5.0, 3.0), training=True)
    for name in helper.LAYERS:  # move off the data-derived values, as training would
        layer = model.get_layer(name)
        layer.log_scale_residual.assign(layer.log_scale_residual + 0.25)
    return model


def _snapshots(model):
    return [snapshot(model.get_layer(name)) for name in helper.LAYERS]


# ------------------------------------------------------------------ checkpoints (in process)

def test_checkpoint_restores_model_and_restored_layers_never_reinitialise(rng, tmp_path):
    model = _initialised_model(rng)
    expected = _snapshots(model)
    prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    other = _data(rng, -60.0, 30.0)  # very different statistics
    want = model(other, training=False).numpy()

    restored = helper.make_model()  # built, not initialised
    assert not any(s[2] for s in _snapshots(restored))
    tf.train.Checkpoint(model=restored).read(prefix).assert_existing_objects_matched()
    for got, exp in zip(_snapshots(restored), expected):
        assert_unchanged(exp, got)
    got = restored(other, training=True).numpy()  # training mode: would initialise if it could
    for after, exp in zip(_snapshots(restored), expected):
        assert_unchanged(exp, after)
    np.testing.assert_array_equal(got, want)


def test_checkpoint_restores_into_unbuilt_layer_before_first_call(rng, tmp_path):
    layer = tf_actnorm.ActNorm(name="solo")
    layer(_data(rng, 5.0, 3.0), training=True)
    expected = snapshot(layer)
    prefix = tf.train.Checkpoint(layer=layer).write(str(tmp_path / "ckpt"))

    unbuilt = tf_actnorm.ActNorm(name="solo")
    tf.train.Checkpoint(layer=unbuilt).read(prefix)  # deferred until the variables exist
    unbuilt(_data(rng, -60.0, 30.0), training=True)
    assert_unchanged(expected, snapshot(unbuilt))


def test_checkpoint_restores_bare_bijector(rng, tmp_path):
    bijector = tf_actnorm.ActNormBijector(helper.CHANNELS)
    bijector.forward(_data(rng, 5.0, 3.0)[:, 0])  # initialises
    bijector.bias.assign_add([0.5, -0.5, 1.0])
    expected = snapshot(bijector)
    prefix = tf.train.Checkpoint(bijector=bijector).write(str(tmp_path / "ckpt"))

    restored = tf_actnorm.ActNormBijector(helper.CHANNELS)
    tf.train.Checkpoint(bijector=restored).read(prefix).assert_consumed()
    assert_unchanged(expected, snapshot(restored))
    other = _data(rng, -60.0, 30.0)[:, 0]
    y = restored.forward(other).numpy()
    restored.inverse(other)
    restored.forward_log_det_jacobian(other, event_ndims=1)
    assert_unchanged(expected, snapshot(restored))
    bias, log_scale = expected[:2]
    np.testing.assert_allclose(y, np.exp(log_scale) * (other + bias), rtol=1e-6)


def test_get_set_weights_carry_initialised_state(rng):
    model = _initialised_model(rng)
    weights = model.get_weights()
    assert sum(w.dtype == bool and w.item() for w in weights) == len(helper.LAYERS)
    other = _data(rng, -60.0, 30.0)
    want = model(other, training=False).numpy()

    fresh = helper.make_model()
    fresh.set_weights(weights)
    got = fresh(other, training=True).numpy()  # first call, training mode: must not initialise
    for a, b in zip(fresh.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------- uninitialised export (in process)

def test_export_of_uninitialised_actnorm_raises_naming_it(rng, tmp_path):
    model = helper.make_model()
    x, y = _data(rng, 5.0, 3.0), rng.normal(size=(16, 2)).astype("float32")
    # Inference before training is legitimate: it works and initialises nothing.
    assert np.all(np.isfinite(model.predict(x, verbose=0)))
    model.evaluate(x, y, verbose=0)
    assert not any(s[2] for s in _snapshots(model))

    model(x, training=True)
    model.get_layer("act_mid").reset_initialization()  # only act_mid is uninitialised now
    with pytest.raises(ValueError, match="ActNorm 'act_mid' was never initialised"):
        model.export(str(tmp_path / "export"), verbose=False)
    assert not (tmp_path / "export").exists()
    with pytest.raises(ValueError, match="ActNorm 'act_mid' was never initialised"):
        tf.saved_model.save(model, str(tmp_path / "saved_model"))

    # Saving training state stays allowed.
    tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    model.save(str(tmp_path / "model.keras"))


def _op_types(concrete_function):
    graph_def = concrete_function.graph.as_graph_def()
    return ({node.op for node in graph_def.node}
            | {node.op for f in graph_def.library.function for node in f.node_def})


def test_inference_only_export_archive_has_no_initialisation_ops(rng, tmp_path):
    # `model.export` traces `model.__call__` with `training` unset, which ActNorm treats
    # as "may initialise": its graph keeps the (unreachable, since the export guard
    # requires `initialized`) init branch. An explicit training=False endpoint has none.
    model = _initialised_model(rng)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda x: model(x, training=False), input_signature=[
        keras.InputSpec(shape=(None, 4, helper.CHANNELS), dtype="float32")])
    archive.write_out(str(tmp_path / "export"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "export"))
    ops = _op_types(served.signatures["serving_default"])
    assert "MatMul" in ops and not ops & {"AssignVariableOp", "If", "StatelessIf"}
    x = _data(rng, 100.0, 50.0, (6, 4, helper.CHANNELS))
    np.testing.assert_allclose(served.serve(x).numpy(), model(x, training=False).numpy(),
                               **SERVE_TOL)

    uninitialised = helper.make_model()
    archive = keras.export.ExportArchive()
    archive.track(uninitialised)
    archive.add_endpoint("serve", lambda x: uninitialised(x, training=False), input_signature=[
        keras.InputSpec(shape=(None, 4, helper.CHANNELS), dtype="float32")])
    with pytest.raises(ValueError, match="ActNorm 'act_in' was never initialised"):
        archive.write_out(str(tmp_path / "export2"), verbose=False)


def test_saving_uninitialised_bijector_module_raises_and_opt_out(tmp_path):
    bijector = tf_actnorm.ActNormBijector(helper.CHANNELS, name="flow_actnorm")
    module = helper.BijectorModule(bijector)
    with pytest.raises(ValueError, match="ActNorm 'flow_actnorm' was never initialised"):
        tf.saved_model.save(module, str(tmp_path / "flow"))
    bijector.initialized.assign(True)  # the documented, deliberate opt-out (serves identity)
    tf.saved_model.save(module, str(tmp_path / "flow"))
    before = snapshot(bijector)
    flow = tf.saved_model.load(str(tmp_path / "flow"))
    x = np.arange(6, dtype="float32").reshape(2, 3)
    np.testing.assert_array_equal(flow.forward(x).numpy(), x)
    assert_unchanged(before, snapshot(bijector))


# ------------------------------------------------------------ fresh processes (subprocess)

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run ``train`` then ``fresh`` once for the module; returns both result archives."""
    out = str(tmp_path_factory.mktemp("persistence"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    for stage in ("train", "fresh"):
        proc = subprocess.run([sys.executable, HELPER, stage, out], env=env,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode:
            pytest.fail(f"persistence_helper.py {stage} failed:\n{proc.stderr[-4000:]}")
    with np.load(os.path.join(out, "train.npz")) as t, np.load(os.path.join(out, "fresh.npz")) as f:
        return dict(t), dict(f)


def _weights(result, prefix):
    count = sum(key.startswith(prefix + "w_") for key in result)
    return [result[f"{prefix}w_{i}"] for i in range(count)]


def test_keras_file_loads_in_fresh_process_initialised_and_identical(runs):
    train, fresh = runs
    assert list(fresh["keras_types"]) == ["ActNorm", "ActNorm"]  # no custom_objects
    assert fresh["keras_initialized"].all()
    loaded, saved = _weights(fresh, "keras_loaded_"), _weights(train, "after_n_")
    for got, want in zip(loaded, saved, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(fresh["keras_predict_new"], train["predict_new"])


def test_model_export_serves_in_memory_outputs_and_never_changes_state(runs):
    train, fresh = runs
    for key in ("export_serve_new", "export_signature_new"):
        np.testing.assert_allclose(fresh[key], train["predict_new"], **SERVE_TOL)
        np.testing.assert_allclose(fresh[key], train["call_new"], **SERVE_TOL)
    # The loaded variables are the exported ones (checked by name against the in-memory
    # weights) and serving on new data changed none of them.
    exported = dict(zip(train["weight_paths"], _weights(train, "after_n_")))
    names = fresh["export_var_names"]
    assert {n.removesuffix(":0") for n in names} == set(exported)
    for i, name in enumerate(names):
        np.testing.assert_array_equal(fresh[f"export_vars_{i}"], exported[name.removesuffix(":0")])
    # Every exported ActNorm is initialised, and no served op can set `initialized` back to
    # False, so the init branch that `model.export`'s graph keeps can never run when served.
    flags = [v for path, v in exported.items() if path.endswith("/initialized")]
    assert len(flags) == len(helper.LAYERS) and all(flags)
    assert fresh["export_unchanged"]


def test_bijector_module_serves_in_memory_outputs_and_never_changes_state(runs):
    train, fresh = runs
    for name in ("forward", "inverse", "fldj"):
        np.testing.assert_allclose(fresh[f"bij_{name}"], train[f"bij_{name}"], **SERVE_TOL)
        np.testing.assert_allclose(fresh[f"bij_sig_{name}"], train[f"bij_{name}"], **SERVE_TOL)
    # Independent check against numpy with the in-memory parameters.
    _, _, new = helper.data()
    z = new[:, 0].astype(np.float64)
    bias, log_scale = train["bij_bias"], train["bij_log_scale"]
    np.testing.assert_allclose(fresh["bij_forward"], np.exp(log_scale) * (z + bias), rtol=1e-5)
    np.testing.assert_allclose(fresh["bij_inverse"], z * np.exp(-log_scale) - bias, rtol=1e-5)
    np.testing.assert_allclose(fresh["bij_fldj"], np.full(len(z), log_scale.sum()), rtol=1e-5)
    assert sorted(fresh["bij_var_names"]) == [
        "flow_actnorm/bias:0", "flow_actnorm/initialized:0", "flow_actnorm/log_scale:0"]
    assert fresh["bij_unchanged"]


def test_resume_in_fresh_process_equals_uninterrupted_training(runs):
    train, fresh = runs
    for got, want in zip(_weights(train, "initial_"), _weights(train, "ref_initial_"), strict=True):
        np.testing.assert_array_equal(got, want)  # same seed, same start
    assert fresh["ckpt_initialized"].all() and fresh["ckpt_iterations"] == helper.N_STEPS
    reference = _weights(train, "ref_")
    moved = [not np.array_equal(a, b)
             for a, b, trainable in zip(reference, _weights(train, "after_n_"),
                                        train["weight_trainable"], strict=True)
             if trainable]
    assert all(moved)  # the M resumed steps do change every trainable weight
    # Achieved tolerance: bit-exact (0.0), for both the .keras and the checkpoint route.
    for route in ("keras_resumed_", "ckpt_resumed_"):
        for got, want in zip(_weights(fresh, route), reference, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=route)
