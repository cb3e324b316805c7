"""Building a :class:`tlcore.Head` as a :class:`~tlcore_jax.layers.NamedSequential` named after
``Head.layers()`` (``pool``, ``fc0``, ``act0``, ``drop0``, ..., ``out``).

Example:
    >>> spec = tl.Head.mlp(hidden=(8,), num_classes=3, dropout=0.1)      # doctest: +SKIP
    >>> head = build_head(spec, in_features=16, seed=0)                 # doctest: +SKIP
    >>> head.names                                                                                      # doctest: +SKIP
    ('pool', 'fc0', 'act0', 'drop0', 'out')
"""
from __future__ import annotations

from flax import nnx

from tlcore.head import Head

from .layers import Activation, CanonicalLinear, NamedSequential, Pool


def build_head(head: Head, in_features: int, seed: int, canonical: bool = False) -> NamedSequential:
    """The head's layers; dense weights are drawn from ``seed`` (dropout keys come from ``fit``'s seed).

    ``canonical`` builds dense layers with PyTorch's names and layouts (``weight (out, in)``), for zoo
    models, whose whole state is canonical; otherwise ``nnx.Linear`` (``kernel (in, out)``).
    """
    rngs = nnx.Rngs(params=seed, dropout=seed)
    dense = CanonicalLinear if canonical else nnx.Linear
    layers = []
    width = in_features
    hidden = iter(head.hidden)
    for name, kind in head.layers():
        if kind == "pool":
            layer = Pool(head.pool)
        elif kind == "dense":
            out = head.num_classes if name == "out" else next(hidden)
            layer = dense(width, out, rngs=rngs)
            width = out
        elif kind == "activation":
            layer = Activation(head.activation)
        else:
            layer = nnx.Dropout(head.dropout, rngs=rngs)
        layers.append((name, layer))
    return NamedSequential(layers)


def pooled_width(shape: tuple[int, ...], pool: str) -> int:
    """Features per sample after :class:`~tlcore_jax.layers.Pool` for a batch of ``shape``."""
    if len(shape) <= 2:
        return int(shape[-1])
    if pool == "flatten":
        n = 1
        for d in shape[1:]:
            n *= int(d)
        return n
    return int(shape[-1])
