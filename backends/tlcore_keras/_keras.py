"""The one place the Keras backend imports Keras, after making sure Keras will run on TensorFlow.

Keras 3 picks its backend from ``KERAS_BACKEND`` when it is first imported, once per process. If
Keras is not imported yet, this module sets ``KERAS_BACKEND=tensorflow`` (warning when it
overrides another value); if Keras was already imported with another backend, it raises
:class:`tlcore_keras.KerasBackendError` instead of letting Keras fail later with an obscure error.

Example:
    >>> from tlcore_keras._keras import keras, tf   # doctest: +SKIP
    >>> keras.backend.backend()                      # doctest: +SKIP
    'tensorflow'
"""
from __future__ import annotations

import os
import sys
import warnings

from tlcore.native_libs import load_triton_first

from . import KerasBackendError

if "torch" in sys.modules and "tensorflow" not in sys.modules:
    load_triton_first()  # before TensorFlow's LLVM is loaded globally (see tlcore.native_libs)

if "keras" not in sys.modules:
    _requested = os.environ.get("KERAS_BACKEND")
    if _requested not in (None, "", "tensorflow"):
        warnings.warn(f"tlcore's keras backend runs Keras on TensorFlow: KERAS_BACKEND={_requested!r} is "
                      "overridden with 'tensorflow' for this process (Keras was not imported yet)",
                      RuntimeWarning, stacklevel=2)
    os.environ["KERAS_BACKEND"] = "tensorflow"

# TensorFlow's tf.lite imports jax whenever it is installed; block that optional import while Keras
# and TensorFlow load, so that using the Keras backend never imports JAX (it stays importable later).
_block_jax = "jax" not in sys.modules
if _block_jax:
    sys.modules["jax"] = None  # type: ignore[assignment]  # `import jax` now raises ModuleNotFoundError
try:
    import keras  # noqa: E402
    import tensorflow as tf  # noqa: E402
finally:
    if _block_jax and sys.modules.get("jax", ...) is None:
        del sys.modules["jax"]

if keras.backend.backend() != "tensorflow":
    raise KerasBackendError(
        f"Keras was already imported with the {keras.backend.backend()!r} backend, but tlcore's 'keras' "
        "backend needs Keras on TensorFlow, and Keras reads KERAS_BACKEND only once, at its first import. "
        "In a new Python process, set KERAS_BACKEND=tensorflow before importing keras, or call "
        "tl.get_backend('keras') before anything imports keras.")

from keras.src.layers.core.input_layer import InputLayer  # noqa: E402
from keras.src.models.functional import Functional  # noqa: E402

Sequential = keras.Sequential

__all__ = ["keras", "tf", "Functional", "Sequential", "InputLayer"]
