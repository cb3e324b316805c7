"""The one place the Keras backend imports Keras (after making sure Keras will run on TensorFlow),
and the one place it uses Keras' private API (the functions at the bottom: every other module of the
backend calls only public Keras and these). :func:`state_copy` copies a model that Keras cannot
re-create from its config attribute by attribute (as ``copy.deepcopy`` copies an ``nn.Module``); it
sets ``KerasSaveable.__deepcopy__`` for the duration of the copy only.

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

import contextlib
import copy
import os
import sys
import types
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
from keras.src.saving.keras_saveable import KerasSaveable  # noqa: E402
from keras.src.utils.tracking import DotNotTrackScope, Tracker  # noqa: E402

Sequential = keras.Sequential

__all__ = ["keras", "tf", "Functional", "Sequential", "InputLayer", "in_stateless_scope", "tracked_layers",
           "flatten_layers", "own_variables", "seed_generators", "graph_nodes", "run_through_graph",
           "variable_index", "state_copy", "replace_tracked_layer", "call_takes_training", "dense_kernel",
           "unlocked_tracker", "untrack", "call_flat"]


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


def call_flat(fn, tensors: list, args: tuple):
    """``fn(*args)`` for the concrete function ``fn``, called with ``tensors``, its inputs already
    flattened (variables as their handles): TensorFlow's private ``ConcreteFunction._call_flat``
    skips binding the structured arguments (about 1 us per input instead of 4 through the public
    call, which is used where it is missing)."""
    flat = getattr(fn, "_call_flat", None)
    if flat is None:
        return fn(*args)
    return flat(tensors, fn.captured_inputs)


def call_takes_training(layer: keras.layers.Layer) -> bool:
    """True when the layer's ``call`` takes a ``training`` argument."""
    return bool(getattr(layer, "_call_has_training_arg", False))


def dense_kernel(layer: keras.layers.Dense):
    """A Dense layer's own kernel variable (its ``kernel`` property adds an enabled LoRA's delta)."""
    return layer._kernel


@contextlib.contextmanager
def unlocked_tracker(layer: keras.layers.Layer):
    """Lets a built layer (whose tracker Keras locks) take new variables or seed generators for a
    while, as ``Dense.enable_lora`` does."""
    locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        yield
    finally:
        if locked:
            layer._tracker.lock()


def untrack(layer: keras.layers.Layer, value) -> None:
    """Stop ``layer`` tracking ``value`` (e.g. a seed generator about to be deleted)."""
    layer._tracker.untrack(value)


def replace_tracked_layer(parent: keras.layers.Layer, old: keras.layers.Layer, new: keras.layers.Layer) -> int:
    """Replace every reference of ``parent`` to its sub-layer ``old`` (attributes, and the items of
    lists, tuples and dicts held in attributes) by ``new``, and ``old`` by ``new`` among the layers
    ``parent`` tracks; return how many references were replaced (0: ``old`` was not found)."""
    def swap(value):
        if value is old:
            return new, 1
        if isinstance(value, (list, tuple)):
            items = [swap(v) for v in value]
            count = sum(c for _, c in items)
            if count and isinstance(value, list):
                for i, (v, _) in enumerate(items):
                    list.__setitem__(value, i, v)  # the tracked list stays the same object
                return value, count
            return (type(value)(v for v, _ in items) if count else value), count
        if isinstance(value, dict):
            count = 0
            for k, v in list(value.items()):
                v2, c = swap(v)
                if c:
                    dict.__setitem__(value, k, v2)
                    count += c
            return value, count
        return value, 0

    total = 0
    for name, value in list(vars(parent).items()):
        if name == "_layers" or name.startswith("_self_") or name == "_tracker":
            continue
        replaced, count = swap(value)
        if count:
            object.__setattr__(parent, name, replaced)
            total += count
    tracker = getattr(parent, "_tracker", None)
    if total and tracker is not None and tracker.is_in_store("layers", old):
        tracker.replace_tracked_value("layers", old, new)
    return total


# ---------------------------------------------------------------------------- copying by state
#: a Keras model's compiled Keras-fit functions: they close over the original, so a copy drops them
_TRAINER_FUNCTIONS = ("train_function", "test_function", "predict_function")


def _copy_attributes(obj, new, memo: dict):
    memo[id(obj)] = new
    for name, value in vars(obj).items():
        object.__setattr__(new, name, copy.deepcopy(value, memo))
    return new


def _copy_saveable(self, memo: dict):
    """``copy.deepcopy`` of a Keras object by its attributes (Keras' own ``__reduce__`` saves and
    reloads it from its config, which fails for models that cannot be re-created from it)."""
    return _copy_attributes(self, object.__new__(type(self)), memo)


def _copy_tracker(self, memo: dict):
    """A Tracker's copy, its index of tracked objects (by ``id``) rebuilt for the copied objects."""
    new = _copy_attributes(self, object.__new__(type(self)), memo)
    new.stored_ids = {name: {id(v) for v in new.config[name][1]} for name in new.config}
    return new


_ATOMS = (str, bytes, int, float, complex, bool, type(None), type, types.FunctionType, types.BuiltinFunctionType)


def _shared_objects(root, skip: set = frozenset(), copies=None) -> dict:
    """A ``copy.deepcopy`` memo that keeps what a copy of ``root`` must share or drop: modules and
    TensorFlow's own objects (tensors, which are immutable, distribution strategies, compiled
    functions, graphs) are shared, a model's compiled Keras-fit functions become None; variables are
    copied. A layer
    below ``root`` for which ``copies(layer)`` gives ``(original, copy)`` pairs (the layer, its
    sub-layers and variables) is replaced by those copies and not walked into."""
    memo: dict = {}
    stack, seen = [root], set(skip)
    while stack:
        obj = stack.pop()
        if isinstance(obj, _ATOMS) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, tf.Variable):
            continue  # copied (a new variable with the same value)
        if copies is not None and obj is not root and isinstance(obj, keras.layers.Layer):
            made = copies(obj)
            if made:
                for original, new in made:
                    memo[id(original)] = new
                    seen.add(id(original))
                continue
        if isinstance(obj, types.ModuleType) or type(obj).__module__.startswith("tensorflow."):
            memo[id(obj)] = obj
            continue
        if isinstance(obj, keras.Model):
            for attr in _TRAINER_FUNCTIONS:
                fn = obj.__dict__.get(attr)
                if fn is not None:
                    memo[id(fn)] = None
                    seen.add(id(fn))
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        if hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return memo


def state_copy(obj, detach: bool = False, copies=None):
    """An independent deep copy of a Keras layer or model made from its attributes (as
    ``copy.deepcopy`` copies an ``nn.Module``): new variables with the same values, new sub-layers,
    the same Python state, whether or not Keras can re-create it from its config.

    ``detach``: the copy of a layer of a functional graph starts with no calls (the graph is not
    copied with it). ``copies(layer)``: copies made another way for a layer inside (e.g. a
    functional backbone, whose graph is too deep to copy attribute by attribute), as
    ``(original, copy)`` pairs for it and everything of it other attributes may refer to, or None.
    Raises what ``copy.deepcopy`` raises for an attribute that cannot be copied (e.g. a lock)."""
    detached = {}
    if detach:
        for attr in ("_inbound_nodes", "_outbound_nodes"):
            if isinstance(obj.__dict__.get(attr), list):
                detached[id(obj.__dict__[attr])] = []
    memo = {**_shared_objects(obj, skip=set(detached), copies=copies), **detached}
    patched = {cls: cls.__dict__.get("__deepcopy__") for cls in (KerasSaveable, Tracker)}
    KerasSaveable.__deepcopy__ = _copy_saveable
    Tracker.__deepcopy__ = _copy_tracker
    try:
        with DotNotTrackScope():  # rebuilding tracked lists and dicts must not track their items again
            return copy.deepcopy(obj, memo)
    finally:
        for cls, previous in patched.items():
            if previous is None:
                del cls.__deepcopy__
            else:
                cls.__deepcopy__ = previous
