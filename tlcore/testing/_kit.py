"""The registry of conformance checks: :func:`check` registers a function, once or once per case.

Example:
    >>> from tlcore.testing._kit import Check
    >>> Check("demo", lambda backend, n: None, {"n": 1}).name
    'demo'
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REGISTRY: list[Check] = []


@dataclass(frozen=True)
class Check:
    """One conformance check: ``check(backend)`` runs it on a backend, raising on failure."""

    name: str
    fn: Callable[..., None] = field(repr=False)
    kwargs: dict[str, Any] = field(default_factory=dict, repr=False)

    def __call__(self, backend: str) -> None:
        self.fn(backend, **self.kwargs)


def check(fn: Callable[..., None] | None = None, *, cases: dict[str, dict[str, Any]] | None = None):
    """Register ``fn(backend, **case)`` as a check (its name without the ``check_`` prefix), once, or
    once per entry of ``cases`` (named ``name[case]``)."""
    def register(f: Callable[..., None]) -> Callable[..., None]:
        base = f.__name__.removeprefix("check_")
        if cases is None:
            REGISTRY.append(Check(base, f))
        else:
            REGISTRY.extend(Check(f"{base}[{case}]", f, dict(kw)) for case, kw in cases.items())
        return f
    return register(fn) if fn is not None else register
