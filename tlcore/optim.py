"""Framework-neutral optimizer and loss specs, translated once by each backend.

The update rules follow PyTorch's definitions exactly, so every backend computes the same step:

* gradients are clipped first (``clip_grad_norm``: global L2 norm over trainable tensors);
* ``weight_decay`` of :class:`SGD`, :class:`Adam` and :class:`RMSprop` is L2 regularisation added
  to the gradient (``g + wd * w``); :class:`AdamW`'s is decoupled (``w -= lr * wd * w``);
* Adam's ``eps`` is added to ``sqrt(v_hat)``; RMSprop's to ``sqrt(v)`` (outside the square root);
* frozen tensors get no gradient, no decay and no optimizer state.

Example:
    >>> import tlcore as tl
    >>> tl.optim.AdamW(lr=1e-3, weight_decay=0.05).kind
    'adamw'
    >>> tl.optim.SGD(lr=0)
    Traceback (most recent call last):
    ...
    tlcore.errors.OptimizerConfigError: SGD: lr must be a finite number > 0, got 0
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from .data import as_float
from .errors import OptimizerConfigError, unknown_name_message
from .groups import Discriminative, LayerDecay, LayerGroups, ParamPlan, check_no_decay
from .losses import CrossEntropy, LossSpec
from .schedules import Schedule, as_schedule, schedule_from_dict

#: the compute precisions of a training step; weights (the master copy) stay float32
PRECISIONS = ("float32", "bfloat16", "float16")


def _real(value: object) -> bool:
    """A real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _flag(owner: str, name: str, value: object) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise OptimizerConfigError(f"{owner}: {name} must be True or False, got {value!r}")


def _positive(owner: str, name: str, value: float) -> None:
    if not _real(value) or not math.isfinite(value) or value <= 0:
        raise OptimizerConfigError(f"{owner}: {name} must be a finite number > 0, got {value!r}")


def _non_negative(owner: str, name: str, value: float) -> None:
    if not _real(value) or not math.isfinite(value) or value < 0:
        raise OptimizerConfigError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")


def _unit(owner: str, name: str, value: float) -> None:
    if not _real(value) or not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise OptimizerConfigError(f"{owner}: {name} must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class OptimizerSpec:
    """Base of the optimizer specs; ``kind`` names the update rule."""

    kind: ClassVar[str] = ""
    #: a number, or a ``tl.schedules`` schedule (closed form on the optimizer step)
    lr: float | Schedule = 1e-3
    weight_decay: float = 0.0
    #: layer-wise multipliers of the learning rate: ``tl.LayerDecay`` or ``tl.Discriminative``
    lr_mult: LayerDecay | Discriminative | None = None
    #: parameters without weight decay: ``"1d"`` (biases and norm parameters), a regex, or None
    no_decay: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lr, Schedule):
            _positive(type(self).__name__, "lr", self.lr)
        _non_negative(type(self).__name__, "weight_decay", self.weight_decay)
        if self.lr_mult is not None and not isinstance(self.lr_mult, (LayerDecay, Discriminative)):
            raise OptimizerConfigError(f"{type(self).__name__}: lr_mult takes tl.LayerDecay(...) or "
                                       f"tl.Discriminative(...), got {type(self.lr_mult).__name__}")
        check_no_decay(self.no_decay)
        for f in fields(self):  # numpy scalars become plain floats (hashable, JSON-able, the same everywhere)
            value = getattr(self, f.name)
            if _real(value):
                object.__setattr__(self, f.name, as_float(value))
            elif isinstance(value, np.bool_):
                object.__setattr__(self, f.name, bool(value))

    @property
    def schedule(self) -> Schedule:
        """The learning rate as a schedule (a number is :class:`~tlcore.schedules.Constant`)."""
        return as_schedule(self.lr)

    def to_dict(self) -> dict:
        out = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Schedule):
                value = value.to_dict()
            elif isinstance(value, (LayerDecay, Discriminative)):
                value = {"kind": type(value).__name__, **{k: v for k, v in vars(value).items() if k != "groups"},
                         "groups": {"patterns": list(value.groups.patterns), "names": [list(g) for g in value.groups.names],
                                    "labels": list(value.groups.labels)}}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclass(frozen=True)
class SGD(OptimizerSpec):
    """Stochastic gradient descent, optionally with (Nesterov) momentum."""

    kind: ClassVar[str] = "sgd"
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _unit("SGD", "momentum", self.momentum)
        _flag("SGD", "nesterov", self.nesterov)
        if self.nesterov and self.momentum <= 0:
            raise OptimizerConfigError("SGD: nesterov=True needs momentum > 0")


@dataclass(frozen=True)
class Adam(OptimizerSpec):
    """Adam; ``weight_decay`` is L2 added to the gradient (use :class:`AdamW` for decoupled decay)."""

    kind: ClassVar[str] = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        pair = isinstance(self.betas, Sequence) and not isinstance(self.betas, (str, bytes)) \
            or getattr(self.betas, "ndim", None) == 1
        if not pair or len(self.betas) != 2:
            raise OptimizerConfigError(f"{name}: betas must be a pair of numbers in [0, 1), got {self.betas!r}")
        _unit(name, "betas[0]", self.betas[0])
        _unit(name, "betas[1]", self.betas[1])
        _positive(name, "eps", self.eps)
        object.__setattr__(self, "betas", tuple(as_float(b) for b in self.betas))


@dataclass(frozen=True)
class AdamW(Adam):
    """Adam with decoupled weight decay (``w -= lr * weight_decay * w``)."""

    kind: ClassVar[str] = "adamw"
    weight_decay: float = 0.01


@dataclass(frozen=True)
class RMSprop(OptimizerSpec):
    """RMSprop with smoothing constant ``alpha`` (Keras' ``rho``), optional momentum."""

    kind: ClassVar[str] = "rmsprop"
    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0
    centered: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _unit("RMSprop", "alpha", self.alpha)
        _positive("RMSprop", "eps", self.eps)
        _unit("RMSprop", "momentum", self.momentum)
        _flag("RMSprop", "centered", self.centered)


OPTIMIZERS: dict[str, type[OptimizerSpec]] = {c.kind: c for c in (SGD, Adam, AdamW, RMSprop)}


def optimizer_from_dict(d: dict) -> OptimizerSpec:
    """Inverse of ``OptimizerSpec.to_dict``."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in OPTIMIZERS:
        raise OptimizerConfigError(unknown_name_message("optimizer", kind, list(OPTIMIZERS)))
    if "betas" in d:
        d["betas"] = tuple(d["betas"])
    if isinstance(d.get("lr"), dict):
        d["lr"] = schedule_from_dict(d["lr"])
    if isinstance(d.get("lr_mult"), dict):
        m = dict(d["lr_mult"])
        cls = {"LayerDecay": LayerDecay, "Discriminative": Discriminative}[m.pop("kind")]
        g = m.pop("groups")
        groups = LayerGroups(patterns=tuple(g["patterns"]), names=tuple(tuple(n) for n in g["names"]),
                             labels=tuple(g["labels"]))
        d["lr_mult"] = cls(groups=groups, **m)
    return OPTIMIZERS[kind](**d)


@dataclass(frozen=True)
class TrainSpec:
    """Everything a backend needs to build one training step; hashable, so steps can be cached."""

    optimizer: OptimizerSpec
    #: a ``tlcore.losses`` spec (PyTorch's semantics, weighted mean ``sum(s * l) / sum(s * d)``)
    loss: LossSpec = field(default_factory=CrossEntropy)
    clip_grad_norm: float | None = None
    seed: int = 0
    #: compute dtype of the forward and backward pass (mixed precision); weights and optimizer state
    #: stay float32, and the loss is computed in float32
    precision: str = "float32"
    #: every parameter's lr multiplier and weight decay (``tlcore.groups.plan_params``); None: all
    #: parameters at the optimizer's rate and decay
    params: ParamPlan | None = None
    #: check every step: a non-finite loss or gradient changes nothing and stops the epoch
    #: (``Trainer.nonfinite`` names it); False: PyTorch's plain behaviour (NaN goes into the weights)
    guard: bool = True
    extras: tuple = field(default=())
    #: a ``tl.distribute`` strategy over more than one replica (None: one device)
    strategy: Any = None

    def rates(self) -> dict[str, tuple[float, float]]:
        """``{parameter: (lr multiplier, weight decay)}``; empty when every parameter has (1, the
        optimizer's weight decay)."""
        return {} if self.params is None else self.params.lookup()
