"""ActNorm's variables and its once-only, data-dependent initialisation.

The Keras layer and the TFP bijector each hold one :class:`ActNormState` (the
bijector made from a layer shares the layer's variables), so the initialisation
logic exists once.

How the "init once" guard is built, and why:

* Single device: ``tf.cond(initialized, no-op, init)``. Once initialised only the
  predicate is read; the statistics are never computed again (XLA included).
* Replica context of a strategy with several replicas: all-reduces and mirrored
  assignments use ``merge_call``, which TensorFlow refuses inside ``tf.cond``
  branches. So only the per-replica partial sums are computed inside conds
  (zeros once initialised); the all-reduces and the assignments sit outside,
  every call, selecting the old values once initialised.
* Bad data (empty batch, NaN/Inf): nothing is assigned; eager code raises
  ``ValueError`` naming the owner, a traced function an ``InvalidArgumentError``
  with the same message (from assertions that run before the assignments). XLA
  compiles assertions away, so the assignment itself also keeps the old values and
  leaves ``initialized`` False when the statistics are invalid: state never changes on
  bad data, under XLA too.
"""

import tensorflow as tf
from tensorflow.python.saved_model import save_context

from tf_actnorm import _checks
from tf_actnorm import _math
from tf_actnorm import _stats


class ActNormState:
    """``bias``, ``log_scale`` (shape [C]) and the scalar bool ``initialized``.

    Holds raw ``tf.Variable`` objects (or distributed ones), so that several
    owners can share them. ``bias`` / ``log_scale`` are the variables that
    initialisation assigns. With ``residuals`` (a pair of trainable variables, the
    Keras layer's layout, see ``tf_actnorm.layer``) the parameters are
    ``bias + residuals[0]`` and ``log_scale + residuals[1]``: initialisation then
    assigns ``value - residual`` and never writes the residuals, as on JAX, where
    Keras drops assignments to trainable variables made inside ``fit``.
    """

    def __init__(self, bias, log_scale, initialized, axis, epsilon, name, residuals=None):
        self.initial_bias = bias
        self.initial_log_scale = log_scale
        self.residuals = residuals
        self.initialized = initialized
        self.axis = axis
        self.epsilon = epsilon
        self.name = name
        # A bijector made from a layer asks the layer: a frozen layer never initialises.
        self.can_initialize = lambda: True

    @property
    def bias(self):
        """The bias in use: a variable, or (with residuals) a tensor read now."""
        if self.residuals is None:
            return self.initial_bias
        return self.initial_bias + self.residuals[0]

    @property
    def log_scale(self):
        """The log-scale in use: a variable, or (with residuals) a tensor read now."""
        if self.residuals is None:
            return self.initial_log_scale
        return self.initial_log_scale + self.residuals[1]

    def maybe_initialize(self, data, mask=None, from_outputs=False, enabled=True):
        """Initialise from ``data`` unless already initialised.

        ``from_outputs=False``: ``data`` are inputs, and ``forward(data)`` is to be
        standardised. ``from_outputs=True``: ``data`` are outputs, and
        ``inverse(data)`` is to be standardised. ``enabled`` (a bool or a scalar
        bool tensor) gates initialisation, e.g. by the training flag.
        Returns a bool tensor to put control dependencies on.
        """
        if not self.can_initialize() or save_context.in_save_context():
            # Functions traced while writing a SavedModel serve: no init branch, no
            # variable writes (TFLite and ONNX cannot convert them). Saving an
            # uninitialised ActNorm raises (`check_exportable`), so nothing is lost.
            return tf.constant(False)
        needed = tf.logical_not(self.initialized)
        if enabled is not True:
            needed = tf.logical_and(needed, tf.cast(enabled, tf.bool))
        if _stats.replica_context() is not None:
            return self._initialize_synchronized(data, mask, from_outputs, needed)
        return tf.cond(
            needed,
            lambda: self.assign_from_moments(_stats.moments(data, self.axis, mask), from_outputs),
            lambda: tf.constant(False),
        )

    def _initialize_synchronized(self, data, mask, from_outputs, needed):
        moments = _stats.moments(data, self.axis, mask, gate=needed)
        return self.assign_from_moments(moments, from_outputs, needed=needed)

    def assign_from_moments(self, moments, from_outputs=False, needed=True):
        """Assign the parameters that standardise data with these moments; leaves
        everything unchanged (and raises, outside XLA) when they are invalid."""
        valid = _stats.is_valid(moments)
        if tf.executing_eagerly():
            # Eager code raises a plain ValueError, as on the other Keras backends.
            if bool(needed) and not bool(valid):
                raise ValueError(
                    _checks.cannot_initialise(self.name, bool(_stats.has_data(moments))))
            checks = []
        else:
            checks = _stats.check(moments, self.name, enabled=needed)
        init = _math.init_from_outputs if from_outputs else _math.init_from_inputs
        with tf.control_dependencies(checks):
            values = init(moments.mean, _stats.variance(moments), self.epsilon)
            update = tf.logical_and(valid, needed)
            assigned = []
            for i, (variable, value) in enumerate(
                    zip((self.initial_bias, self.initial_log_scale), values)):
                value = tf.cast(value, variable.dtype)
                if self.residuals is not None:
                    value -= self.residuals[i]
                assigned.append(variable.assign(tf.where(update, value, variable)))
            with tf.control_dependencies(assigned):
                return tf.identity(self.initialized.assign(tf.logical_or(self.initialized, update)))

    def reset(self):
        """Re-arm: the next eligible call initialises again."""
        self.initialized.assign(False)

    def stored_initialized(self):
        """The flag's stored value, read outside any trace. False for a flag created in
        the ``tf.function`` being traced (a layer first built there): it holds no value
        until that function runs, and it starts False."""
        return stored_flag(self.initialized)

    def check_exportable(self):
        """Raise ``ValueError`` naming the owner if it was never initialised.

        Called when a SavedModel is written (``model.export``,
        ``tf.saved_model.save``): an uninitialised ActNorm would serve an identity
        transform, or initialise (mutate) inside a served function. Checkpoints and
        ``.keras`` files are not affected: saving mid-training state is legitimate.
        """
        if not self.stored_initialized():
            raise _checks.never_initialised_for_export(self.name)


def stored_flag(variable):
    """See :meth:`ActNormState.stored_initialized`."""
    with tf.init_scope():
        return bool(tf.compat.v1.is_variable_initialized(variable)) and bool(variable.numpy())
