"""The ActNorm Keras layer (TensorFlow, JAX and PyTorch backends)."""

import contextvars
import warnings
import weakref

import keras
from keras import ops
# Keras has no public way to ask which forward pass is running; these two name it:
# the stateless scope of `stateless_call` (JAX's `fit`), else the call context that the
# outermost `Layer.__call__` opens and closes.
from keras.src.backend.common import global_state
from keras.src.backend.common.stateless_scope import get_stateless_scope

from tf_actnorm import _backend
from tf_actnorm import _checks
from tf_actnorm import _ops


# While set (by `tf_actnorm.initialize`), a callable ``collect(layer, inputs, mask)``
# that every ActNorm call hands its inputs to, instead of initialising itself.
moments_collector = contextvars.ContextVar("tf_actnorm_moments_collector", default=None)


def _current_forward_pass():
    """An object that stays the same for the whole of one forward pass (None outside)."""
    scope = get_stateless_scope()
    if scope is not None:
        return scope
    return global_state.get_global_attribute("current_call_ctx")


class _FirstTrainingCall:
    """The first training-mode call of a forward pass: which pass (a weak reference),
    whether it initialised the layer (``_backend``'s ``initialized_by_call``),
    and whether a later call of the pass has already reported it."""

    def __init__(self, forward_pass, initialized):
        self.forward_pass = weakref.ref(forward_pass)
        self.initialized = initialized
        self.reported = False


@keras.saving.register_keras_serializable(package="tf_actnorm")
class ActNorm(keras.layers.Layer):
    """Activation Normalization (Kingma & Dhariwal, 2018, "Glow").

    A per-channel affine transform ``y = s * (x + b)`` with ``s = exp(log_scale)``,
    whose parameters are initialised from the data: on the first call in training
    mode (``model.fit``, a ``train_step``, or ``layer(x, training=True)``),
    ``b = -mean_c`` and ``s = 1 / (std_c + epsilon)`` are computed from that batch
    (over every axis but ``axis``), so its output has zero mean and unit variance
    per channel. As for ``BatchNormalization``, a call with ``training`` unset
    outside a training context is inference, and a frozen layer
    (``trainable = False``) never initialises: its state never changes. After that,
    ``b`` and ``log_scale`` train like ordinary weights (see "Weights" below); the
    output of one example never depends on the rest of the batch, and training and
    inference compute the same function.

    Initialisation happens once: a saved, non-trainable ``initialized`` weight
    guards it, so restored models never re-initialise. Under a
    ``tf.distribute`` strategy or ``keras.distribution.DataParallel`` (JAX) the
    statistics are those of the global batch.
    The transform is invertible (``inverse``) with an O(C) log-determinant
    (``forward_log_det_jacobian``); ``bijector`` views the layer as a TFP bijector
    sharing its variables (TensorFlow backend).

    Weights: ``bias`` and ``log_scale`` (read-only properties, shape ``[C]``) are
    the parameters in use, each the sum of a non-trainable, data-dependent part
    (``initial_bias``, ``initial_log_scale``: what initialisation writes) and a
    trainable residual that starts at zero (``bias_residual``,
    ``log_scale_residual``: what the optimizer moves). On JAX, ``fit`` is a pure
    function that returns new values only for non-trainable variables, so this is
    the layout that lets the first training batch initialise there; all backends
    use it, so weights and ``.keras`` files are the same everywhere. Gradients,
    and so plain SGD/Adam updates, are those of training ``bias``/``log_scale``
    directly; weight decay pulls the residuals towards zero, i.e. the parameters
    towards their data-dependent values. ``.keras``/``.weights.h5`` files of the
    earlier three-weight layout (``bias``, ``log_scale``, ``initialized``) load
    into this one.

    Args:
        axis: Integer, the channel axis (``-1`` for channels-last, ``1`` for
            channels-first). Inputs have rank 2 to 5 (``[B, C]``, ``[B, T, C]``,
            ``[B, H, W, C]``, ``[B, T, H, W, C]`` or their channels-first forms).
        epsilon: Small float added to the standard deviation at initialisation,
            so a constant channel gets the finite scale ``1 / epsilon``.
        **kwargs: Base layer keyword arguments (``name``, ``dtype``, ...).

    Call arguments:
        inputs: Floating-point input tensor.
        training: Python boolean or ``None``. ``True`` (training mode)
            initialises if that has not happened yet and the layer is
            trainable; ``False`` and ``None`` (inference: ``predict``,
            ``evaluate``, ``model.export``) never do. Keras sets it inside
            ``fit`` and passes it down to nested layers.
        mask: Optional boolean mask of shape ``inputs.shape`` without the channel
            axis (e.g. ``[B, T]``); only unmasked positions enter the initial
            statistics. The mask is passed through.

    Example:

    ```python
    images = np.random.uniform(0, 255, (64, 32, 32, 3)).astype("float32")
    labels = np.random.randint(0, 10, 64)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(16, 3),
        tf_actnorm.ActNorm(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images, labels, epochs=1)  # the first training batch initialises ActNorm
    ```
    """

    def __init__(self, axis=-1, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(axis, int):
            raise TypeError(f"{self.name}: `axis` must be an int, got {axis!r}")
        if not epsilon > 0:
            raise ValueError(f"{self.name}: `epsilon` must be positive, got {epsilon!r}")
        self.axis = axis
        self.epsilon = float(epsilon)
        self.supports_masking = True
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self._first_training_call = None
        self._warned_repeated_calls = False

    def build(self, input_shape):
        rank = len(input_shape)
        if not 2 <= rank <= 5:
            raise ValueError(
                f"{self.name}: expected an input of rank 2 to 5 ([B, C] ... [B, T, H, W, C]), "
                f"got shape {tuple(input_shape)}")
        if not -rank <= self.axis < rank or self.axis % rank == 0:
            raise ValueError(
                f"{self.name}: axis={self.axis} is not a channel axis of an input of shape "
                f"{tuple(input_shape)} (axis 0 is the batch)")
        channels = input_shape[self.axis]
        if channels is None:
            raise ValueError(
                f"{self.name}: the channel axis {self.axis} of input shape {tuple(input_shape)} "
                "must be known")
        self.input_spec = keras.layers.InputSpec(ndim=rank, axes={self.axis: channels})
        # Trainable residuals first: Keras saves trainable, then non-trainable weights.
        # Under tf.distribute, "mean" for values every replica computes identically
        # and "only_first_replica" for the flag (see README, distributed training).
        self.bias_residual = self.add_weight(
            shape=(channels,), name="bias_residual", initializer="zeros",
            autocast=False, aggregation="mean")
        self.log_scale_residual = self.add_weight(
            shape=(channels,), name="log_scale_residual", initializer="zeros",
            autocast=False, aggregation="mean")
        self.initial_bias = self.add_weight(
            shape=(channels,), name="initial_bias", initializer="zeros",
            trainable=False, autocast=False, aggregation="mean")
        self.initial_log_scale = self.add_weight(
            shape=(channels,), name="initial_log_scale", initializer="zeros",
            trainable=False, autocast=False, aggregation="mean")
        self.initialized = self.add_weight(
            shape=(), name="initialized", initializer="zeros", dtype="bool",
            trainable=False, autocast=False, aggregation="only_first_replica")

    @property
    def bias(self):
        """The bias in use, ``initial_bias + bias_residual`` (a tensor, shape [C])."""
        return self.initial_bias.value + self.bias_residual.value

    @property
    def log_scale(self):
        """The log-scale in use, ``initial_log_scale + log_scale_residual`` (shape [C])."""
        return self.initial_log_scale.value + self.log_scale_residual.value

    @property
    def _state(self):
        # Made from the variables on each use, never captured in `build`: a layer built
        # while Keras traces a parent layer that has no `build` (a stateless scope) gets
        # its variables only after that trace.
        return _ops.State.of_layer(self)

    def __call__(self, inputs, *args, **kwargs):
        dtype = getattr(inputs, "dtype", None)
        if dtype is not None and "float" not in keras.backend.standardize_dtype(dtype):
            raise TypeError(
                f"{self.name}: expected floating-point inputs, got dtype {dtype}")
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        collect = moments_collector.get()
        if collect is not None:
            collect(self, inputs, mask)
        elif self.trainable and training is not None and training is not False:
            # Keras' rule (BatchNormalization's): only training mode changes state, and
            # a frozen layer never does. `training` may be a bool tensor.
            self._maybe_initialize(inputs, mask, training)
        elif _backend.kernels().exporting():
            # The same refusal as a TensorFlow SavedModel's (`_trackable_children`): a
            # Python check while the export traces, which adds nothing to the graph.
            self._state.check_exportable()
        return _ops.forward(inputs, self.bias, self.log_scale, self.axis)

    def _maybe_initialize(self, inputs, mask, training):
        """Initialise unless initialised, and warn (once) when one forward pass calls the
        layer several times in training mode (``TimeDistributed`` calls ``call`` once per
        step; a shared layer is called once per use) and the first call initialised it:
        its statistics are those of the first call's inputs only.

        Eagerly, whether the first call initialised is known when a later call comes
        (read only then). In a traced step (a ``tf.function``, ``jax.jit``) it is a
        tensor: TensorFlow decides at trace time from the flag's current value; JAX warns
        from a host callback that runs only in the step that initialises.
        """
        kernels = _backend.kernels()
        state = self._state
        forward_pass = _current_forward_pass()
        first = self._first_training_call
        if forward_pass is not None and first is not None and first.forward_pass() is forward_pass:
            if not (first.reported or self._warned_repeated_calls):
                first.reported = True
                kernels.run_if(first.initialized, self._warn_repeated_calls)
            state.maybe_initialize(inputs, mask, enabled=training)  # initialised: reads the flag
            return
        initialized = kernels.initialized_by_call(
            state, state.maybe_initialize(inputs, mask, enabled=training))
        self._first_training_call = (
            None if forward_pass is None else _FirstTrainingCall(forward_pass, initialized))

    def _warn_repeated_calls(self):
        if self._warned_repeated_calls:
            return
        self._warned_repeated_calls = True
        warnings.warn(
            f"ActNorm '{self.name}' is called more than once in one forward pass (inside "
            "`TimeDistributed`, or as a shared layer), and its initialisation used the first "
            "of these calls only: the outputs of the other calls are not standardised. To "
            "initialise it from the inputs of every call, run "
            "`tf_actnorm.initialize(model, data)` before training.",
            UserWarning, stacklevel=2)

    def inverse(self, outputs):
        """``x = outputs / s - b``: the exact inverse of the layer (never initialises)."""
        self._check_input(outputs)
        outputs = ops.convert_to_tensor(outputs, self.compute_dtype)
        return _ops.inverse(outputs, self.bias, self.log_scale, self.axis)

    def forward_log_det_jacobian(self, inputs, mask=None):
        """``log|det dy/dx|`` per example, shape ``[batch]``.

        Equals (number of positions that share a channel) * sum(log_scale); with a
        mask, only that example's unmasked positions are counted. O(C): ``inputs``
        only provides its shape. It reads the current ``log_scale`` and never
        initialises: call the layer on the batch first in training mode (as a flow's
        training step does) so that an uninitialised layer initialises before its
        log-det is taken.
        """
        self._check_input(inputs)
        return _ops.log_det(self.log_scale, inputs, mask, self.axis)

    def _check_input(self, x):
        # `__call__` checks its input against `input_spec`; these methods bypass it.
        if not self.built:
            raise ValueError(
                f"{self.name}: build the layer (call it once, or `layer.build(shape)`) "
                "before `inverse` or `forward_log_det_jacobian`")
        _checks.check_input(_checks.static_shape(x), self.axis, int(self.initial_bias.shape[0]),
                            self.name, rank=self.input_spec.ndim)

    def reset_initialization(self):
        """Re-arm data-dependent initialisation: the next training call initialises again."""
        self.initialized.assign(False)

    def load_own_variables(self, store):
        # Files written before the residual layout hold three weights: bias,
        # log_scale, initialized. They become the data-dependent part, exactly.
        if self.built and len(store.keys()) == 3:
            self.initial_bias.assign(store["0"])
            self.initial_log_scale.assign(store["1"])
            self.initialized.assign(store["2"])
            for residual in (self.bias_residual, self.log_scale_residual):
                residual.assign(ops.zeros(residual.shape, residual.dtype))
            return
        super().load_own_variables(store)

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        # Writing a SavedModel (`model.export`, `tf.saved_model.save`) of a layer that
        # was never initialised raises: it would serve an identity. Checkpoints pass.
        if save_type == "savedmodel" and self.built:
            self._state.check_exportable()
        return super()._trackable_children(save_type, **kwargs)

    @property
    def bijector(self):
        """A TFP :class:`tf_actnorm.ActNormBijector` sharing this layer's variables
        (TensorFlow backend only)."""
        if keras.backend.backend() != "tensorflow":
            raise NotImplementedError(
                f"{self.name}: `bijector` is a TensorFlow Probability bijector and needs "
                f"the TensorFlow Keras backend (KERAS_BACKEND=tensorflow); the backend is "
                f"{keras.backend.backend()!r}")
        from tf_actnorm.bijector import ActNormBijector  # noqa: PLC0415 (avoids a cycle)

        return ActNormBijector.from_layer(self)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        config = super().get_config()
        config.update({"axis": self.axis, "epsilon": self.epsilon})
        return config
