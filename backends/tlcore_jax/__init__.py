"""tlcore's JAX backend (Flax NNX + Optax).

Importing this package does not import JAX; ``backend.py`` does, when the registry first asks for
it. The building blocks for models that tlcore can cut (:class:`NamedSequential`, :class:`Pool`,
:class:`Activation`) and tlcore's heads (:class:`HeadModule`) are loaded on first access.

Example:
    >>> from tlcore_jax import SPEC
    >>> SPEC.name
    'jax'
"""
from __future__ import annotations

from typing import Any

from tlcore.registry import BackendSpec

SPEC = BackendSpec(name="jax", target="tlcore_jax.backend:JaxBackend", requires=("jax", "flax", "optax"),
                   roots=("flax",))

_LAZY = {"NamedSequential", "Pool", "Activation", "HeadModule"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import layers

        return getattr(layers, name)
    raise AttributeError(f"module 'tlcore_jax' has no attribute {name!r}")
