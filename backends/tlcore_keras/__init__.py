"""tlcore's Keras (TensorFlow) backend. Importing this package imports neither Keras nor
TensorFlow; ``backend.py`` does (through ``_keras.py``, which first makes sure Keras runs on
TensorFlow)."""
from tlcore.errors import TlcoreError
from tlcore.registry import BackendSpec

SPEC = BackendSpec(name="keras", target="tlcore_keras.backend:KerasBackend",
                   requires=("tensorflow", "keras"), roots=("keras",))


class KerasBackendError(TlcoreError, RuntimeError):
    """Keras was already imported with a backend other than TensorFlow (``KERAS_BACKEND``)."""


__all__ = ["SPEC", "KerasBackendError"]
