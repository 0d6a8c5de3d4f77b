"""ActNorm as a TensorFlow Probability bijector."""

import contextvars
import warnings

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from keras import ops
from tensorflow_probability.python.internal import parameter_properties

from tf_actnorm import _checks
from tf_actnorm import _formulas
from tf_actnorm import _ops
from tf_actnorm import _tf_backend


INIT_FROM = ("forward", "inverse", "either")

# While set (by `tf_actnorm.initialize` streaming data through a flow), a callable
# `intercept(bijector, data, from_outputs)` that sees every ActNormBijector call instead of
# the bijector's own initialisation; it returns the ops to run first and the tensor that
# the call transforms. A context variable, as the Keras layer's `moments_collector`.
call_interceptor = contextvars.ContextVar("tf_actnorm_call_interceptor", default=None)


class ActNormBijector(tfp.bijectors.Bijector):
    """Activation Normalization as a bijector: ``Y = g(X) = s * (X + b)``.

    Per channel (the event axis ``axis``), with ``s = exp(log_scale)``:

    ```none
    forward:   Y = s * (X + b)
    inverse:   X = Y / s - b
    log|det J| = N * sum_c log s_c
    ```

    where ``N`` is the number of positions in one event that share a channel
    (1 for a ``[C]`` event, ``H * W`` for an ``[H, W, C]`` event). The Jacobian is
    constant in ``X``, and the log-determinant costs O(C).

    Data-dependent initialisation, from the direction named by ``init_from``:

    * ``"forward"`` (default): the first ``forward`` call standardises its input, i.e.
      sets ``b = -mean``, ``s = 1 / (std + epsilon)`` from that batch. This is the
      layer's and Glow's direction (data in, normalised data out). In a
      ``TransformedDistribution``, put it in ``tfb.Invert(...)`` (as in
      ``tfb.Invert(tfb.Chain([..., ActNormBijector(c)]))``): ``log_prob(data)`` then
      runs it forward on the data, and ``sample()`` runs it inverse.
    * ``"inverse"``: the first ``inverse`` call makes its output standardised,
      ``s = std(Y) + epsilon``, ``b = mean(Y) / s``: for a bijector that data reaches
      through ``inverse``, such as one used without ``tfb.Invert`` in a
      ``TransformedDistribution`` (``log_prob`` calls the bijector's inverse).
    * ``"either"``: whichever of the four entry points (``forward``, ``inverse``,
      their log-dets) comes first initialises, in its direction: TFP's glow
      ``ActivationNormalization`` behaviour. In a flow, ``flow.sample()`` before
      training then initialises from the flow's own samples.

    Why an explicit direction: a bijector cannot tell whether a call carries data or
    the flow's own samples, and "the first call decides" lets ``flow.sample()``
    before training initialise from samples. So only the ``init_from`` direction's
    value call (``forward`` or ``inverse``) initialises. A value call in the other
    direction while uninitialised (e.g. sampling the untrained flow) runs with the
    never-initialised parameters (the identity for a new bijector), changes nothing,
    and warns (a ``UserWarning``; inside a ``tf.function``, when traced); the first
    call on data then initialises, as it would have without the sampling.
    Log-determinants never initialise, except with ``"either"``
    (``TransformedDistribution.log_prob`` calls the value first).
    ``tf_actnorm.initialize(flow, data)`` initialises every ActNorm of a flow from
    many batches, whatever ``init_from`` says: it follows the data through
    ``log_prob``.

    Two ways to build one: ``ActNormBijector(num_channels, ...)`` owns its
    variables; ``ActNormBijector.from_layer(layer)`` (or ``layer.bijector``) shares a
    built :class:`tf_actnorm.ActNorm` layer's ``bias``, ``log_scale`` and
    ``initialized`` variables, so training or initialising either changes both.

    Every entry point (``forward``, ``inverse`` and both log-dets) raises
    ``ValueError`` naming the bijector, before building any op, on an input whose
    static rank is below the event rank or whose static channel size is not
    ``num_channels``.

    Its batch shape is ``[]``: ``bias`` and ``log_scale`` are one ``[C]``
    event-shaped parameter each (``parameter_properties``). ``bijector[...]`` and
    ``copy()`` give an equal bijector sharing the variables; any other slice raises
    ``ValueError`` (a stock bijector of batch shape ``[]`` cannot be indexed either,
    and a batch of ActNorms would need a batch of variables).

    Args:
        num_channels: Python int, the size C of the channel axis.
        axis: Negative int, the channel axis counted from the end of the event
            (``-1`` channels-last, ``-3`` for a channels-first ``[C, H, W]`` image).
            ``forward_min_event_ndims`` is ``-axis``.
        epsilon: Small float added to the standard deviation at initialisation.
        validate_args: Python bool; adds checks that the parameters are finite.
            (Initialisation always checks its data: empty or non-finite batches
            raise ``ValueError`` (eagerly; ``InvalidArgumentError`` inside a
            ``tf.function``) and leave the variables unchanged.
            Under XLA, which drops assertions, neither builds any.)
        dtype: Dtype of the variables (standalone only).
        name: Python str name.
        init_from: ``"forward"`` (default), ``"inverse"`` or ``"either"``: the
            direction whose first call initialises (see above).

    Example:

    ```python
    flow = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2)),
        bijector=tfb.Invert(tf_actnorm.ActNormBijector(2)))
    flow.sample(8)        # inverse direction: no initialisation (a warning)
    flow.log_prob(data)   # forward on `data`: the first call initialises from it
    ```
    """

    def __init__(self, num_channels=None, axis=-1, epsilon=1e-6, validate_args=False,
                 dtype=tf.float32, name="act_norm", init_from="forward", _state=None):
        parameters = dict(locals())
        if init_from not in INIT_FROM:
            raise ValueError(
                f"{name}: `init_from` must be one of {', '.join(map(repr, INIT_FROM))}, "
                f"got {init_from!r}")
        if not isinstance(axis, int) or axis >= 0:
            raise ValueError(
                f"{name}: `axis` must be a negative int counted from the end of the event, got {axis!r}")
        if keras.backend.backend() != "tensorflow":
            raise NotImplementedError(
                f"{name}: ActNormBijector is a TensorFlow Probability bijector and needs the "
                f"TensorFlow Keras backend (KERAS_BACKEND=tensorflow); the backend is "
                f"{keras.backend.backend()!r}")
        with tf.name_scope(name) as scope_name:
            if _state is None:
                if not isinstance(num_channels, int) or num_channels <= 0:
                    raise ValueError(
                        f"{name}: `num_channels` must be a positive int, got {num_channels!r}")
                _state = _new_state(num_channels, axis, epsilon, dtype, name)
            self._state = _state
            # `copy()` (and so slicing) rebuilds from `parameters`: the copy shares these
            # variables. It also makes TFP's input/output cache, shared by bijectors with
            # equal parameters, tell apart two bijectors built with the same arguments.
            parameters["_state"] = _state
            self._channels = int(_state.initial_bias.shape[0])
            # Attributes that tf.Module tracks as this bijector's variables (a layer's
            # bijector also tracks the layer's trainable residuals: see ActNormState).
            self._bias = _state.initial_bias
            self._log_scale = _state.initial_log_scale
            self._initialized = _state.initialized
            self._residuals = _state.residuals
            self._axis = axis
            self._epsilon = epsilon
            self._init_from = init_from
            super().__init__(
                forward_min_event_ndims=-axis,
                is_constant_jacobian=True,
                validate_args=validate_args,
                dtype=_state.bias.dtype,
                parameters=parameters,
                name=scope_name)

    @classmethod
    def from_layer(cls, layer, validate_args=False, name=None, init_from="forward"):
        """A bijector sharing a built ``ActNorm`` layer's variables.

        ``init_from`` as for the constructor; the default, ``"forward"``, is the
        layer's own direction (its calls standardise their inputs)."""
        if not layer.built:
            raise ValueError(
                f"{layer.name}: build the layer (call it once, or `layer.build(shape)`) "
                "before taking its bijector")
        rank = layer.input_spec.ndim
        # The TensorFlow variables under the layer's, which this tf.Module tracks.
        state = _ops.State.of_layer(layer, variable=lambda v: v.value)
        state.axis = layer.axis % rank - rank
        state.can_initialize = lambda: layer.trainable  # a frozen layer never changes
        return cls(num_channels=int(layer.initial_bias.shape[0]), axis=state.axis,
                   epsilon=layer.epsilon, validate_args=validate_args,
                   name=name or layer.name, init_from=init_from, _state=state)

    @property
    def bias(self):
        return self._state.bias

    @property
    def log_scale(self):
        return self._state.log_scale

    @property
    def initialized(self):
        return self._initialized

    @property
    def axis(self):
        return self._axis

    @property
    def init_from(self):
        """The direction whose first call initialises: "forward", "inverse" or "either"."""
        return self._init_from

    def reset_initialization(self):
        """Re-arm data-dependent initialisation."""
        self._state.reset()

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        # Writing a SavedModel of a never-initialised bijector raises: its served
        # forward/inverse would initialise, i.e. change state, on the first call.
        if save_type == "savedmodel":
            self._state.check_exportable()
        return super()._trackable_children(save_type, **kwargs)

    @classmethod
    def _parameter_properties(cls, dtype):
        # Both are [C] vectors that define one transformation of an event of rank
        # `forward_min_event_ndims` (like `tfb.ScaleMatvecDiag.scale_diag`): batch
        # shape []. Unconstrained reals (`log_scale` is a log), so the default
        # (identity) constraining bijector. `shape_fn` cannot see an instance's
        # `axis`: it gives C for the default channels-last event.
        def properties():
            return parameter_properties.ParameterProperties(
                event_ndims=1, shape_fn=lambda event_shape: event_shape[-1:])

        return {"bias": properties(), "log_scale": properties()}

    def __getitem__(self, slices):
        # Batch shape [] and one set of variables: TFP's slicing would copy this
        # bijector for any slice (its parameters hold no batch dimension to slice),
        # silently ignoring `[0]` or `[tf.newaxis]`. Only the identity slice exists.
        parts = slices if isinstance(slices, tuple) else (slices,)
        if any(part is not Ellipsis for part in parts):
            raise ValueError(
                f"{self.name}: an ActNormBijector has batch shape [] (one set of variables), "
                f"so `bijector[...]` is its only slice; got {slices!r}")
        return super().__getitem__(slices)

    def _check_input(self, x):
        _checks.check_input(_checks.static_shape(x), self._axis, self._channels, self.name,
                            min_rank=-self._axis)

    def forward(self, x, name="forward", **kwargs):
        self._check_input(x)
        return super().forward(x, name, **kwargs)

    def inverse(self, y, name="inverse", **kwargs):
        self._check_input(y)
        return super().inverse(y, name, **kwargs)

    def forward_log_det_jacobian(self, x, event_ndims=None, name="forward_log_det_jacobian",
                                 **kwargs):
        return self._sum_over_event(super().forward_log_det_jacobian, x, event_ndims, name, **kwargs)

    def inverse_log_det_jacobian(self, y, event_ndims=None, name="inverse_log_det_jacobian",
                                 **kwargs):
        return self._sum_over_event(super().inverse_log_det_jacobian, y, event_ndims, name, **kwargs)

    def _sum_over_event(self, log_det_fn, t, event_ndims, name, **kwargs):
        """``log_det_fn`` at ``event_ndims``, as the minimal-event value times the size of
        the extra event dimensions when that size is known (see ``_extra_event_size``)."""
        self._check_input(t)
        size = self._extra_event_size(t, event_ndims)
        if size is None:
            return log_det_fn(t, event_ndims, name, **kwargs)
        ldj = log_det_fn(t, self.forward_min_event_ndims, name, **kwargs)
        return ldj * tf.cast(size, ldj.dtype)

    def _extra_event_size(self, x, event_ndims):
        """Number of elements in the event dimensions beyond the minimal ones, or None.

        TFP sums a log-det over such dimensions by broadcasting it to their shape
        (``tf.ones([H, W]) * ldj`` for an [H, W, C] event): O(H·W). The log-det is the
        same at every position, so multiplying by their size gives the same sum in
        O(1). Only for a static ``event_ndims`` and rank; anything else (including
        invalid ``event_ndims``) goes to TFP unchanged.
        """
        if isinstance(event_ndims, bool) or not isinstance(event_ndims, (int, np.integer)):
            return None
        x = tf.convert_to_tensor(x)
        rank = x.shape.rank
        low = self.forward_min_event_ndims
        if rank is None or not low < event_ndims <= rank:
            return None
        return tf.reduce_prod(tf.shape(x)[rank - event_ndims:rank - low])

    def _init_then(self, data, from_outputs, fn, value_call=True):
        """``fn(data)``, after initialising from ``data`` if this call may initialise.

        ``from_outputs``: the call is in the inverse direction (``data`` are outputs).
        ``value_call``: ``forward``/``inverse``, not a log-det.
        """
        intercept = call_interceptor.get()
        if intercept is not None:  # tf_actnorm.initialize is streaming data through
            ops, data = intercept(self, data, from_outputs)
            with tf.control_dependencies(ops):
                return fn(data)
        if self._init_from == "either" or (
                value_call and from_outputs == (self._init_from == "inverse")):
            initialized = self._state.maybe_initialize(data, from_outputs=from_outputs)
            with tf.control_dependencies([initialized]):
                return fn(data)
        if value_call and from_outputs != (self._init_from == "inverse"):
            self._warn_if_uninitialized("inverse" if from_outputs else "forward")
        return fn(data)

    def _warn_if_uninitialized(self, direction):
        """Warns that a call in the direction that does not initialise found the
        bijector uninitialised (read now, or at trace time inside a function)."""
        if _tf_backend.serving() or not self._state.can_initialize():
            return
        if self._state.stored_initialized():
            return
        warnings.warn(
            f"ActNormBijector '{self.name}' was called in the {direction} direction before "
            f"initialisation (init_from={self._init_from!r}): it runs with its "
            "never-initialised parameters (the identity for a new bijector) and does not "
            f"initialise from these values. Initialise it from data first: "
            "`tf_actnorm.initialize(flow, data)`, or a call in the "
            f"{'forward' if direction == 'inverse' else 'inverse'} direction on data. If data "
            f"reaches this bijector through {direction} (e.g. it is used without tfb.Invert "
            f"in a TransformedDistribution, whose log_prob calls the inverse), build it with "
            f"init_from={direction!r}; init_from='either' initialises from whichever "
            "direction comes first (TFP's glow ActivationNormalization).",
            UserWarning, stacklevel=2)

    def _forward(self, x):
        return self._init_then(
            x, False, lambda t: _ops.forward(t, self.bias, self.log_scale, self._axis))

    def _inverse(self, y):
        return self._init_then(
            y, True, lambda t: _ops.inverse(t, self.bias, self.log_scale, self._axis))

    def _forward_log_det_jacobian(self, x):
        return self._init_then(x, False, self._event_log_det, value_call=False)

    def _inverse_log_det_jacobian(self, y):
        return self._init_then(y, True, lambda t: -self._event_log_det(t), value_call=False)

    def _event_log_det(self, x):
        # Positions sharing a channel inside the minimal event; TFP multiplies by the
        # size of any further event dimensions.
        event_shape = tf.shape(x)[tf.rank(x) + self._axis:]
        positions = tf.reduce_prod(event_shape) // event_shape[0]
        return _formulas.log_det(ops, ops.convert_to_tensor(self.log_scale), positions)

    def _parameter_control_dependencies(self, is_init):
        if not self.validate_args or is_init or _checks.in_xla_context():
            return []
        return [
            tf.debugging.assert_all_finite(self.log_scale, f"{self.name}: log_scale is not finite"),
            tf.debugging.assert_all_finite(self.bias, f"{self.name}: bias is not finite"),
        ]


def _new_state(num_channels, axis, epsilon, dtype, name):
    # Aggregations as the layer's: under a tf.distribute strategy the variables are
    # mirrored and assigned in replica context (see _ops.State); outside one they are
    # plain variables and the arguments change nothing.
    def variable(value, aggregation, **kwargs):
        return tf.Variable(value, synchronization=tf.VariableSynchronization.ON_WRITE,
                           aggregation=aggregation, **kwargs)

    mean = tf.VariableAggregation.MEAN
    return _ops.State(
        variable(tf.zeros([num_channels], dtype), mean, name="bias"),
        variable(tf.zeros([num_channels], dtype), mean, name="log_scale"),
        variable(False, tf.VariableAggregation.ONLY_FIRST_REPLICA, trainable=False,
                 name="initialized"),
        axis, epsilon, name)
