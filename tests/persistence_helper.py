"""Subprocess side of tests/test_persistence.py; each stage runs in its own Python process.

    python tests/persistence_helper.py train DIR   # train, save, export; record in-memory truths
    python tests/persistence_helper.py fresh DIR   # a fresh process: loads, serves, resumes

``train`` writes ``DIR/model.keras``, ``DIR/ckpt`` (model + optimizer), ``DIR/export``
(``model.export``), ``DIR/bijector`` (``tf.saved_model.save`` of a ``tf.Module``) and
``DIR/train.npz``; ``fresh`` writes ``DIR/fresh.npz``. Both stages enable op determinism
and fix seeds, so that N steps + save + load + M steps can be compared with N + M
uninterrupted steps.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402
import tf_actnorm  # noqa: E402  (registers ActNorm: no custom_objects when loading)

SEED = 7
N_STEPS, M_STEPS, BATCH = 3, 3, 8
CHANNELS = 3
LAYERS = ("act_in", "act_mid")


def make_model():
    """A tiny model with two ActNorm layers: one on a rank-3 input, one after a Dense."""
    model = keras.Sequential([
        keras.Input((4, CHANNELS)),
        tf_actnorm.ActNorm(name="act_in"),
        keras.layers.Dense(5, name="dense_in"),
        tf_actnorm.ActNorm(name="act_mid"),
        keras.layers.Flatten(),
        keras.layers.Dense(2, name="dense_out"),
    ], name="net")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def data():
    """N batches from one distribution, then M batches with very different statistics
    (a resumed model that re-initialised on them would drift far from the reference)."""
    rng = np.random.default_rng(SEED)
    n, m = N_STEPS * BATCH, M_STEPS * BATCH
    x = np.concatenate([rng.normal(5.0, 3.0, (n, 4, CHANNELS)),
                        rng.normal(-40.0, 25.0, (m, 4, CHANNELS))]).astype("float32")
    y = rng.normal(size=(n + m, 2)).astype("float32")
    new = rng.normal(100.0, 50.0, (6, 4, CHANNELS)).astype("float32")  # unseen, unlike training
    return x, y, new


def fit(model, x, y):
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)


def weights(model):
    return {f"w_{i}": np.array(w) for i, w in enumerate(model.get_weights())}


def prefixed(prefix, arrays):
    return {f"{prefix}{k}": v for k, v in arrays.items()}


class BijectorModule(tf.Module):
    """Serves an (already initialised) ActNormBijector's forward, inverse and log-det."""

    def __init__(self, bijector):
        super().__init__()
        self.bijector = bijector

    @tf.function(input_signature=[tf.TensorSpec([None, CHANNELS], tf.float32)])
    def forward(self, x):
        return self.bijector.forward(x)

    @tf.function(input_signature=[tf.TensorSpec([None, CHANNELS], tf.float32)])
    def inverse(self, y):
        return self.bijector.inverse(y)

    @tf.function(input_signature=[tf.TensorSpec([None, CHANNELS], tf.float32)])
    def forward_log_det_jacobian(self, x):
        return self.bijector.forward_log_det_jacobian(x, event_ndims=1)


def all_variables(obj):
    """Every variable reachable from a loaded SavedModel object, sorted by name."""
    found = {id(v): v for v in tf.train.TrackableView(obj).descendants()
             if isinstance(v, tf.Variable)}
    return sorted(found.values(), key=lambda v: v.name)


def variables(obj):
    return [np.array(v.numpy()) for v in all_variables(obj)]


def train(out):
    tf.config.experimental.enable_op_determinism()
    x, y, new = data()
    n = N_STEPS * BATCH
    result = {}

    keras.utils.set_random_seed(SEED)
    model = make_model()
    result.update(prefixed("initial_", weights(model)))
    fit(model, x[:n], y[:n])
    model.save(os.path.join(out, "model.keras"))
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(os.path.join(out, "ckpt"))
    model.export(os.path.join(out, "export"), verbose=False)
    result.update(prefixed("after_n_", weights(model)))
    result["weight_paths"] = np.array([w.path for w in model.weights])
    result["weight_trainable"] = np.array([w.trainable for w in model.weights])
    result["predict_new"] = model.predict(new, verbose=0)
    result["call_new"] = model(new, training=False).numpy()

    bijector = tf_actnorm.ActNormBijector(CHANNELS, name="flow_actnorm")
    bijector.forward(x[:n, 0])  # initialises
    module = BijectorModule(bijector)
    tf.saved_model.save(module, os.path.join(out, "bijector"), signatures={
        "forward": module.forward, "inverse": module.inverse,
        "forward_log_det_jacobian": module.forward_log_det_jacobian})
    result["bij_bias"] = bijector.bias.numpy()
    result["bij_log_scale"] = bijector.log_scale.numpy()
    result["bij_forward"] = bijector.forward(new[:, 0]).numpy()
    result["bij_inverse"] = bijector.inverse(new[:, 0]).numpy()
    result["bij_fldj"] = bijector.forward_log_det_jacobian(new[:, 0], event_ndims=1).numpy()

    keras.utils.set_random_seed(SEED)
    reference = make_model()  # N + M steps, uninterrupted
    result.update(prefixed("ref_initial_", weights(reference)))
    fit(reference, x, y)
    result.update(prefixed("ref_", weights(reference)))
    np.savez(os.path.join(out, "train.npz"), **result)


def fresh(out):
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(SEED)
    x, y, new = data()
    n = N_STEPS * BATCH
    result = {}

    # .keras: no custom_objects.
    loaded = keras.models.load_model(os.path.join(out, "model.keras"))
    result["keras_types"] = np.array([type(loaded.get_layer(name)).__name__ for name in LAYERS])
    result["keras_initialized"] = np.array(
        [bool(loaded.get_layer(name).initialized.numpy()) for name in LAYERS])
    result.update(prefixed("keras_loaded_", weights(loaded)))
    result["keras_predict_new"] = loaded.predict(new, verbose=0)
    fit(loaded, x[n:], y[n:])  # resume from .keras (optimizer state included)
    result.update(prefixed("keras_resumed_", weights(loaded)))

    # Checkpoint with optimizer state, into a model built from code.
    model = make_model()
    model.optimizer.build(model.trainable_variables)
    status = tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(
        os.path.join(out, "ckpt"))
    status.assert_consumed()
    result["ckpt_initialized"] = np.array(
        [bool(model.get_layer(name).initialized.numpy()) for name in LAYERS])
    result["ckpt_iterations"] = np.array(model.optimizer.iterations.numpy())
    fit(model, x[n:], y[n:])
    result.update(prefixed("ckpt_resumed_", weights(model)))

    # model.export artifact: serve on new data, variables snapshotted around the calls.
    served = tf.saved_model.load(os.path.join(out, "export"))
    before = variables(served)
    result["export_var_names"] = np.array([v.name for v in all_variables(served)])
    result.update(prefixed("export_vars_", dict(enumerate(before))))
    result["export_serve_new"] = served.serve(tf.constant(new)).numpy()
    sig = served.signatures["serving_default"]
    result["export_signature_new"] = next(iter(sig(tf.constant(new)).values())).numpy()
    served.serve(tf.constant(x))  # more new data, any statistics
    result["export_unchanged"] = np.array(
        all(np.array_equal(a, b) for a, b in zip(before, variables(served))))

    # Bijector tf.Module: methods and signatures.
    flow = tf.saved_model.load(os.path.join(out, "bijector"))
    before = variables(flow)
    z = tf.constant(new[:, 0])
    result["bij_forward"] = flow.forward(z).numpy()
    result["bij_inverse"] = flow.inverse(z).numpy()
    result["bij_fldj"] = flow.forward_log_det_jacobian(z).numpy()
    result["bij_sig_forward"] = next(iter(flow.signatures["forward"](x=z).values())).numpy()
    result["bij_sig_inverse"] = next(iter(flow.signatures["inverse"](y=z).values())).numpy()
    result["bij_sig_fldj"] = next(iter(
        flow.signatures["forward_log_det_jacobian"](x=z).values())).numpy()
    flow.forward(tf.constant(x[:, 0] * 10.0))
    flow.inverse(tf.constant(x[:, 1] - 3.0))
    result["bij_var_names"] = np.array([v.name for v in all_variables(flow)])
    result["bij_unchanged"] = np.array(
        all(np.array_equal(a, b) for a, b in zip(before, variables(flow))))
    np.savez(os.path.join(out, "fresh.npz"), **result)


if __name__ == "__main__":
    stage, directory = sys.argv[1:]
    {"train": train, "fresh": fresh}[stage](directory)
