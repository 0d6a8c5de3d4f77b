"""Models whose forward pass calls one ActNorm layer several times, for the TensorFlow
suite and the JAX/PyTorch sub-suite alike (Keras and numpy only)."""

import warnings

import keras
import numpy as np

import tf_actnorm


def step_data(rng, batch=64, steps=6, channels=8):
    """``[batch, steps, channels]`` whose steps have very different means and stds, so
    statistics of the first step alone are far from those of all steps."""
    loc = 3.0 * np.arange(steps)[None, :, None]
    scale = (1.0 + np.arange(steps))[None, :, None]
    return (rng.normal(size=(batch, steps, channels)) * scale + loc).astype("float32")


def model(kind, name="an"):
    """``time_distributed``: ``TimeDistributed(ActNorm)``, whose ``call`` runs once per
    step. ``shared``: one ActNorm applied to the first and the second half of the steps,
    outputs concatenated along the steps. Inputs ``[batch, 6, 8]``."""
    layer = tf_actnorm.ActNorm(name=name)
    inputs = keras.Input((6, 8))
    if kind == "time_distributed":
        outputs = keras.layers.TimeDistributed(layer)(inputs)
    else:
        first = keras.layers.Cropping1D((0, 3))(inputs)
        second = keras.layers.Cropping1D((3, 0))(inputs)
        outputs = keras.layers.Concatenate(axis=1)([layer(first), layer(second)])
    return keras.Model(inputs, outputs), layer


def warnings_of(layer_name, record):
    return [w for w in record if f"ActNorm '{layer_name}' is called more than once" in str(w.message)]


def training_calls_warn_once(kind, x, fit=False):
    """Two training forward passes (direct calls, or a compiled ``fit`` of two batches):
    the messages about the repeated calls, and the layer."""
    net, layer = model(kind)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if fit:
            head = keras.Sequential([net, keras.layers.Flatten(), keras.layers.Dense(1)])
            head.compile(keras.optimizers.SGD(0.0), "mse",
                         jit_compile=keras.backend.backend() == "jax")
            head.fit(x, x[:, 0, :1], batch_size=len(x) // 2, shuffle=False, verbose=0)
            if keras.backend.backend() == "jax":
                import jax  # noqa: PLC0415

                jax.effects_barrier()  # JAX warns from a host callback: let it run here
        else:
            net(x, training=True)
            net(x, training=True)
    return warnings_of(layer.name, record), layer


def initialize_standardises_every_step(kind, x):
    """``tf_actnorm.initialize`` counts every call: the outputs over all steps have
    per-channel mean 0 and std 1, and the parameters are numpy's on all steps."""
    from tests.util import numpy_init  # noqa: PLC0415

    net, layer = model(kind)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tf_actnorm.initialize(net, x, batch_size=16, verbose=0)
    assert not warnings_of(layer.name, record)
    bias, log_scale = numpy_init(x.reshape(-1, x.shape[-1]))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.bias), bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.log_scale), log_scale,
                               rtol=1e-5, atol=1e-5)
    y = keras.ops.convert_to_numpy(net(x)).reshape(-1, x.shape[-1])
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.std(0), 1.0, rtol=1e-4)


def initialised_layer_fit_warnings(kind, x):
    """The messages of a compiled ``fit`` of a model whose layer is already initialised
    (restored, or initialised by ``initialize``): there should be none."""
    net, layer = model(kind)
    tf_actnorm.initialize(net, x, verbose=0)
    head = keras.Sequential([net, keras.layers.Flatten(), keras.layers.Dense(1)])
    head.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=keras.backend.backend() == "jax")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        head.fit(x, x[:, 0, :1], batch_size=len(x) // 2, shuffle=False, verbose=0)
        if keras.backend.backend() == "jax":
            import jax  # noqa: PLC0415

            jax.effects_barrier()
    return warnings_of(layer.name, record)
