"""Functions compiled once per process for every Keras model with the same structure.

Tracing a ``tf.function`` through a Keras model costs far more than running it on a few hundred
samples (ResNet-18 at 32x32: about 300 ms against 40 ms), and every new model would trace again.
Models whose layers and wiring are equal up to layer names compute the same function of their
weights, so a function traced once takes the weights as arguments and serves them all.

Example:
    >>> key = structure_key(net)                       # doctest: +SKIP
    >>> fn = shared(("features", key), lambda: make_fn())   # doctest: +SKIP
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ._keras import flatten_layers, keras
from .cut import Dropped, Wrapper

#: compiled functions kept per process, least recently used dropped first
MAX_SHARED = 16
_SHARED: dict[tuple, Any] = {}
#: keys of a functional model's config that refer to a layer by name
_REFERENCES = ("keras_history", "input_layers", "output_layers")


def shared(key: tuple, make: Callable[[], Any], cache: dict[tuple, Any] = _SHARED, limit: int = MAX_SHARED) -> Any:
    """``cache[key]``, made by ``make()`` on first use; keeps the ``limit`` most recently used."""
    value = cache.pop(key, None)
    if value is None:
        value = make()
    cache[key] = value  # most recently used last
    while len(cache) > limit:
        cache.pop(next(iter(cache)))
    return value


def structure_key(model: keras.Layer) -> str | None:
    """A string equal for two models exactly when they compute the same function of their
    variables: their configs with layer names replaced by their order of appearance, plus the
    shapes and dtypes of their variables. ``None`` when a layer is not one of Keras' own or
    tlcore's (a custom layer's config may not describe all it computes), so nothing is shared."""
    layers = [model, *flatten_layers(model)]
    if any(not type(layer).__module__.startswith(("keras.", "tlcore_keras.")) for layer in layers):
        return None
    layer_names, names = {layer.name for layer in layers}, {}

    def rename(name: Any) -> Any:  # only layer names: a dtype policy's "name" says what is computed
        return names.setdefault(name, f"#{len(names)}") if name in layer_names else name

    def canonical(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "name":
                    out[k] = rename(v)
                elif k in _REFERENCES:
                    out[k] = _rename_references(v, rename)
                else:
                    out[k] = canonical(v)
            return out
        if isinstance(node, (list, tuple)):
            return [canonical(v) for v in node]
        return node

    config = canonical(keras.saving.serialize_keras_object(model))
    variables = [(tuple(v.shape), str(v.dtype)) for v in model.variables]
    return json.dumps([config, variables], sort_keys=True, default=str)


def step_structure(model: keras.Model) -> tuple | None:
    """What a training step through ``model`` computes besides the values of its variables: its
    :func:`structure_key` with every layer's ``trainable`` flag and dtype policy and every
    variable's ``trainable`` flag (freezing sets them, and a custom layer's config does not list its
    sub-layers). None (nothing shared) where :func:`structure_key` is, and for tlcore's cut and
    head wrappers, whose call depends on attributes that are not in their config (the cut layer)."""
    layers = [model, *flatten_layers(model)]
    if any(isinstance(layer, (Wrapper, Dropped)) for layer in layers):
        return None
    key = structure_key(model)
    if key is None:
        return None
    return (key, tuple((layer.trainable, layer.dtype_policy.name) for layer in layers),
            tuple(bool(v.trainable) for v in model.variables))


def _rename_references(value: Any, rename: Callable[[Any], Any]) -> Any:
    """``["conv1", 0, 0]`` -> ``["#3", 0, 0]``, also inside lists of such references."""
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], str):
            return [rename(value[0]), *value[1:]]
        return [_rename_references(v, rename) for v in value]
    return value
