"""Fine-tuning recipes as data: :class:`UnfreezeSchedule` (staged unfreezing inside one ``fit``) and
:func:`fine_tune` (fastai's recipe), the same on every backend.

Example:
    >>> import tlcore as tl
    >>> plan = UnfreezeSchedule([(0, tl.FreezePolicy.all()), (2, tl.FreezePolicy.none())])
    >>> [plan.policy_at(e).mode for e in range(4)]
    ['all', 'all', 'none', 'none']
    >>> UnfreezeSchedule([(1, tl.FreezePolicy.all())])
    Traceback (most recent call last):
    ...
    tlcore.errors.FreezePolicyError: UnfreezeSchedule must start at epoch 0 (its first stage starts at epoch 1)
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import FreezePolicyError
from .freeze import FreezePolicy

if TYPE_CHECKING:
    from .model import History, Model


@dataclass(frozen=True)
class UnfreezeSchedule:
    """``[(epoch, policy), ...]``: from each epoch on (0-based, increasing, the first 0), train with
    that policy. Every tensor is registered with the optimizer from the first step; a frozen one has
    no optimizer state and no decay; its moments start at zero on the step it unfreezes (as PyTorch's
    ``add_param_group``), and frozen BatchNorm follows each stage's ``bn``."""

    stages: tuple[tuple[int, FreezePolicy], ...]

    def __post_init__(self) -> None:
        stages = tuple((e, p) for e, p in self.stages) if isinstance(self.stages, Sequence) else None
        if not stages:
            raise FreezePolicyError("UnfreezeSchedule takes a list of (epoch, tl.FreezePolicy) stages, at least one")
        for e, p in stages:
            if isinstance(e, bool) or not isinstance(e, numbers.Integral) or e < 0:
                raise FreezePolicyError(f"UnfreezeSchedule: stage epochs must be ints >= 0, got {e!r}")
            if not isinstance(p, FreezePolicy):
                raise FreezePolicyError(f"UnfreezeSchedule: each stage takes a tl.FreezePolicy, got {type(p).__name__}")
        epochs = [int(e) for e, _ in stages]
        if epochs[0] != 0:
            raise FreezePolicyError(f"UnfreezeSchedule must start at epoch 0 (its first stage starts at epoch {epochs[0]})")
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise FreezePolicyError(f"UnfreezeSchedule: stage epochs must be increasing, got {epochs}")
        object.__setattr__(self, "stages", tuple((int(e), p) for e, p in stages))

    def policy_at(self, epoch: int) -> FreezePolicy:
        """The policy of the stage that ``epoch`` (0-based) is in."""
        return [p for e, p in self.stages if e <= epoch][-1]


def fine_tune(model: Model, x: Any, y: Any = None, *, epochs: int = 1, freeze_epochs: int = 1,
              base_lr: float = 2e-3, lr_mult: float = 100.0, batch_size: int = 32, weight_decay: float = 0.01,
              **fit_kwargs: Any) -> list[History]:
    """fastai's ``fine_tune`` on any backend: ``freeze_epochs`` epochs with everything but the head
    frozen (one cycle up to ``base_lr``), then ``epochs`` epochs with everything trainable (one cycle
    up to ``base_lr / 2``, discriminative rates from ``1 / lr_mult`` of it at the input up to it at the
    head, over ``tl.LayerGroups.auto(model)``). AdamW with decoupled ``weight_decay``; no decay for
    biases and norm parameters. Returns the two fits' histories.

    Example:
        >>> hists = tl.recipes.fine_tune(ft, x, y, epochs=5, freeze_epochs=1, base_lr=2e-3)   # doctest: +SKIP
    """
    from . import data, sources
    from .errors import OptimizerConfigError
    from .groups import Discriminative, LayerGroups
    from .optim import AdamW
    from .schedules import OneCycle

    epochs = data.check_positive_int("epochs", epochs)
    freeze_epochs = data.check_positive_int("freeze_epochs", freeze_epochs)
    batch_size = data.check_positive_int("batch_size", batch_size)
    for name, value, ok, rule in (("base_lr", base_lr, lambda v: v > 0, "> 0"),
                                  ("lr_mult", lr_mult, lambda v: v >= 1, ">= 1")):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
            raise OptimizerConfigError(f"fine_tune: {name} must be a finite number {rule}, got {value!r}")
    if "freeze" in fit_kwargs or "optimizer" in fit_kwargs:
        raise TypeError("fine_tune sets freeze and optimizer itself (frozen base, then everything trainable); "
                        "call model.fit for another plan")
    source = sources.as_source(x, y, batch_size=batch_size) if not sources.is_source(x) else None
    steps = source.steps if source is not None else fit_kwargs.get("steps_per_epoch")
    if steps is None:
        raise data.DataError("fine_tune needs the number of batches per epoch: give steps_per_epoch for a loader")
    common = {**fit_kwargs, "batch_size": batch_size}
    # the policies go through fit, which applies them only once every argument and the data are checked
    first = model.fit(x, y, epochs=freeze_epochs, freeze=FreezePolicy.all(), optimizer=AdamW(
        lr=OneCycle(max_lr=base_lr, total_steps=max(2, freeze_epochs * steps), pct_start=0.99),
        weight_decay=weight_decay, no_decay="1d"), **common)
    lr = base_lr / 2
    second = model.fit(x, y, epochs=epochs, freeze=FreezePolicy.none(), optimizer=AdamW(
        lr=OneCycle(max_lr=lr, total_steps=max(2, epochs * steps), pct_start=0.3, div=5.0),
        weight_decay=weight_decay, no_decay="1d",
        lr_mult=Discriminative(lo=1.0 / lr_mult, groups=LayerGroups.auto(model))), **common)
    return [first, second]
