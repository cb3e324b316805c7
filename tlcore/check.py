"""The freeze check: take a :func:`snapshot`, train, then :func:`assert_frozen`.

Example:
    >>> import tlcore as tl                                   # doctest: +SKIP
    >>> snap = tl.snapshot(model)                             # doctest: +SKIP
    >>> model.fit(x, y, epochs=1)                             # doctest: +SKIP
    >>> tl.assert_frozen(snap, model)   # raises FrozenWeightsChanged naming what moved  # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from .errors import FrozenWeightsChanged

if TYPE_CHECKING:
    from .model import Model


class Snapshot(dict):
    """A numpy copy of ``Model.state()``; ``.mask`` is the model's ``trainable_mask()`` at that time."""

    mask: dict[str, bool]


def snapshot(model: Model) -> Snapshot:
    """Copy every tensor of ``model.state()`` (weights and non-trainable state) to numpy. A head that
    waits for its first batch has no tensors yet: the snapshot holds the rest (all a head leaves frozen)."""
    state, mask = model._state_and_mask()
    snap = Snapshot({k: np.array(v, copy=True) for k, v in state.items()})
    snap.mask = dict(mask)
    return snap


def changed_tensors(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray],
                    names: Iterable[str] | None = None) -> dict[str, float]:
    """``{name: max |diff|}`` for each tensor (of ``names``, default all in ``before``) that is not
    bit-identical in ``after``; a missing tensor or a changed shape counts as ``inf``."""
    changed = {}
    for name in (before if names is None else names):
        a, b = np.asarray(before[name]), after.get(name)
        if b is None or np.shape(b) != a.shape:
            changed[name] = float("inf")
        elif not np.array_equal(a, np.asarray(b)):
            diff = np.abs(a.astype(np.float64) - np.asarray(b).astype(np.float64))
            changed[name] = float(np.nanmax(diff)) if not np.isnan(diff).all() else float("nan")
    return changed


def assert_frozen(snap: Mapping[str, np.ndarray], model: Model,
                  names: Iterable[str] | None = None) -> list[str]:
    """Check that frozen tensors are bit-identical to ``snap``; return the names checked.

    ``names`` defaults to the tensors frozen when the snapshot was taken (``snap.mask``), or to those
    the model marks frozen now when ``snap`` is a plain dict.

    Raises:
        FrozenWeightsChanged: listing each changed tensor with its max |diff|.
    """
    if names is None:
        mask = getattr(snap, "mask", None) or model.trainable_mask()
        names = [n for n, trainable in mask.items() if not trainable and n in snap]
    names = list(names)
    changed = changed_tensors(snap, model.state(), names)
    if changed:
        raise FrozenWeightsChanged(changed)
    return names
