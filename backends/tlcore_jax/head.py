"""Building a :class:`tlcore.HeadPlan` as a :class:`~tlcore_jax.layers.HeadModule` named after
``Head.layers()`` (``pool``, ``fc0``, ``act0``, ``drop0``, ..., ``out``); its pool takes the attention
mask of token features.

Example:
    >>> head = build_head(HeadPlan(tl.Head.mlp(hidden=(8,), num_classes=3, dropout=0.1), width=16), values)  # doctest: +SKIP
    >>> head.names                                                                                          # doctest: +SKIP
    ('pool', 'fc0', 'act0', 'drop0', 'out')
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlcore.head import HeadPlan

from .layers import Activation, CanonicalLinear, HeadModule, Pool


def build_head(plan: HeadPlan, values: dict[str, np.ndarray]) -> HeadModule:
    """The head's layers, with PyTorch's names and layouts (``weight (out, in)``, as every backend's
    head), its dense weights set from ``values``; dropout keys come from ``fit``'s seed."""
    spec, dense = plan.spec, {name: (i, o) for name, i, o in plan.dense_layers()}
    layers = []
    for name, kind in spec.layers():
        if kind == "pool":
            layer = Pool(spec.pool)
        elif kind == "dense":
            layer = CanonicalLinear(*dense[name])
            layer.weight.set_value(jnp.asarray(values[f"{name}.weight"]))
            layer.bias.set_value(jnp.asarray(values[f"{name}.bias"]))
        elif kind == "activation":
            layer = Activation(spec.activation)
        else:
            layer = nnx.Dropout(spec.dropout, rngs=nnx.Rngs(dropout=0))
        layers.append((name, layer))
    return HeadModule(layers)
