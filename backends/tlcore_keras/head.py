"""Building a :class:`tlcore.HeadPlan` as a :class:`HeadSequential` whose layers are named after
``Head.layers()`` (``pool``, ``fc0``, ``act0``, ``drop0``, ``out``); its :class:`Pool` pools as
``tlcore.head.pool_reference`` and honours the attention mask of token features.

The mask travels by Keras' own masking: the head is called as ``head(features, mask=mask)``, and
Keras hands that mask to the pool's ``call(x, mask=None)`` (a mask Keras attached to the features
itself, e.g. by ``Embedding(mask_zero=True)``, reaches it the same way).

Example:
    >>> head = build_head(plan, values, feature_shape=(4, 4, 32), name="head")   # doctest: +SKIP
    >>> [layer.name for layer in head.layers]                                     # doctest: +SKIP
    ['pool', 'out']
"""
from __future__ import annotations

import numpy as np

from tlcore.head import HeadPlan

from ._keras import keras, tf

ops = keras.ops


def token_pool(x, mode: str, mask=None):
    """Pool (N, T, D) token features over T as ``pool_reference`` does; ``mask`` (N, T, any dtype,
    > 0 = a real token) restricts ``max``, ``mean`` and ``last`` to the tokens it keeps (``avg`` and
    ``cls`` ignore it)."""
    if mode == "cls":
        return x[:, 0]
    if mask is None or mode == "avg":
        if mode == "last":
            return x[:, -1]
        return ops.max(x, axis=1) if mode == "max" else ops.mean(x, axis=1)
    keep = ops.greater(ops.cast(mask, "float32"), 0.0)
    if mode == "last":
        reversed_first = ops.argmax(ops.cast(ops.flip(keep, axis=1), "int32"), axis=1)
        index = ops.cast(ops.shape(x)[1] - 1, reversed_first.dtype) - reversed_first
        return ops.take_along_axis(x, ops.reshape(index, (-1, 1, 1)), axis=1)[:, 0]
    if mode == "max":  # a masked-out token never wins (the lowest finite value, as torch's masked_fill)
        lowest = ops.cast(tf.as_dtype(keras.backend.standardize_dtype(x.dtype)).min, x.dtype)
        return ops.max(ops.where(keep[..., None], x, lowest), axis=1)
    weights = ops.cast(keep, x.dtype)[..., None]
    return ops.sum(x * weights, axis=1) / ops.maximum(ops.sum(weights, axis=1), ops.cast(1.0, x.dtype))


@keras.saving.register_keras_serializable(package="tlcore")
class Pool(keras.layers.Layer):
    """A head's pooling (``tlcore.head.POOLS``): over the spatial axes of NHWC features (``avg``,
    ``max``), over the tokens of (N, T, D) features (:func:`token_pool`), or ``flatten``; 2-D
    features pass through. Its output carries no mask."""

    def __init__(self, mode: str = "avg", **kwargs):
        super().__init__(**kwargs)
        self.mode = mode
        self.supports_masking = True

    def call(self, x, mask=None):
        if len(x.shape) <= 2:
            return x
        if self.mode == "flatten":
            return ops.reshape(x, (-1, int(np.prod(x.shape[1:]))))
        if len(x.shape) == 3:
            return token_pool(x, self.mode, mask)
        axes = tuple(range(1, len(x.shape) - 1))
        return ops.max(x, axis=axes) if self.mode == "max" else ops.mean(x, axis=axes)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        if len(input_shape) <= 2:
            return tuple(input_shape)
        if self.mode == "flatten":
            return (input_shape[0], int(np.prod(input_shape[1:])))
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="tlcore")
class HeadSequential(keras.Sequential):
    """The head: a ``keras.Sequential`` that takes the features' mask (``head(x, mask=...)``),
    passes it to its :class:`Pool`, and gives its output none."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.supports_masking = True

    def compute_mask(self, inputs, mask=None):
        return None


def build_head(plan: HeadPlan, values: dict[str, np.ndarray], feature_shape: tuple, name: str) -> HeadSequential:
    """The head as a built :class:`HeadSequential` called ``name`` taking features of
    ``feature_shape``, its dense weights set from ``values`` (PyTorch's layout: a kernel is
    ``weight.T``). Dropout draws from seed states that ``fit`` reseeds."""
    spec = plan.spec
    units = {n: o for n, _, o in plan.dense_layers()}
    layers: list[keras.layers.Layer] = [keras.Input(shape=tuple(feature_shape))]
    for layer_name, kind in spec.layers():
        if kind == "pool":
            layers.append(Pool(spec.pool, name=layer_name))
        elif kind == "dense":
            layers.append(keras.layers.Dense(units[layer_name], name=layer_name))
        elif kind == "activation":
            layers.append(keras.layers.Activation(spec.activation, name=layer_name))
        else:
            layers.append(keras.layers.Dropout(spec.dropout, seed=0, name=layer_name))  # fit reseeds it
    head = HeadSequential(layers, name=name)
    for layer_name, _, _ in plan.dense_layers():
        dense = head.get_layer(layer_name)
        dense.kernel.assign(values[f"{layer_name}.weight"].T)
        dense.bias.assign(values[f"{layer_name}.bias"])
    return head


def is_tlcore_head(layer: keras.layers.Layer) -> bool:
    """True for a head built by :func:`build_head` (not a user's own head layer)."""
    return isinstance(layer, HeadSequential)
