"""tlcore's Keras (TensorFlow) backend. Importing this package imports neither Keras nor
TensorFlow; ``backend.py`` does (through ``_keras.py``, which first makes sure Keras runs on
TensorFlow)."""
from tlcore.errors import OptimizerConfigError, TlcoreError
from tlcore.registry import BackendSpec

SPEC = BackendSpec(name="keras", target="tlcore_keras.backend:KerasBackend",
                   requires=("tensorflow", "keras"), roots=("keras",))


class KerasBackendError(TlcoreError, RuntimeError):
    """Keras was already imported with a backend other than TensorFlow (``KERAS_BACKEND``)."""


class PrecisionNotSupportedError(OptimizerConfigError):
    """``fit(precision=...)`` asked for a precision this TensorFlow build cannot compute on this
    device (an operation of the model has no kernel for it); catch it as ``tl.OptimizerConfigError``."""


__all__ = ["SPEC", "KerasBackendError", "PrecisionNotSupportedError"]
