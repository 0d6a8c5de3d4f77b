"""tf.distribute scenarios for ``tests/test_distribute.py``, run in a fresh process.

Each scenario needs TensorFlow configured before it initialises (logical CPU
devices, ``TF_CONFIG``), and several ``MirroredStrategy`` objects in one process
can collide on collective keys, so the test runs this script as a subprocess:

    python tests/_distribute_worker.py mirrored   # 2 logical CPUs, a MirroredStrategy
                                                  # (then run_single's 1-replica one)
    python tests/_distribute_worker.py single     # 1-device MirroredStrategy only
    python tests/_distribute_worker.py mwms       # one worker of a MultiWorkerMirroredStrategy
                                                  # (TF_CONFIG set by the caller)

It prints one line ``RESULT <json>``: for each scenario the data every replica
saw (so the test can recompute the truth independently with numpy), each
replica's component of ``bias`` / ``log_scale`` / ``initialized``, and the
single-device initialisation on the concatenated global batch; or the
scenario's error. A failing scenario does not stop the others.
"""

import json
import os
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CHANNELS = 3
# Per-example shapes (channels last) for rank-2 and rank-4 inputs.
EXAMPLE_SHAPE = {2: (CHANNELS,), 4: (3, 2, CHANNELS)}
LOC = (3.0, -1.0, 0.5)
SCALE = (2.0, 0.5, 1.0)


def make_shards(seed, sizes, rank):
    """One float32 array per replica, ``sizes[i]`` examples each (0 allowed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.normal(LOC, SCALE, (n, *EXAMPLE_SHAPE[rank])).astype(np.float32) for n in sizes]


def _error(exc):
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    where = "".join(traceback.format_tb(exc.__traceback__)[-4:])
    return {"error": f"{type(exc).__name__}: {text}", "where": where}


def _run(results, name, fn):
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        results[name] = _error(exc)
    results[name]["seconds"] = round(time.perf_counter() - start, 2)


def _components(strategy, variable):
    """Each local replica's component of a (possibly mirrored) variable, as lists."""
    import keras

    if isinstance(variable, keras.Variable):
        variable = variable.value  # the tf.Variable (a MirroredVariable under a strategy)
    return [c.numpy().tolist() for c in strategy.experimental_local_results(variable)]


def _kind(variable):
    """(class, synchronization, aggregation) of the tf.Variable behind ``variable``."""
    import keras

    if isinstance(variable, keras.Variable):
        variable = variable.value
    return [type(variable).__name__, variable.synchronization.name, variable.aggregation.name]


def _replica_state(strategy, obj):
    """Each local replica's ``bias`` / ``log_scale`` / ``initialized`` and the kinds of
    the variables behind them. For a layer (or a layer's bijector) the parameters in
    use are the data-dependent variable plus the trainable residual, added here per
    replica in float32 as the layer adds them; the residuals' kinds are listed too."""
    import numpy as np

    state_ = obj._state
    variables = {"bias": state_.initial_bias, "log_scale": state_.initial_log_scale,
                 "initialized": state_.initialized}
    state = {name: _components(strategy, v) for name, v in variables.items()}
    state["kinds"] = {name: _kind(v) for name, v in variables.items()}
    if state_.residuals is not None:
        for name, residual in zip(("bias", "log_scale"), state_.residuals):
            state[name] = [(np.float32(a) + np.float32(r)).tolist() for a, r in
                           zip(state[name], _components(strategy, residual), strict=True)]
            state["kinds"][f"{name}_residual"] = _kind(residual)
    return state


def _single_device_init(x, from_outputs=False):
    """ActNorm's own init on one device (no strategy) from the global batch ``x``."""
    import tf_actnorm

    if from_outputs:
        bijector = tf_actnorm.ActNormBijector(CHANNELS, init_from="inverse")
        bijector.inverse(x)
        params = bijector
    else:
        params = tf_actnorm.ActNorm()
        params(x, training=True)
    return {"bias": params.bias.numpy().tolist(), "log_scale": params.log_scale.numpy().tolist()}


def _concat(shards):
    import numpy as np

    return np.concatenate(shards, axis=0)


def _tolist(shards):
    return [s.tolist() for s in shards]


def _distribute(strategy, shards):
    """A PerReplica value: replica ``i`` gets ``shards[i]`` (any sizes, empty included)."""
    import tensorflow as tf

    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(shards[ctx.replica_id_in_sync_group]))


# --------------------------------------------------------------------------------------
# Scenarios. ``local`` is the list of replica ids this process holds; ``steps`` is a
# list of global batches, each a list of per-replica shards (all replicas).


def _model(rank, make_layer=None):
    import keras
    import tf_actnorm

    layer = make_layer() if make_layer else tf_actnorm.ActNorm()
    return keras.Sequential([keras.Input(EXAMPLE_SHAPE[rank]), layer])


def keras_build_workaround(model, strategy):
    """Test-only workaround for a Keras 3.15 bug, applied where a scenario says so.

    Under a strategy, ``model.fit`` first MEAN-reduces its first distributed batch
    across replicas (``TensorFlowTrainer._maybe_symbolic_build``) only to learn input
    shapes. That fails for every model, stock layers included (``known_failures``),
    when the first global batch splits unequally (AddN shape mismatch) and under
    MultiWorkerMirroredStrategy (PerReplica conversion error). This replacement
    takes the shapes from the largest local shard instead; training is untouched.
    """
    import tensorflow as tf

    def local_shard(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return max(strategy.experimental_local_results(value), key=lambda t: t.shape[0])
        return value

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(local_shard, next(it))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = maybe_symbolic_build


def _init_result(strategy, model, steps, seen, local, make_layer):
    """What every init scenario reports: the shards, their sizes as the replicas saw
    them, each replica's variables, and the single-device init of the first global batch."""
    return {
        "local": local,
        "steps": [_tolist(shards) for shards in steps],
        "seen_sizes": seen,
        "replicas": _replica_state(strategy, model.layers[0]) if make_layer is None else None,
        "single_device": _single_device_init(_concat(steps[0])),
    }


def custom_loop(strategy, steps, rank, local, jit_compile=False, make_layer=None):
    """Idiomatic custom loop: one tf.function around strategy.run, a GradientTape and
    an optimizer (SGD, learning rate 0, so the variables keep their initial values)."""
    import keras
    import tensorflow as tf

    with strategy.scope():
        model = _model(rank, make_layer)
        optimizer = keras.optimizers.SGD(learning_rate=0.0)

    def replica_step(x):
        with tf.GradientTape() as tape:
            y = model(x, training=True)
            loss = tf.reduce_sum(tf.square(y)) / 8.0
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return tf.shape(x)[0]

    @tf.function(jit_compile=jit_compile)
    def train_step(x):
        return strategy.run(replica_step, args=(x,))

    seen = []
    for shards in steps:
        sizes = train_step(_distribute(strategy, shards))
        seen.append([int(s) for s in strategy.experimental_local_results(sizes)])
    return _init_result(strategy, model, steps, seen, local, make_layer)


def initialize_mirrored(strategy, x, rank, source, in_scope):
    """``tf_actnorm.initialize`` on a model with mirrored variables, from several
    batches (a numpy array or a tf.data.Dataset), called in or outside
    ``strategy.scope()``: it runs in cross-replica context and writes every replica."""
    import contextlib

    import tensorflow as tf
    import tf_actnorm

    with strategy.scope():
        model = _model(rank)
    data = x if source == "numpy" else tf.data.Dataset.from_tensor_slices(x).batch(4)
    with strategy.scope() if in_scope else contextlib.nullcontext():
        summary = tf_actnorm.initialize(model, data, batch_size=4, verbose=0)
    result = _init_result(strategy, model, [[x]], None, [0, 1], None)
    result["summary"] = list(summary)
    return result


def fit_arrays(strategy, x, rank, batch_size, workaround=False):
    """model.fit (jit_compile=False) on numpy arrays: the strategy splits each global
    batch over the replicas, unequally for a partial batch (one replica may get none)."""
    import keras
    import numpy as np
    import tensorflow as tf

    with strategy.scope():
        model = _model(rank)
        model.compile(keras.optimizers.SGD(learning_rate=0.0), "mse", jit_compile=False)
    if workaround:
        keras_build_workaround(model, strategy)
    model.fit(x, np.zeros_like(x), batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    # What each replica gets of each global batch, split the way Keras splits it.
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(batch_size))
    steps = [[t.numpy() for t in strategy.experimental_local_results(batch)] for batch in dataset]
    return {
        "steps": [_tolist(shards) for shards in steps],
        "seen_sizes": [[len(s) for s in shards] for shards in steps],
        "replicas": _replica_state(strategy, model.layers[0]),
        "single_device": _single_device_init(_concat(steps[0])),
    }


def fit_from_function(strategy, steps, rank, local, workaround=False, jit_compile=False,
                      make_layer=None):
    """model.fit on ``distribute_datasets_from_function``: this process's replicas get
    exactly their shards of each step (unequal and empty ones included)."""
    import keras
    import numpy as np
    import tensorflow as tf

    spec = tf.TensorSpec((None, *EXAMPLE_SHAPE[rank]), tf.float32)

    def per_replica_batches():
        for shards in steps:
            for replica in local:
                yield shards[replica], np.zeros_like(shards[replica])

    def dataset_fn(_):
        return tf.data.Dataset.from_generator(per_replica_batches, output_signature=(spec, spec))

    with strategy.scope():
        model = _model(rank, make_layer)
        model.compile(keras.optimizers.SGD(learning_rate=0.0), "mse", jit_compile=jit_compile)
    if workaround:
        keras_build_workaround(model, strategy)
    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    seen = []
    for x, _ in dataset:
        seen.append([int(t.shape[0]) for t in strategy.experimental_local_results(x)])
    model.fit(dataset, epochs=1, verbose=0)
    return _init_result(strategy, model, steps, seen, local, make_layer)


def trains_like_single_device(strategy, steps, rank, local, learning_rate=0.1):
    """Initialisation, then SGD steps (learning rate > 0) with a loss normalised by
    the global batch: the replicas must follow a single-device model trained on the
    concatenated batches (the per-step all-reduces/assignments of the synchronised
    init path must not disturb training)."""
    import keras
    import numpy as np
    import tensorflow as tf

    with strategy.scope():
        model = _model(rank)
        optimizer = keras.optimizers.SGD(learning_rate=learning_rate)
    single = _model(rank)
    single_optimizer = keras.optimizers.SGD(learning_rate=learning_rate)

    def loss_fn(m, x, total):
        return tf.reduce_sum(tf.square(m(x, training=True) - 0.5)) / total

    def replica_step(x, total):
        with tf.GradientTape() as tape:
            loss = loss_fn(model, x, total)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def train_step(x, total):
        strategy.run(replica_step, args=(x, total))

    @tf.function
    def single_step(x, total):
        with tf.GradientTape() as tape:
            loss = loss_fn(single, x, total)
        grads = tape.gradient(loss, single.trainable_variables)
        single_optimizer.apply_gradients(zip(grads, single.trainable_variables))

    for shards in steps:
        total = tf.constant(float(sum(s.size for s in shards)))
        train_step(_distribute(strategy, shards), total)
        single_step(tf.constant(_concat(shards)), total)
    layer = single.layers[0]
    return {
        "local": local,
        "steps": [_tolist(shards) for shards in steps],
        "replicas": _replica_state(strategy, model.layers[0]),
        "single_device_init": _single_device_init(_concat(steps[0])),
        "single_device_trained": {"bias": layer.bias.numpy().tolist(),
                                  "log_scale": layer.log_scale.numpy().tolist()},
        "num_steps": len(steps),
        "learning_rate": float(np.float32(learning_rate)),
    }


def empty_global_batch(strategy, steps, rank, local):
    """A global batch with no examples on any replica raises InvalidArgumentError and
    changes nothing; the next (non-empty) one initialises."""
    import tensorflow as tf

    with strategy.scope():
        layer = _model(rank).layers[0]

    @tf.function
    def step(x):
        strategy.run(lambda v: layer(v, training=True), args=(x,))

    try:
        step(_distribute(strategy, steps[0]))
        raised = None
    except tf.errors.InvalidArgumentError as exc:
        raised = str(exc)
    after_empty = _replica_state(strategy, layer)
    step(_distribute(strategy, steps[1]))
    return {
        "local": local,
        "raised": raised,
        "after_empty": after_empty,
        # The initialising batch is the second one.
        "steps": [_tolist(shards) for shards in steps[1:]],
        "replicas": _replica_state(strategy, layer),
        "single_device": _single_device_init(_concat(steps[1])),
    }


def keras_train_step(strategy, steps, rank, local):
    """Keras' own ``Model.train_step`` (forward in training mode, loss, optimizer)
    run by ``strategy.run`` in a tf.function: what model.fit runs for each step,
    without fit's driver, which Keras 3.15 breaks under MultiWorkerMirroredStrategy
    for every model (see ``known_failures_mwms``)."""
    import keras
    import numpy as np
    import tensorflow as tf

    with strategy.scope():
        model = _model(rank)
        model.compile(keras.optimizers.SGD(learning_rate=0.0), "mse")
        # Build loss and optimizer state as fit does before its first step.
        dummy = np.zeros((1, *EXAMPLE_SHAPE[rank]), np.float32)
        model._symbolic_build(data_batch=(dummy, dummy))

    @tf.function
    def step(x):
        return strategy.run(lambda v: model.train_step((v, tf.zeros_like(v))), args=(x,))

    for shards in steps:
        step(_distribute(strategy, shards))
    return {
        "local": local,
        "steps": [_tolist(shards) for shards in steps],
        "replicas": _replica_state(strategy, model.layers[0]),
        "single_device": _single_device_init(_concat(steps[0])),
    }


def bijector_in_replica_context(strategy, steps, rank, local, direction="forward",
                                from_layer=False):
    """ActNormBijector.forward / .inverse called inside strategy.run (in a tf.function)."""
    import tensorflow as tf
    import tf_actnorm

    with strategy.scope():
        if from_layer:
            layer = tf_actnorm.ActNorm()
            layer.build((None, *EXAMPLE_SHAPE[rank]))
            bijector = layer.bijector
        else:
            bijector = tf_actnorm.ActNormBijector(CHANNELS, init_from=direction)

    @tf.function
    def step(x):
        return strategy.run(lambda v: getattr(bijector, direction)(v), args=(x,))

    for shards in steps:
        step(_distribute(strategy, shards))
    return {
        "local": local,
        "steps": [_tolist(shards) for shards in steps],
        "direction": direction,
        "replicas": _replica_state(strategy, bijector),
        "single_device": _single_device_init(_concat(steps[0]),
                                             from_outputs=direction == "inverse"),
    }


def checkpoint_cross_restore(strategy, directory, fmt):
    """A checkpoint written under the strategy restores on one device, and the other
    way round; the restored ``initialized`` flag stops a later training call from
    initialising again."""
    import tensorflow as tf

    rank = 2
    init_shards = make_shards(101, [5, 2], rank)
    other = make_shards(102, [4, 4], rank)

    def save(model, path):
        if fmt == "tf.train.Checkpoint":
            return tf.train.Checkpoint(model=model).write(path)
        model.save_weights(path + ".weights.h5")
        return path + ".weights.h5"

    def restore(model, path):
        if fmt == "tf.train.Checkpoint":
            tf.train.Checkpoint(model=model).read(path).assert_consumed()
        else:
            model.load_weights(path)

    # Mirrored -> single device.
    with strategy.scope():
        mirrored = _model(rank)

    @tf.function
    def mirrored_step(x):
        strategy.run(lambda v: mirrored(v, training=True), args=(x,))

    mirrored_step(_distribute(strategy, init_shards))
    path = save(mirrored, os.path.join(directory, "from_mirrored"))
    single = _model(rank)
    restore(single, path)
    restored_single = _replica_state(tf.distribute.get_strategy(), single.layers[0])
    single(_concat(other), training=True)  # must not initialise again
    after_single = _replica_state(tf.distribute.get_strategy(), single.layers[0])

    # Single device -> mirrored.
    single2 = _model(rank)
    single2(_concat(init_shards), training=True)
    path2 = save(single2, os.path.join(directory, "from_single"))
    with strategy.scope():
        mirrored2 = _model(rank)
    restore(mirrored2, path2)
    restored_mirrored = _replica_state(strategy, mirrored2.layers[0])

    @tf.function
    def mirrored2_step(x):
        strategy.run(lambda v: mirrored2(v, training=True), args=(x,))

    mirrored2_step(_distribute(strategy, other))  # must not initialise again
    return {
        "steps": [_tolist(init_shards)],
        "source_mirrored": _replica_state(strategy, mirrored.layers[0]),
        "restored_single": restored_single,
        "after_training_call_single": after_single,
        "source_single": _replica_state(tf.distribute.get_strategy(), single2.layers[0]),
        "restored_mirrored": restored_mirrored,
        "after_training_call_mirrored": _replica_state(strategy, mirrored2.layers[0]),
    }


STOCK_LAYERS = ("BatchNormalization", "Dense")


def _make_layer(name):
    import keras
    import tf_actnorm

    if name == "ActNorm":
        return tf_actnorm.ActNorm()
    if name == "Dense":
        return keras.layers.Dense(CHANNELS)
    return getattr(keras.layers, name)()


def _outcome(fn):
    try:
        fn()
        return {"ok": True}
    except Exception as exc:  # noqa: BLE001
        return _error(exc)


def known_failures_mirrored(strategy):
    """What fails for stock Keras layers too, tried for ActNorm and for them alike
    (MirroredStrategy, 2 logical CPUs):

    * ``fit_xla``/``custom_xla``: ``jit_compile=True``, in fit (equal batches, with
      the build workaround) and in a custom loop;
    * ``fit_unequal_first_batch``: model.fit whose *first* global batch splits
      unequally over the replicas, without ``keras_build_workaround``.
    """
    local = [0, 1]
    equal = make_shards(201, [4, 4], 2)
    unequal_first = make_shards(202, [2, 1], 2)
    out = {}
    for name in ("ActNorm", *STOCK_LAYERS):
        make = lambda name=name: _make_layer(name)  # noqa: E731
        out[f"fit_xla/{name}"] = _outcome(
            lambda: fit_from_function(strategy, [equal], 2, local, workaround=True,
                                      jit_compile=True, make_layer=make))
        out[f"custom_xla/{name}"] = _outcome(
            lambda: custom_loop(strategy, [equal], 2, local, jit_compile=True, make_layer=make))
        out[f"fit_unequal_first_batch/{name}"] = _outcome(
            lambda: fit_from_function(strategy, [unequal_first], 2, local, make_layer=make))
    return out


def known_failures_mwms(strategy, task):
    """As ``known_failures_mirrored``, under MultiWorkerMirroredStrategy (equal
    batches, no XLA unless named):

    * ``fit``: model.fit at all;
    * ``fit_build_workaround``: model.fit with ``keras_build_workaround``;
    * ``custom_xla``: a custom loop with ``jit_compile=True``.
    """
    local = [task]
    equal = make_shards(501, [2, 2], 2)
    out = {}
    for name in ("ActNorm", "Dense"):
        make = lambda name=name: _make_layer(name)  # noqa: E731
        out[f"fit/{name}"] = _outcome(
            lambda: fit_from_function(strategy, [equal], 2, local, make_layer=make))
        out[f"fit_build_workaround/{name}"] = _outcome(
            lambda: fit_from_function(strategy, [equal], 2, local, workaround=True,
                                      make_layer=make))
        out[f"custom_xla/{name}"] = _outcome(
            lambda: custom_loop(strategy, [equal], 2, local, jit_compile=True, make_layer=make))
    return out


# --------------------------------------------------------------------------------------

SPLITS = {"equal": [4, 4], "unequal": [5, 2], "empty_first": [0, 6], "empty_second": [7, 0]}


def run_mirrored():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    local = [0, 1]
    results = {"num_replicas_in_sync": strategy.num_replicas_in_sync}
    seed = 0
    for rank in (2, 4):
        for split, sizes in SPLITS.items():
            seed += 1
            # Step 1 initialises; step 2 (other data) must change nothing.
            steps = [make_shards(seed, sizes, rank), make_shards(seed + 50, [3, 3], rank)]
            _run(results, f"custom/rank{rank}/{split}",
                 lambda: custom_loop(strategy, steps, rank, local))
        # model.fit initialised by an unequal / one-empty global batch (needs the
        # Keras build workaround, see keras_build_workaround), then an equal one.
        for split in ("unequal", "empty_first"):
            seed += 1
            steps = [make_shards(seed, SPLITS[split], rank), make_shards(seed + 50, [3, 3], rank)]
            _run(results, f"fit_from_function/rank{rank}/{split}",
                 lambda: fit_from_function(strategy, steps, rank, local, workaround=True))
        # model.fit on numpy arrays, global batch 8. Plain Keras: 8 + 1 examples ->
        # (4, 4) initialises, then a final partial batch (1, 0). With the workaround:
        # 3 examples -> the only, partial, batch (2, 1) initialises.
        seed += 1
        x = make_shards(seed, [9], rank)[0]
        _run(results, f"fit_arrays/rank{rank}/then_empty",
             lambda: fit_arrays(strategy, x, rank, batch_size=8))
        seed += 1
        x = make_shards(seed, [3], rank)[0]
        _run(results, f"fit_arrays/rank{rank}/partial",
             lambda: fit_arrays(strategy, x, rank, batch_size=8, workaround=True))
    for source in ("numpy", "dataset"):
        for in_scope in (False, True):
            seed += 1
            x = make_shards(seed, [11], 4)[0]
            _run(results, f"initialize/{source}/{'in_scope' if in_scope else 'outside_scope'}",
                 lambda: initialize_mirrored(strategy, x, 4, source, in_scope))
    for name, kwargs, sizes, rank in (
            ("bijector/forward/unequal", {}, [5, 2], 2),
            ("bijector/forward/empty_first", {}, [0, 4], 2),
            ("bijector/forward/rank4", {}, [1, 3], 4),
            ("bijector/inverse/unequal", {"direction": "inverse"}, [2, 5], 2),
            ("bijector/from_layer/unequal", {"from_layer": True}, [6, 1], 2)):
        seed += 1
        steps = [make_shards(seed, sizes, rank), make_shards(seed + 50, [3, 3], rank)]
        _run(results, name,
             lambda: bijector_in_replica_context(strategy, steps, rank, local, **kwargs))
    for rank, sizes in ((2, [[5, 2], [0, 4], [3, 3]]), (4, [[1, 3], [2, 0], [2, 2]])):
        seed += 1
        steps = [make_shards(seed + 10 * i, s, rank) for i, s in enumerate(sizes)]
        _run(results, f"trains_like_single_device/rank{rank}",
             lambda: trains_like_single_device(strategy, steps, rank, local))
    with tempfile.TemporaryDirectory() as directory:
        for fmt in ("tf.train.Checkpoint", "keras.weights.h5"):
            _run(results, f"checkpoint/{fmt}",
                 lambda: checkpoint_cross_restore(strategy, directory, fmt))
    # Last: the failing compilations must not disturb the scenarios above.
    _run(results, "known_failures", lambda: known_failures_mirrored(strategy))
    # Very last: the failing step aborts a collective.
    steps = [make_shards(601, [0, 0], 2), make_shards(602, [3, 2], 2)]
    _run(results, "custom/all_empty_then_init",
         lambda: empty_global_batch(strategy, steps, 2, local))
    # A second, 1-replica MirroredStrategy (no collectives, so no key collisions).
    results["single_replica"] = run_single()
    return results


def run_single():
    """A 1-replica MirroredStrategy (e.g. one GPU): mirrored variables, replica context."""
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    results = {"num_replicas_in_sync": strategy.num_replicas_in_sync}
    steps = [make_shards(301, [6], 2), make_shards(302, [4], 2)]
    _run(results, "custom/rank2", lambda: custom_loop(strategy, steps, 2, [0]))
    x = make_shards(303, [5], 4)[0]
    _run(results, "fit_arrays/rank4", lambda: fit_arrays(strategy, x, 4, batch_size=8))
    _run(results, "bijector/forward",
         lambda: bijector_in_replica_context(strategy, steps, 2, [0]))
    return results


MWMS_SCENARIOS = {
    # name: (rank, per-worker sizes of the initialising step); a second step of
    # (2, 2) examples follows and must change nothing.
    "custom/rank2/unequal": (2, [5, 2]),
    "custom/rank4/empty_chief": (4, [0, 3]),
    "keras_train_step/rank2/unequal": (2, [4, 1]),
    "keras_train_step/rank4/empty_second": (4, [2, 0]),
    "bijector/forward/unequal": (2, [2, 6]),
}


def run_mwms():
    import tensorflow as tf

    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    results = {"task": task, "num_replicas_in_sync": strategy.num_replicas_in_sync}
    local = [task]
    for seed, (name, (rank, sizes)) in enumerate(MWMS_SCENARIOS.items(), start=401):
        steps = [make_shards(seed, sizes, rank), make_shards(seed + 50, [2, 2], rank)]
        kind = name.split("/")[0]
        if kind == "custom":
            fn = lambda: custom_loop(strategy, steps, rank, local)  # noqa: E731
        elif kind == "keras_train_step":
            fn = lambda: keras_train_step(strategy, steps, rank, local)  # noqa: E731
        else:
            fn = lambda: bijector_in_replica_context(strategy, steps, rank, local)  # noqa: E731
        _run(results, name, fn)
    _run(results, "known_failures", lambda: known_failures_mwms(strategy, task))
    return results


def main():
    mode = sys.argv[1]
    results = {"mirrored": run_mirrored, "single": run_single, "mwms": run_mwms}[mode]()
    sys.stdout.write("RESULT " + json.dumps(results) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: TensorFlow's collective/gRPC runtime can abort
    # while shutting down (seen: "corrupted double-linked list", SIGABRT).
    os._exit(0)


if __name__ == "__main__":
    main()
