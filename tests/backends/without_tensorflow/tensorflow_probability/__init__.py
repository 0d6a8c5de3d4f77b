# Put first on PYTHONPATH by tests/test_backends.py: the backend sub-suite runs as if only
# the jax or torch extra were installed, so any import of tensorflow_probability on those paths fails.
raise ImportError("tensorflow_probability is blocked in the backend sub-suite (tests/backends/without_tensorflow)")
