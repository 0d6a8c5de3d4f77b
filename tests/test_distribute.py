"""ActNorm under tf.distribute: global statistics, identical replicas.

Every scenario runs in a subprocess (``tests/_distribute_worker.py``): logical CPU
devices and ``TF_CONFIG`` must be set before TensorFlow initialises, and several
MirroredStrategy objects in one process can collide on collective keys. Scenarios
are grouped so that there are only three processes: one with a 2-replica
MirroredStrategy on two logical CPUs (it also runs the 1-replica scenarios, whose
strategy uses no collectives), and two workers of a MultiWorkerMirroredStrategy on
127.0.0.1.

The truth is recomputed here with numpy (float64) from the data each replica saw:
``b = -mean``, ``log_scale = -log(std + eps)`` over the concatenation of all
replicas' batches (``s = std + eps``, ``b = mean / s`` when the bijector's
``inverse`` initialises). Replicas must hold bit-identical values.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.util import kill_process_group

WORKER = Path(__file__).with_name("_distribute_worker.py")
ROOT = WORKER.parent.parent
EPSILON = 1e-6
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
MIRRORED_TIMEOUT_S = 240  # generous: a hang must fail the test, not block the suite
MWMS_TIMEOUT_S = 55  # the multi-worker test must stay under 60 s


# ---------------------------------------------------------------------- subprocesses


def _env(**extra):
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _run_workers(mode, envs, timeout):
    """Run one worker process per env, all at once; return their parsed RESULT lines.

    A hard deadline covers them all; whatever happens, every process is killed and
    reaped before this returns.
    """
    with tempfile.TemporaryDirectory() as logs:
        procs, outs = [], []
        try:
            for i, env in enumerate(envs):
                out = open(os.path.join(logs, f"{i}.log"), "w+")  # noqa: SIM115
                outs.append(out)
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), mode], cwd=ROOT, env=env,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in procs):
                if time.monotonic() > deadline:
                    break
                if any(p.poll() not in (None, 0) for p in procs):
                    break  # one crashed: the others would wait for it forever
                time.sleep(0.1)
            timed_out = any(p.poll() is None for p in procs)
        finally:
            for p in procs:
                kill_process_group(p)
        results = []
        for i, (p, out) in enumerate(zip(procs, outs)):
            out.seek(0)
            text = out.read()
            out.close()
            lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
            if timed_out or p.returncode != 0 or not lines:
                pytest.fail(
                    f"{mode} worker {i}: returncode {p.returncode}"
                    f"{f', killed after the {timeout} s deadline' if timed_out else ''}; "
                    f"output tail:\n{text[-4000:]}")
            results.append(json.loads(lines[-1][len("RESULT "):]))
        return results


def _free_ports(n):
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def mirrored():
    (result,) = _run_workers("mirrored", [_env()], MIRRORED_TIMEOUT_S)
    assert result["num_replicas_in_sync"] == 2
    return result


@pytest.fixture(scope="module")
def single_replica(mirrored):
    result = mirrored["single_replica"]
    assert result["num_replicas_in_sync"] == 1
    return result


@pytest.fixture(scope="module")
def multi_worker():
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    envs = [_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
            for i in range(2)]
    start = time.monotonic()
    results = _run_workers("mwms", envs, MWMS_TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert elapsed < 60, f"the multi-worker run took {elapsed:.1f} s"
    assert [r["task"] for r in results] == [0, 1]
    assert all(r["num_replicas_in_sync"] == 2 for r in results)
    return results


# ---------------------------------------------------------------------- the truth


def numpy_truth(shards, direction="forward"):
    """Independent float64 init on the concatenation of every replica's batch."""
    rows = np.concatenate([np.asarray(s, np.float64).reshape(-1, 3) for s in shards if len(s)])
    mean, std = rows.mean(0), rows.std(0)
    if direction == "inverse":
        scale = std + EPSILON
        return mean / scale, np.log(scale)
    return -mean, -np.log(std + EPSILON)


MIRRORED_KINDS = {  # (class, synchronization, aggregation) under the strategies here
    "bias": ["MirroredVariable", "ON_WRITE", "MEAN"],
    "log_scale": ["MirroredVariable", "ON_WRITE", "MEAN"],
    "initialized": ["MirroredVariable", "ON_WRITE", "ONLY_FIRST_REPLICA"],
}
# A layer's parameters are data-dependent variables (above) plus trainable residuals.
LAYER_KINDS = dict(MIRRORED_KINDS,
                   bias_residual=["MirroredVariable", "ON_WRITE", "MEAN"],
                   log_scale_residual=["MirroredVariable", "ON_WRITE", "MEAN"])


def assert_scenario(result, direction="forward", layer=True):
    """Every replica holds identical values, equal to the single-device init and to
    numpy's on the concatenated first (initialising) global batch. ``layer``: the
    variables are an ActNorm layer's (False: a standalone bijector's)."""
    assert "error" not in result, result.get("error")
    replicas = result["replicas"]
    assert replicas["kinds"] == (LAYER_KINDS if layer else MIRRORED_KINDS)
    for name in ("bias", "log_scale", "initialized"):
        for component in replicas[name][1:]:
            np.testing.assert_array_equal(component, replicas[name][0], err_msg=name)
    assert all(replicas["initialized"])
    bias, log_scale = numpy_truth(result["steps"][0], direction)
    np.testing.assert_allclose(replicas["bias"][0], bias, **TOLERANCE)
    np.testing.assert_allclose(replicas["log_scale"][0], log_scale, **TOLERANCE)
    single = result["single_device"]
    np.testing.assert_allclose(replicas["bias"][0], single["bias"], **TOLERANCE)
    np.testing.assert_allclose(replicas["log_scale"][0], single["log_scale"], **TOLERANCE)


# ---------------------------------------------------------------------- no strategy


def test_outside_any_strategy_init_is_one_cond_without_collectives():
    """No strategy: the init guard is a single tf.cond whose branch holds the
    statistics and the assignments; nothing distributed is traced (in process)."""
    import tensorflow as tf

    import tf_actnorm

    layer = tf_actnorm.ActNorm()
    layer.build((None, 3))
    bijector = tf_actnorm.ActNormBijector(3, init_from="inverse")
    spec = tf.TensorSpec([None, 3], tf.float32)
    for fn in (tf.function(lambda x: layer(x, training=True)),
               tf.function(lambda y: bijector.inverse(y))):
        graph = fn.get_concrete_function(spec).graph
        top = [op.type for op in graph.get_operations()]
        every = top + [node.op for f in graph.as_graph_def().library.function
                       for node in f.node_def]
        assert top.count("If") + top.count("StatelessIf") == 1, top
        assert "AssignVariableOp" not in top, top  # only inside the cond's branch
        assert "AssignVariableOp" in every
        assert not [t for t in every if "Collective" in t or "AllReduce" in t or "Nccl" in t]


# ---------------------------------------------------------------------- MirroredStrategy

SPLITS = {"equal": [4, 4], "unequal": [5, 2], "empty_first": [0, 6], "empty_second": [7, 0]}


@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("split", list(SPLITS))
def test_mirrored_custom_loop(mirrored, rank, split):
    """strategy.run in a tf.function, with a tape and an optimizer: the first step
    (split as named) initialises from the global batch; the second changes nothing."""
    result = mirrored[f"custom/rank{rank}/{split}"]
    assert_scenario(result)
    assert result["seen_sizes"] == [SPLITS[split], [3, 3]]


def test_mirrored_empty_global_batch_raises_and_changes_nothing(mirrored):
    result = mirrored["custom/all_empty_then_init"]
    assert "error" not in result, result.get("error")
    assert result["raised"] and "cannot initialise from an empty batch" in result["raised"]
    after = result["after_empty"]
    assert after["initialized"] == [False, False]
    assert after["bias"] == [[0.0] * 3] * 2 and after["log_scale"] == [[0.0] * 3] * 2
    assert_scenario(result)  # the next, non-empty, global batch initialises


@pytest.mark.parametrize("scope", ["outside_scope", "in_scope"])
@pytest.mark.parametrize("source", ["numpy", "dataset"])
def test_mirrored_initialize(mirrored, source, scope):
    """tf_actnorm.initialize on mirrored variables, from three batches (4, 4, 3): every
    replica holds numpy's init on all 11 examples, in or outside strategy.scope()."""
    result = mirrored[f"initialize/{source}/{scope}"]
    assert_scenario(result)
    assert len(result["summary"]) == 1


@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("split", ["unequal", "empty_first"])
def test_mirrored_fit_from_function(mirrored, rank, split):
    """model.fit (jit_compile=False) on distribute_datasets_from_function, the first
    global batch split unequally / leaving replica 0 empty (with the test-only
    Keras build workaround, see test_known_failures_are_shared_by_stock_keras_layers)."""
    result = mirrored[f"fit_from_function/rank{rank}/{split}"]
    assert_scenario(result)
    assert result["seen_sizes"] == [SPLITS[split], [3, 3]]


@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize(("case", "sizes"), [("then_empty", [[4, 4], [1, 0]]),
                                             ("partial", [[2, 1]])])
def test_mirrored_fit_arrays(mirrored, rank, case, sizes):
    """model.fit on numpy arrays with global batch 8, split by the strategy. Plain
    Keras: 9 examples, init from (4, 4), then a final partial batch (1, 0) runs and
    changes nothing. With the workaround: 3 examples, init from the only batch (2, 1)."""
    result = mirrored[f"fit_arrays/rank{rank}/{case}"]
    assert_scenario(result)
    assert result["seen_sizes"] == sizes


@pytest.mark.parametrize(("name", "sizes", "direction"), [
    ("bijector/forward/unequal", [5, 2], "forward"),
    ("bijector/forward/empty_first", [0, 4], "forward"),
    ("bijector/forward/rank4", [1, 3], "forward"),
    ("bijector/inverse/unequal", [2, 5], "inverse"),
    ("bijector/from_layer/unequal", [6, 1], "forward"),
])
def test_mirrored_bijector_in_replica_context(mirrored, name, sizes, direction):
    """ActNormBijector.forward / .inverse inside strategy.run (standalone variables,
    and a layer's shared ones)."""
    result = mirrored[name]
    assert_scenario(result, direction, layer="from_layer" in name)
    assert [len(s) for s in result["steps"][0]] == sizes


@pytest.mark.parametrize("rank", [2, 4])
def test_mirrored_training_after_init_matches_single_device(mirrored, rank):
    """Init from an unequal global batch, then SGD (learning rate 0.1) on unequal /
    one-empty global batches with a loss normalised by the global batch: every
    replica follows a single-device model trained on the concatenated batches."""
    result = mirrored[f"trains_like_single_device/rank{rank}"]
    assert "error" not in result, result.get("error")
    replicas = result["replicas"]
    assert replicas["kinds"] == LAYER_KINDS
    for name in ("bias", "log_scale"):
        np.testing.assert_array_equal(replicas[name][1], replicas[name][0], err_msg=name)
        np.testing.assert_allclose(replicas[name][0], result["single_device_trained"][name],
                                   **TOLERANCE)
        # Training moved the parameters away from their initial values.
        assert np.max(np.abs(np.subtract(replicas[name][0],
                                         result["single_device_init"][name]))) > 1e-3, name
    bias, log_scale = numpy_truth(result["steps"][0])
    np.testing.assert_allclose(result["single_device_init"]["bias"], bias, **TOLERANCE)
    np.testing.assert_allclose(result["single_device_init"]["log_scale"], log_scale, **TOLERANCE)


@pytest.mark.parametrize("fmt", ["tf.train.Checkpoint", "keras.weights.h5"])
def test_checkpoint_cross_restore(mirrored, fmt):
    """A checkpoint written under MirroredStrategy restores on one device and the
    other way round (values and the initialized flag, on every replica); a training
    call after the restore does not initialise again."""
    result = mirrored[f"checkpoint/{fmt}"]
    assert "error" not in result, result.get("error")

    def values(state):
        return [np.asarray(state[k]) for k in ("bias", "log_scale", "initialized")]

    # Written under MirroredStrategy (initialised from an unequal global batch).
    source = result["source_mirrored"]
    for got in values(source):
        np.testing.assert_array_equal(got[1], got[0])
    assert all(source["initialized"])
    bias, log_scale = numpy_truth(result["steps"][0])
    np.testing.assert_allclose(source["bias"][0], bias, **TOLERANCE)
    np.testing.assert_allclose(source["log_scale"][0], log_scale, **TOLERANCE)
    # ... restored on one device: same values, initialised, and training mode does
    # not initialise again.
    for restored in (result["restored_single"], result["after_training_call_single"]):
        for got, want in zip(values(restored), values(source)):
            np.testing.assert_array_equal(got[0], want[0])
    # Written on one device, restored under MirroredStrategy: every replica.
    source = result["source_single"]
    for restored in (result["restored_mirrored"], result["after_training_call_mirrored"]):
        for got, want in zip(values(restored), values(source)):
            assert len(got) == 2
            for component in got:
                np.testing.assert_array_equal(component, want[0])
    assert all(result["restored_mirrored"]["initialized"])


SIGNATURES = {
    # XLA cannot place the replica-1 components of mirrored variables (logical CPUs).
    "mirrored/fit_xla": "Trying to access resource",
    "mirrored/custom_xla": "Trying to access resource",
    # Keras' symbolic build MEAN-reduces the first batch across replicas.
    "mirrored/fit_unequal_first_batch": "Inputs to operation AddN of type AddN must have the same size",
    "mwms/fit": "with an unsupported type (<class 'tensorflow.python.distribute.values.PerReplica'>)",
    # Keras' reduce_per_replica: strategy.reduce("MEAN", scalar, axis=0).
    "mwms/fit_build_workaround": "Invalid reduction dimension 0 for input with 0 dimensions",
    "mwms/custom_xla": "Collectives are not yet implemented for CPU devices when compiling with XLA",
}


def assert_same_outcome_as_stock(outcomes, check, stock_layers, signature):
    """ActNorm fails exactly where stock Keras layers fail, with the same exception
    (and the known message while TensorFlow/Keras give it); if they fix the failure
    for stock layers, ActNorm must then work too."""
    assert "error" not in outcomes, outcomes.get("error")
    ours = outcomes[f"{check}/ActNorm"]
    for stock in stock_layers:
        theirs = outcomes[f"{check}/{stock}"]
        if "error" not in theirs:
            assert "error" not in ours, f"{check}: {stock} works, ActNorm fails: {ours['error']}"
            continue
        assert "error" in ours, f"{check}: ActNorm works where {stock} fails"
        assert ours["error"].split(":")[0] == theirs["error"].split(":")[0], (ours, theirs)
        if signature in theirs["error"]:
            assert signature in ours["error"], ours["error"][-2000:]


@pytest.mark.parametrize("check", ["fit_xla", "custom_xla", "fit_unequal_first_batch"])
def test_known_failures_are_shared_by_stock_keras_layers(mirrored, check):
    """On this stack (CPU only), jit_compile=True under MirroredStrategy fails in fit
    and in custom loops, and model.fit cannot start on a first global batch that
    splits unequally: for BatchNormalization and Dense exactly as for ActNorm."""
    assert_same_outcome_as_stock(mirrored["known_failures"], check,
                                 ("BatchNormalization", "Dense"), SIGNATURES[f"mirrored/{check}"])


def test_mirrored_single_replica(single_replica):
    """A 1-replica MirroredStrategy (one GPU): mirrored variables in replica context."""
    for name in ("custom/rank2", "fit_arrays/rank4", "bijector/forward"):
        assert_scenario(single_replica[name], layer=not name.startswith("bijector/"))


# ---------------------------------------------------------------------- MultiWorkerMirroredStrategy

MWMS_SIZES = {  # per-worker sizes of each step (the initialising one first)
    "custom/rank2/unequal": [[5, 2], [2, 2]],
    "custom/rank4/empty_chief": [[0, 3], [2, 2]],
    "keras_train_step/rank2/unequal": [[4, 1], [2, 2]],
    "keras_train_step/rank4/empty_second": [[2, 0], [2, 2]],
    "bijector/forward/unequal": [[2, 6], [2, 2]],
}


@pytest.mark.parametrize("name", list(MWMS_SIZES))
def test_multi_worker(multi_worker, name):
    """Two worker processes: both end with identical variables, equal to the
    single-device init on the union of their first batches (a second step changes
    nothing). keras_train_step: Keras' Model.train_step under strategy.run."""
    workers = [w[name] for w in multi_worker]
    for task, result in enumerate(workers):
        assert "error" not in result, f"worker {task}: {result.get('error')}"
        assert [[len(s) for s in step] for step in result["steps"]] == MWMS_SIZES[name]
        if "seen_sizes" in result:
            assert result["seen_sizes"] == [[sizes[task]] for sizes in MWMS_SIZES[name]]
    merged = dict(workers[0])
    merged["replicas"] = {k: workers[0]["replicas"][k] + workers[1]["replicas"][k]
                          for k in ("bias", "log_scale", "initialized")}
    merged["replicas"]["kinds"] = workers[0]["replicas"]["kinds"]
    assert workers[1]["replicas"]["kinds"] == workers[0]["replicas"]["kinds"]
    assert_scenario(merged, layer=not name.startswith("bijector/"))


@pytest.mark.parametrize("check", ["fit", "fit_build_workaround", "custom_xla"])
def test_multi_worker_known_failures_are_shared_by_stock_keras_layers(multi_worker, check):
    """Under MultiWorkerMirroredStrategy, Keras 3.15's model.fit fails for a stock
    Dense model (twice over: its symbolic build, then its per-replica metric
    reduction), and XLA cannot compile collectives on CPU: ActNorm alike."""
    for worker in multi_worker:
        assert_same_outcome_as_stock(worker["known_failures"], check, ("Dense",),
                                     SIGNATURES[f"mwms/{check}"])
