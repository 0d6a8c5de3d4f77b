"""Train a small model with ActNorm, export it as a SavedModel, serve it from another process.

``model.export`` writes a TensorFlow SavedModel with a ``serve`` endpoint: inference mode,
ActNorm's trained ``bias`` and ``log_scale`` baked in. The serving process below needs
TensorFlow only, not Keras model code and not ``tf_actnorm``; it answers JSON requests on
stdin, and its answers match the in-process model.

    python examples/serve_savedmodel.py [--quick] [--out DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import tf_actnorm  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="tiny run, for smoke tests")
parser.add_argument("--out", default=".", help="directory for serve_savedmodel.png")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)  # before training, so a bad --out fails fast
epochs = 2 if args.quick else 60
keras.utils.set_random_seed(0)

# --- A tiny regression in raw units (temperatures in kelvin); ActNorm handles the scale. ---
rng = np.random.default_rng(0)
x = rng.uniform(250, 350, (2000, 1)).astype("float32")
y = (np.sin((x - 300) / 12) + 0.1 * rng.normal(size=x.shape)).astype("float32")
model = keras.Sequential([
    keras.Input((1,)),
    tf_actnorm.ActNorm(),  # standardises the raw input on the first training batch
    keras.layers.Dense(64, activation="tanh"),
    keras.layers.Dense(64, use_bias=False),
    tf_actnorm.ActNorm(),
    keras.layers.Activation("tanh"),
    keras.layers.Dense(1),
])
model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
history = model.fit(x, y, batch_size=100, epochs=epochs, verbose=0)
print(f"trained {epochs} epochs, final MSE {history.history['loss'][-1]:.4f}")

# --- The serving process: TensorFlow only. One JSON list of inputs per line in, outputs out.
SERVER = """
import json, sys
import tensorflow as tf
served = tf.saved_model.load(sys.argv[1])
for line in sys.stdin:
    outputs = served.serve(tf.constant(json.loads(line), tf.float32))
    print(json.dumps(outputs.numpy().tolist()), flush=True)
print("server: tf_actnorm imported:", "tf_actnorm" in sys.modules, file=sys.stderr)
"""

requests = [np.linspace(250, 350, 200, dtype="float32")[:, None],
            rng.uniform(250, 350, (7, 1)).astype("float32"),
            np.array([[300.0]], "float32")]
with tempfile.TemporaryDirectory() as tmp:
    export_dir = os.path.join(tmp, "served_model")
    model.export(export_dir, verbose=False)
    server = subprocess.run(
        [sys.executable, "-c", SERVER, export_dir], check=True, text=True, capture_output=True,
        input="".join(json.dumps(r.tolist()) + "\n" for r in requests))
print(server.stderr.strip().splitlines()[-1])
answers = [np.array(json.loads(line), "float32") for line in server.stdout.splitlines()]

for request, answer in zip(requests, answers, strict=True):
    expected = model.predict(request, verbose=0)
    print(f"request of {len(request):3d}: max |served - in-process| = "
          f"{np.abs(answer - expected).max():.1e}")
    np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-5)
print("served outputs match the in-process model")

# --- Picture: data, in-process predictions, served predictions. ---
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.scatter(x[:500, 0], y[:500, 0], s=2, c="lightgray", label="training data")
in_process = model.predict(requests[0], verbose=0)
ax.plot(requests[0][:, 0], in_process[:, 0], lw=3, label="in-process model")
ax.plot(requests[0][::8, 0], answers[0][::8, 0], "o", ms=4, label="served (other process)")
ax.set(xlabel="temperature (K)", ylabel="y", title="model.export, served by a separate process")
ax.legend(fontsize=8)
fig.tight_layout()
path = os.path.join(args.out, "serve_savedmodel.png")
fig.savefig(path, dpi=80)
print(f"wrote {path}")
