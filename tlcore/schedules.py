"""Learning-rate schedules as data: closed form on the 0-based optimizer step, in numpy, the same on
every backend (the core computes the rate of each step and the backend applies it).

Every schedule counts warmup inside ``total_steps``; after ``total_steps`` it stays at its last value.
``lr_at(steps)`` takes an int or an array of steps (the golden table), in float64.

Example:
    >>> import numpy as np
    >>> s = Cosine(peak_lr=1e-3, total_steps=10, warmup_steps=2)
    >>> np.round(s.lr_at(np.arange(11)) * 1e3, 4).tolist()
    [0.0, 0.5, 1.0, 0.9619, 0.8536, 0.6913, 0.5, 0.3087, 0.1464, 0.0381, 0.0]
    >>> MultiStep(0.1, milestones=(3, 6), gamma=0.5).lr_at([0, 3, 6])
    array([0.1  , 0.05 , 0.025])
    >>> Cosine(peak_lr=1e-3, total_steps=5, warmup_steps=5)
    Traceback (most recent call last):
    ...
    tlcore.schedules.ScheduleError: Cosine: total_steps (5) must be greater than warmup_steps (5)
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from .data import as_float
from .errors import OptimizerConfigError, unknown_name_message

#: steps of a schedule whose table is checked for negative or non-finite rates when it is built
CHECKED_STEPS = 100_000


class ScheduleError(OptimizerConfigError):
    """A schedule has an invalid value (an :class:`~tlcore.errors.OptimizerConfigError`)."""


def _number(owner: str, name: str, value: Any, low: float = 0.0, strict: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value) \
        and (value > low if strict else value >= low)
    if not ok:
        raise ScheduleError(f"{owner}: {name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")
    return as_float(value)


def _steps(owner: str, name: str, value: Any, low: int = 0) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < low:
        raise ScheduleError(f"{owner}: {name} must be an int >= {low}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Schedule:
    """Base of the schedules: ``lr_at(step)``, and the checks every schedule shares."""

    kind: ClassVar[str] = ""

    def lr_at(self, steps: Any) -> Any:
        """The learning rate at 0-based optimizer step(s) ``steps`` (an int or an array), float64."""
        s = np.asarray(steps, dtype=np.float64)
        if np.any(s < 0):
            raise ScheduleError(f"{type(self).__name__}: steps are 0-based, got {steps!r}")
        out = self._rates(s)
        return float(out) if np.ndim(out) == 0 else out

    def _rates(self, s: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _check_table(self) -> None:
        """No negative or non-finite rate anywhere (the table is checked up to ``CHECKED_STEPS``)."""
        horizon = min(CHECKED_STEPS, max(getattr(self, "total_steps", 0) + 1, 2))
        rates = np.atleast_1d(self._rates(np.arange(horizon, dtype=np.float64)))
        bad = np.flatnonzero(~np.isfinite(rates) | (rates < 0))
        if len(bad):
            raise ScheduleError(f"{type(self).__name__}: the learning rate at step {int(bad[0])} is "
                                f"{rates[bad[0]]!r}; rates must be finite and >= 0")

    def to_dict(self) -> dict:
        out = {"kind": self.kind}
        for key, value in asdict(self).items():
            out[key] = value.to_dict() if isinstance(value, Schedule) else value
        if isinstance(getattr(self, "schedule", None), Schedule):
            out["schedule"] = self.schedule.to_dict()
        return out


@dataclass(frozen=True)
class Constant(Schedule):
    """The same rate at every step."""

    kind: ClassVar[str] = "constant"
    lr: float = 1e-3

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _number("Constant", "lr", self.lr))

    def _rates(self, s: np.ndarray) -> np.ndarray:
        return np.full(s.shape, self.lr)


def _warmup(s: np.ndarray, warmup: int, peak: float, rest: np.ndarray) -> np.ndarray:
    """``peak * s / warmup`` during warmup (0 at step 0), ``rest`` after."""
    if warmup == 0:
        return rest
    return np.where(s < warmup, peak * s / warmup, rest)


@dataclass(frozen=True)
class _Peaked(Schedule):
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then :meth:`_decay` down to
    ``final_lr`` at ``total_steps``."""

    peak_lr: float = 1e-3
    total_steps: int = 1000
    warmup_steps: int = 0
    final_lr: float = 0.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "peak_lr", _number(name, "peak_lr", self.peak_lr))
        object.__setattr__(self, "final_lr", _number(name, "final_lr", self.final_lr))
        object.__setattr__(self, "total_steps", _steps(name, "total_steps", self.total_steps, 1))
        object.__setattr__(self, "warmup_steps", _steps(name, "warmup_steps", self.warmup_steps))
        if self.total_steps <= self.warmup_steps:
            raise ScheduleError(f"{name}: total_steps ({self.total_steps}) must be greater than warmup_steps "
                                f"({self.warmup_steps})")
        self._check_table()

    def _decay(self, p: np.ndarray) -> np.ndarray:
        """The rate after warmup at progress ``p`` in [0, 1]."""
        raise NotImplementedError

    def _rates(self, s: np.ndarray) -> np.ndarray:
        p = np.clip((s - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0.0, 1.0)
        return _warmup(s, self.warmup_steps, self.peak_lr, self._decay(p))


@dataclass(frozen=True)
class Linear(_Peaked):
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then linear decay to ``final_lr`` at
    ``total_steps`` (as ``transformers.get_linear_schedule_with_warmup`` with a final rate)."""

    kind: ClassVar[str] = "linear"

    def _decay(self, p: np.ndarray) -> np.ndarray:
        return self.peak_lr + (self.final_lr - self.peak_lr) * p


@dataclass(frozen=True)
class Cosine(_Peaked):
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then half a cosine down to
    ``final_lr`` at ``total_steps``."""

    kind: ClassVar[str] = "cosine"

    def _decay(self, p: np.ndarray) -> np.ndarray:
        return self.final_lr + (self.peak_lr - self.final_lr) * 0.5 * (1.0 + np.cos(np.pi * p))


@dataclass(frozen=True)
class OneCycle(Schedule):
    """PyTorch's ``OneCycleLR`` (cosine annealing): from ``max_lr / div`` up to ``max_lr`` over the
    first ``pct_start`` of ``total_steps``, then down to ``max_lr / div / final_div``."""

    kind: ClassVar[str] = "one_cycle"
    max_lr: float = 1e-3
    total_steps: int = 1000
    pct_start: float = 0.3
    div: float = 25.0
    final_div: float = 1e4

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_lr", _number("OneCycle", "max_lr", self.max_lr))
        object.__setattr__(self, "total_steps", _steps("OneCycle", "total_steps", self.total_steps, 2))
        object.__setattr__(self, "div", _number("OneCycle", "div", self.div, strict=True))
        object.__setattr__(self, "final_div", _number("OneCycle", "final_div", self.final_div, strict=True))
        pct = _number("OneCycle", "pct_start", self.pct_start)
        if not 0.0 < pct < 1.0:
            raise ScheduleError(f"OneCycle: pct_start must be in (0, 1), got {self.pct_start!r}")
        object.__setattr__(self, "pct_start", pct)
        if float(pct * self.total_steps) - 1 <= 0:
            raise ScheduleError(f"OneCycle: pct_start * total_steps = {pct * self.total_steps} leaves no step to warm up")
        self._check_table()

    def _rates(self, s: np.ndarray) -> np.ndarray:
        initial = self.max_lr / self.div
        low = initial / self.final_div
        up_end = float(self.pct_start * self.total_steps) - 1   # PyTorch's phase ends
        down_end = float(self.total_steps) - 1

        def anneal(start: float, end: float, pct: np.ndarray) -> np.ndarray:
            return end + (start - end) / 2.0 * (np.cos(np.pi * pct) + 1)

        s = np.minimum(s, down_end)
        up = anneal(initial, self.max_lr, s / up_end)
        down = anneal(self.max_lr, low, (s - up_end) / (down_end - up_end))
        return np.where(s <= up_end, up, down)


@dataclass(frozen=True)
class MultiStep(Schedule):
    """``lr * gamma ** k`` after the k-th milestone (steps, increasing), as ``MultiStepLR``."""

    kind: ClassVar[str] = "multi_step"
    lr: float = 1e-3
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _number("MultiStep", "lr", self.lr))
        object.__setattr__(self, "gamma", _number("MultiStep", "gamma", self.gamma))
        if isinstance(self.milestones, (str, bytes)) or not hasattr(self.milestones, "__iter__"):
            raise ScheduleError(f"MultiStep: milestones must be a sequence of steps (ints >= 1), got {self.milestones!r}")
        ms = tuple(_steps("MultiStep", "milestones", m, 1) for m in self.milestones)
        if any(b <= a for a, b in zip(ms, ms[1:])):
            raise ScheduleError(f"MultiStep: milestones must be increasing, got {list(self.milestones)}")
        object.__setattr__(self, "milestones", ms)

    def _rates(self, s: np.ndarray) -> np.ndarray:
        k = np.searchsorted(np.asarray(self.milestones, np.float64), s, side="right")
        return self.lr * self.gamma ** k


@dataclass(frozen=True)
class Warmup(Schedule):
    """``schedule`` scaled by a linear ramp from 0 (step 0) to 1 (step ``steps``)."""

    kind: ClassVar[str] = "warmup"
    steps: int = 0
    schedule: Schedule = field(default_factory=Constant)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", _steps("Warmup", "steps", self.steps, 1))
        if not isinstance(self.schedule, Schedule):
            raise ScheduleError(f"Warmup wraps a tl.schedules schedule, got {type(self.schedule).__name__}")

    @property
    def total_steps(self) -> int:
        return getattr(self.schedule, "total_steps", self.steps)

    def _rates(self, s: np.ndarray) -> np.ndarray:
        return self.schedule._rates(s) * np.minimum(s / self.steps, 1.0)


SCHEDULES: dict[str, type[Schedule]] = {c.kind: c for c in (Constant, Linear, Cosine, OneCycle, MultiStep, Warmup)}


def schedule_from_dict(d: dict) -> Schedule:
    """Inverse of ``Schedule.to_dict``."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in SCHEDULES:
        raise ScheduleError(unknown_name_message("schedule", kind, list(SCHEDULES)))
    if kind == "warmup":
        d["schedule"] = schedule_from_dict(d["schedule"])
    if kind == "multi_step":
        d["milestones"] = tuple(d.get("milestones", ()))
    return SCHEDULES[kind](**d)


def as_schedule(lr: float | Schedule) -> Schedule:
    """A schedule for an optimizer's ``lr``: itself, or :class:`Constant` for a number."""
    return lr if isinstance(lr, Schedule) else Constant(lr)
