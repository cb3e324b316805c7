"""Building a :class:`tlcore.HeadPlan` as a ``keras.Sequential`` whose layers are named after
``Head.layers()`` (``pool``, ``fc0``, ``act0``, ``drop0``, ``out``).

Example:
    >>> head = build_head(plan, values, feature_shape=(4, 4, 32), name="head")   # doctest: +SKIP
    >>> [layer.name for layer in head.layers]                                                 # doctest: +SKIP
    ['pool', 'out']
"""
from __future__ import annotations

import numpy as np

from tlcore.head import HeadPlan

from ._keras import keras


@keras.saving.register_keras_serializable(package="tlcore")
class Pool(keras.layers.Layer):
    """Global average over the spatial axes of 4-D NHWC features or over the tokens of 3-D
    (N, tokens, D) features; ``mode="flatten"`` flattens instead. 2-D inputs pass through."""

    def __init__(self, mode: str = "avg", **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, x):
        if len(x.shape) <= 2:
            return x
        if self.mode == "flatten":
            return keras.ops.reshape(x, (-1, int(np.prod(x.shape[1:]))))
        return keras.ops.mean(x, axis=(1, 2) if len(x.shape) == 4 else 1)

    def compute_output_shape(self, input_shape):
        if len(input_shape) <= 2:
            return tuple(input_shape)
        if self.mode == "flatten":
            return (input_shape[0], int(np.prod(input_shape[1:])))
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


def build_head(plan: HeadPlan, values: dict[str, np.ndarray], feature_shape: tuple, name: str) -> keras.Sequential:
    """The head as a built ``keras.Sequential`` called ``name`` taking features of ``feature_shape``,
    its dense weights set from ``values`` (PyTorch's layout: a kernel is ``weight.T``). Dropout draws
    from seed states that ``fit`` reseeds."""
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
    head = keras.Sequential(layers, name=name)
    for layer_name, _, _ in plan.dense_layers():
        dense = head.get_layer(layer_name)
        dense.kernel.assign(values[f"{layer_name}.weight"].T)
        dense.bias.assign(values[f"{layer_name}.bias"])
    return head
