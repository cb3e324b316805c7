"""Layer-wise learning rates and weight decay: :class:`LayerGroups`, :class:`LayerDecay`,
:class:`Discriminative`, ``no_decay``, resolved in the core to one ``(lr multiplier, weight decay)``
per parameter, the same on every backend.

Groups run from the input to the head. :class:`LayerDecay` gives group ``i`` of ``G`` the multiplier
``decay ** (G - 1 - i)`` (timm's ``layer_decay``: the head trains at the full rate); :class:`Discriminative`
spreads multipliers geometrically from ``lo`` (the first group) to 1 (the last), as fastai's
``slice(lo, hi)``. ``no_decay="1d"`` gives every parameter with at most one dimension (biases, norm
scales and shifts) no weight decay; a regex does so for the parameters whose names it matches.

Example:
    >>> groups = LayerGroups.from_names([["stem.weight"], ["block.weight", "block.bias"], ["head.weight"]])
    >>> LayerDecay(0.5, groups).multipliers()
    (0.25, 0.5, 1.0)
    >>> [round(m, 4) for m in Discriminative(lo=0.01, groups=groups).multipliers()]
    [0.01, 0.1, 1.0]
"""
from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .cut import in_layer
from .data import as_float
from .errors import OptimizerConfigError

if TYPE_CHECKING:
    from .model import Model

PARAM_KINDS = ("param", "bn_param")


class LayerGroupsError(OptimizerConfigError):
    """Layer groups do not fit the model (a regex matching nothing, a tensor in two groups, ...)."""


@dataclass(frozen=True)
class LayerGroups:
    """Parameters grouped from the input to the head: regexes over tensor names (resolved when used:
    every regex must match, no tensor may match two, every parameter must be in a group), or the
    tensor names themselves (:meth:`auto`, :meth:`from_names`).

    Example:
        >>> LayerGroups([r"^conv1|^bn1", r"^layer1", r"^head"]).patterns
        ('^conv1|^bn1', '^layer1', '^head')
    """

    patterns: tuple[str, ...] = ()
    names: tuple[tuple[str, ...], ...] = ()
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.patterns, str) and not hasattr(self.patterns, "__iter__"):
            raise LayerGroupsError(f"LayerGroups takes a list of regexes, got {self.patterns!r}")
        patterns = tuple(self.patterns) if not isinstance(self.patterns, str) else (self.patterns,)
        for p in patterns:
            try:
                re.compile(p)
            except (re.error, TypeError) as e:
                raise LayerGroupsError(f"LayerGroups: invalid regex {p!r}: {e}") from None
        object.__setattr__(self, "patterns", patterns)
        object.__setattr__(self, "names", tuple(tuple(g) for g in self.names))
        object.__setattr__(self, "labels", tuple(self.labels))
        if not patterns and not self.names:
            raise LayerGroupsError("LayerGroups needs at least one group (regexes, or LayerGroups.auto(model))")

    @classmethod
    def from_names(cls, groups: Sequence[Sequence[str]], labels: Sequence[str] = ()) -> LayerGroups:
        """Groups of tensor names, in order."""
        return cls(names=tuple(tuple(g) for g in groups), labels=tuple(labels) or tuple(f"group {i}" for i in range(len(groups))))

    @classmethod
    def auto(cls, model: Model) -> LayerGroups:
        """One group per block, from the input to the head: each top-level layer, with containers
        (``layer1``, ``bert.encoder.layer``) opened into their blocks; tensors outside every layer
        (a class token) join the first group; the head is the last group.

        Example:
            >>> groups = tl.LayerGroups.auto(ft)   # resnet18 + head: conv1, bn1, layer1.0, ..., layer4.1, head  # doctest: +SKIP
        """
        units = _blocks(model.layers, model.head)
        params = [t for t in model.tensors if t.kind in PARAM_KINDS]
        owner = {t.name: next((i for i, u in enumerate(units) if in_layer(t.layer, u)), 0) for t in params}
        groups = [[n for n, i in owner.items() if i == k] for k in range(len(units))]
        kept = [(u, g) for u, g in zip(units, groups) if g]
        return cls(names=tuple(tuple(g) for _, g in kept), labels=tuple(u for u, _ in kept))

    def resolve(self, params: Sequence[str]) -> list[list[str]]:
        """The groups' tensor names among ``params`` (a model's parameter names)."""
        params = list(params)
        if self.names:
            known = set(params)
            missing = [n for g in self.names for n in g if n not in known]
            if missing:
                raise LayerGroupsError(f"the layer groups name {len(missing)} tensor(s) this model does not have "
                                       f"(e.g. {missing[0]!r}): they were made for another model; build them from "
                                       "this one (LayerGroups.auto(model))")
            groups = [list(g) for g in self.names]
        else:
            groups = []
            for p in self.patterns:
                found = [n for n in params if re.search(p, n)]
                if not found:
                    raise LayerGroupsError(f"LayerGroups regex {p!r} matches no parameter; names look like "
                                           f"{params[:6]}")
                groups.append(found)
        seen: dict[str, int] = {}
        for i, g in enumerate(groups):
            for n in g:
                if n in seen:
                    raise LayerGroupsError(f"tensor {n!r} is in two layer groups ({self.label(seen[n])!r} and "
                                           f"{self.label(i)!r}); make the regexes exclusive")
                seen[n] = i
        left = [n for n in params if n not in seen]
        if left:
            raise LayerGroupsError(f"{len(left)} parameter(s) are in no layer group (e.g. {left[0]!r}); add a "
                                   "regex for them, e.g. the head's")
        return groups

    def label(self, i: int) -> str:
        if self.labels:
            return self.labels[i]
        return self.patterns[i] if self.patterns else f"group {i}"

    def __len__(self) -> int:
        return len(self.names) or len(self.patterns)


def _blocks(layers: Sequence[str], head: str | None) -> list[str]:
    """The finest layers that are not containers of other listed layers, grouped at the level of the
    blocks of containers: a container whose children are listed is replaced by them."""
    layers = list(layers)
    out = []
    for name in layers:
        if head and in_layer(name, head):
            if name == head:
                out.append(name)
            continue
        parent = name.rpartition(".")[0]
        children = [n for n in layers if n.startswith(name + ".") and n.count(".") == name.count(".") + 1]
        if children:
            continue  # opened into its children
        if parent and parent in layers or "." not in name:
            out.append(name)
    return out


def _check_factor(owner: str, name: str, value: Any, groups: Any) -> float:
    if not isinstance(groups, LayerGroups):
        raise LayerGroupsError(f"{owner} takes tl.LayerGroups, got {type(groups).__name__}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise LayerGroupsError(f"{owner}: {name} must be in (0, 1], got {value!r}")
    return as_float(value)


@dataclass(frozen=True)
class LayerDecay:
    """Multiplier ``decay ** (G - 1 - i)`` for group ``i`` of ``G`` (the last group trains at 1)."""

    decay: float
    groups: LayerGroups

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _check_factor("LayerDecay", "decay", self.decay, self.groups))

    def multipliers(self) -> tuple[float, ...]:
        g = len(self.groups)
        return tuple(self.decay ** (g - 1 - i) for i in range(g))


@dataclass(frozen=True)
class Discriminative:
    """Multipliers spread geometrically from ``lo`` (the first group) to 1 (the last)."""

    lo: float
    groups: LayerGroups

    def __post_init__(self) -> None:
        object.__setattr__(self, "lo", _check_factor("Discriminative", "lo", self.lo, self.groups))

    def multipliers(self) -> tuple[float, ...]:
        g = len(self.groups)
        return tuple(1.0 if g == 1 else self.lo ** ((g - 1 - i) / (g - 1)) for i in range(g))


def check_no_decay(no_decay: Any) -> str | None:
    """``"1d"``, a regex, or None."""
    if no_decay is None or no_decay == "1d":
        return no_decay
    if not isinstance(no_decay, str) or not no_decay:
        raise OptimizerConfigError(f"no_decay must be '1d', a regex or None, got {no_decay!r}")
    try:
        re.compile(no_decay)
    except re.error as e:
        raise OptimizerConfigError(f"no_decay: invalid regex {no_decay!r}: {e}") from None
    return no_decay


@dataclass(frozen=True)
class ParamPlan:
    """Per parameter (every one of the model's, frozen or not): its group, lr multiplier and weight
    decay; hashable (part of a compiled step's key)."""

    entries: tuple[tuple[str, int, float, float], ...]   # (name, group, lr multiplier, weight decay)
    labels: tuple[str, ...] = ()

    def lookup(self) -> dict[str, tuple[float, float]]:
        return {n: (m, wd) for n, _, m, wd in self.entries}


def plan_params(optimizer: Any, model: Model) -> ParamPlan:
    """Resolve ``optimizer``'s ``lr_mult`` and ``no_decay`` against ``model``'s parameters."""
    infos = [t for t in model.tensors if t.kind in PARAM_KINDS]
    names = [t.name for t in infos]
    mult = optimizer.lr_mult
    if mult is None:
        group_of, mults, labels = {n: 0 for n in names}, (1.0,), ("all",)
    else:
        groups = mult.groups.resolve(names)
        group_of = {n: i for i, g in enumerate(groups) for n in g}
        mults, labels = mult.multipliers(), tuple(mult.groups.label(i) for i in range(len(groups)))
    shapes = {k: np.shape(v) for k, v in model._state_and_mask()[0].items()}
    wd = optimizer.weight_decay
    entries = []
    for n in names:
        exempt = optimizer.no_decay is not None and (
            len(shapes[n]) <= 1 if optimizer.no_decay == "1d" else re.search(optimizer.no_decay, n) is not None)
        entries.append((n, group_of[n], float(mults[group_of[n]]), 0.0 if exempt else float(wd)))
    return ParamPlan(tuple(entries), labels)


def describe(plan: ParamPlan, trainable: dict[str, bool], layers_of: dict[str, str]) -> str:
    """A table of the groups: layers, tensors (trainable ones), lr multiplier, weight decay."""
    rows = [("group", "layers", "tensors", "lr multiplier", "weight decay")]
    groups = sorted({g for _, g, _, _ in plan.entries})
    for g in groups:
        members = [(n, m, wd) for n, gi, m, wd in plan.entries if gi == g]
        layers = list(dict.fromkeys(layers_of.get(n, "") or "(root)" for n, _, _ in members))
        shown = ", ".join(layers[:3]) + (f", ... ({len(layers)})" if len(layers) > 3 else "")
        n_train = sum(trainable.get(n, False) for n, _, _ in members)
        decays = sorted({wd for _, _, wd in members})
        decay = " / ".join(f"{d:g}" for d in decays) + (" (no_decay)" if len(decays) > 1 else "")
        label = plan.labels[g] if g < len(plan.labels) else str(g)
        rows.append((f"{g} {label}", shown, f"{len(members)} ({n_train} trainable)", f"{members[0][1]:.6g}", decay))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
