"""The one place the Keras backend imports Keras (after making sure Keras will run on TensorFlow),
and the one place it uses Keras' private API (the functions at the bottom: every other module of the
backend calls only public Keras and these).

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

from tlcore.native_libs import guard_triton

from . import KerasBackendError

guard_triton()  # a later import of Triton (by torch) must not bind to TensorFlow's LLVM (tlcore.native_libs)

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

from keras.src.backend.common.stateless_scope import in_stateless_scope  # noqa: E402
from keras.src.layers.core.input_layer import InputLayer  # noqa: E402
from keras.src.models.functional import Functional  # noqa: E402

Sequential = keras.Sequential

__all__ = ["keras", "tf", "Functional", "Sequential", "InputLayer", "in_stateless_scope", "tracked_layers",
           "flatten_layers", "own_variables", "seed_generators", "graph_nodes", "run_through_graph",
           "variable_index"]


# ---------------------------------------------------------------------------- private Keras API
def tracked_layers(layer: keras.layers.Layer) -> list:
    """The sub-layers a layer tracks, in creation order (a subclassed model's layers)."""
    return list(getattr(layer, "_layers", []))


def flatten_layers(model: keras.layers.Layer) -> list:
    """Every layer below ``model``, recursively."""
    return list(model._flatten_layers(include_self=False))


def own_variables(layer: keras.layers.Layer) -> tuple[list, list]:
    """(trainable, non-trainable) variables a layer created itself, not its sub-layers'; "trainable"
    as created, whatever ``trainable`` flags were set since."""
    return list(layer._trainable_variables), list(layer._non_trainable_variables)


def seed_generators(layer: keras.layers.Layer) -> list:
    """The ``SeedGenerator``s of a layer (Dropout and other random layers)."""
    return list(getattr(layer, "_seed_generators", None) or [])


def graph_nodes(graph: keras.layers.Layer, layer: keras.layers.Layer) -> list:
    """The calls (nodes) of ``layer`` that belong to the graph model ``graph``."""
    if isinstance(graph, Sequential):
        graph = graph._functional
    keys = graph._nodes
    return [n for i, n in enumerate(layer._inbound_nodes) if f"{id(layer)}_ib-{i}" in keys]


def run_through_graph(model: keras.Model, inputs: list, operation_fn):
    """Call a functional model's graph on ``inputs``, each layer replaced by ``operation_fn(layer)``."""
    return model._run_through_graph(inputs, operation_fn=operation_fn)


def variable_index(optimizer: keras.optimizers.Optimizer, variable) -> int:
    """The position of ``variable`` among those the optimizer was built on."""
    return optimizer._get_variable_index(variable)
