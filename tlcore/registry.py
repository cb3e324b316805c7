"""Find backends by name, by the ``tlcore.backends`` entry point group, or by a model's type.

A backend is described by a light :class:`BackendSpec` (importing it imports no framework); the
backend module itself, which imports its framework at its top, is imported only when first used.
Type detection looks only at frameworks already in ``sys.modules``, so asking "is this a torch
model?" never imports torch.

Example:
    >>> import tlcore as tl
    >>> set(tl.available_backends()) <= {"torch", "keras", "jax"}   # those whose framework is installed
    True
    >>> tl.get_backend("mxnet")
    Traceback (most recent call last):
    ...
    tlcore.errors.BackendNotFoundError: unknown backend 'mxnet'...
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from .errors import BackendNotFoundError, UnsupportedModelError, unknown_name_message

if TYPE_CHECKING:
    from .backend import Backend

ENTRY_POINT_GROUP = "tlcore.backends"


@dataclass(frozen=True)
class BackendSpec:
    """How to find one backend without importing its framework.

    Attributes:
        name: the name users pass as ``backend=``.
        target: ``"module:Class"`` of the :class:`tlcore.backend.Backend` subclass.
        requires: top-level packages that must be importable (found with ``find_spec``).
        roots: top-level modules whose classes this backend wraps (for type detection).
    """

    name: str
    target: str
    requires: tuple[str, ...]
    roots: tuple[str, ...]

    def installed(self) -> bool:
        try:
            return all(importlib.util.find_spec(r) is not None for r in self.requires + (self.target.split(".")[0],))
        except (ImportError, ValueError):
            return False


_BUILTIN = ("tlcore_torch", "tlcore_keras", "tlcore_jax")


@lru_cache(maxsize=None)
def specs() -> dict[str, BackendSpec]:
    """All known backend specs: the built-in ones, then those registered as entry points."""
    found: dict[str, BackendSpec] = {}
    for module in _BUILTIN:
        try:
            spec = importlib.import_module(module).SPEC
        except ImportError:
            continue
        found[spec.name] = spec
    from importlib.metadata import entry_points  # slow to import: only when backends are looked up

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            spec = ep.load()
        except Exception:  # a broken third-party plugin must not break tlcore
            continue
        if isinstance(spec, BackendSpec):
            found.setdefault(spec.name, spec)
    return found


def available_backends() -> list[str]:
    """Names of the backends whose framework is installed, e.g. ``["torch", "jax"]``."""
    return [name for name, spec in specs().items() if spec.installed()]


_loaded: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend called ``name``, imported on first use.

    Raises:
        BackendNotFoundError: unknown name, or its framework is not installed.
    """
    if name in _loaded:
        return _loaded[name]
    known = specs()
    if name not in known:
        raise BackendNotFoundError(unknown_name_message("backend", name, available_backends()))
    spec = known[name]
    if not spec.installed():
        raise BackendNotFoundError(
            f"backend {name!r} needs {' and '.join(spec.requires)}, which is not installed; "
            f"`pip install tlcore[{name}]` or use one of: {available_backends()}")
    module, _, cls = spec.target.partition(":")
    _loaded[name] = getattr(importlib.import_module(module), cls)()
    return _loaded[name]


@lru_cache(maxsize=256)
def _name_for_type(tp: type) -> str | None:
    for spec in specs().values():
        if not any(root in sys.modules for root in spec.roots):
            continue
        for klass in tp.__mro__:
            top = (klass.__module__ or "").split(".")[0]
            if top in spec.roots:
                return spec.name
    return None


def backend_for(obj: object) -> Backend:
    """The backend that wraps ``obj``, detected from its type.

    Raises:
        UnsupportedModelError: no installed backend recognises the object.
    """
    name = _name_for_type(type(obj))
    if name is not None:
        backend = get_backend(name)
        if backend.owns(obj):
            return backend
    raise UnsupportedModelError(
        f"no backend recognises an object of type {type(obj).__module__}.{type(obj).__qualname__}; "
        f"tl.wrap takes a torch.nn.Module, a keras.Model or a flax.nnx.Module "
        f"(installed backends: {available_backends()})")
