"""Building a :class:`tlcore.Head` as a ``keras.Sequential`` whose layers are named after
``Head.layers()`` (``pool``, ``fc0``, ``act0``, ``drop0``, ``out``).

Example:
    >>> head = build_head(tl.Head.linear(5), feature_shape=(4, 4, 32), name="head", seed=0)  # doctest: +SKIP
    >>> [layer.name for layer in head.layers]                                                 # doctest: +SKIP
    ['pool', 'out']
"""
from __future__ import annotations

import numpy as np

from tlcore.head import Head

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


def build_head(head: Head, feature_shape: tuple, name: str, seed: int) -> keras.Sequential:
    """The head as a built ``keras.Sequential`` called ``name`` taking features of ``feature_shape``.

    Dense kernels are Glorot-uniform (Keras' default) and dropout is seeded, all from ``seed``.
    """
    if head.pool == "flatten" and any(d is None for d in feature_shape):
        raise ValueError(f"pool='flatten' needs fully known feature shapes, got {feature_shape}")
    seeds = iter(np.random.default_rng(seed).integers(0, 2**31 - 1, size=2 * len(head.layers())).tolist())
    hidden = iter(head.hidden)
    layers: list[keras.layers.Layer] = [keras.Input(shape=tuple(feature_shape))]
    for layer_name, kind in head.layers():
        if kind == "pool":
            layers.append(Pool(head.pool, name=layer_name))
        elif kind == "dense":
            units = head.num_classes if layer_name == "out" else next(hidden)
            layers.append(keras.layers.Dense(
                units, name=layer_name, kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds))))
        elif kind == "activation":
            layers.append(keras.layers.Activation(head.activation, name=layer_name))
        else:
            layers.append(keras.layers.Dropout(head.dropout, seed=next(seeds), name=layer_name))
    return keras.Sequential(layers, name=name)
