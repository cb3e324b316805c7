"""What runs at the end of every epoch of ``fit``: :class:`EarlyStopping`, :class:`ModelCheckpoint`,
and your own :class:`Callback`.

A callback's ``on_epoch_end(epoch, logs, model)`` gets the epoch (0-based), that epoch's metrics
(``loss``, ``accuracy``, ``val_loss``, ``lr``...) and the model; returning ``True`` stops training.
The keys a callback monitors are checked when ``fit`` starts (an unknown one is an error naming the
known ones), before any weight is touched.

Example:
    >>> stop = EarlyStopping(monitor="val_loss", patience=1)
    >>> [stop.on_epoch_end(e, {"val_loss": v}, None) for e, v in enumerate([1.0, 0.9, 0.95, 0.97])]
    [False, False, False, True]
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import as_float
from .errors import TlcoreError, unknown_name_message

if TYPE_CHECKING:
    from .model import Model


class CallbackError(TlcoreError, ValueError):
    """A callback has a bad value or monitors a key ``fit`` does not report."""


class Callback:
    """Subclass and override :meth:`on_epoch_end` (return ``True`` to stop); :meth:`on_train_begin`
    and :meth:`on_train_end` are there too. ``monitors`` lists the log keys it reads."""

    monitors: tuple[str, ...] = ()

    def on_train_begin(self, model: Model) -> None:
        """Called once, before the first epoch of a ``fit``."""

    def on_epoch_end(self, epoch: int, logs: dict[str, float], model: Model) -> bool | None:
        """Called after every epoch; return ``True`` to stop training."""
        return None

    def on_train_end(self, model: Model) -> None:
        """Called once, after the last epoch (also after an early stop)."""


def _mode(monitor: str, mode: str) -> str:
    if not isinstance(mode, str) or mode not in ("auto", "min", "max"):
        raise CallbackError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode != "auto":
        return mode
    return "min" if monitor.removeprefix("val_") in ("loss", "mse", "mae") else "max"


class _Monitor(Callback):
    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0):
        if not isinstance(monitor, str) or not monitor:
            raise CallbackError(f"monitor must be a log key such as 'val_loss', got {monitor!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real) or not math.isfinite(min_delta) \
                or min_delta < 0:
            raise CallbackError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        self.monitor, self.mode, self.min_delta = monitor, _mode(monitor, mode), as_float(min_delta)
        self.monitors = (monitor,)
        self.best: float | None = None

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(_Monitor):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs;
    ``restore_best`` puts back the weights of the best epoch at the end (as Keras does)."""

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0, mode: str = "auto",
                 restore_best: bool = False):
        super().__init__(monitor, mode, min_delta)
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 0:
            raise CallbackError(f"patience must be an int >= 0, got {patience!r}")
        self.patience, self.restore_best = int(patience), _flag("restore_best", restore_best)
        self.wait, self.best_epoch, self.best_state, self.stopped_epoch = 0, None, None, None

    def on_train_begin(self, model: Model) -> None:
        self.best, self.wait, self.best_epoch, self.best_state, self.stopped_epoch = None, 0, None, None, None

    def on_epoch_end(self, epoch: int, logs: dict[str, float], model: Model) -> bool:
        value = logs[self.monitor]
        if self.improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best and model is not None:
                self.best_state = model.state()
            return False
        self.wait += 1
        if self.wait > self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def on_train_end(self, model: Model) -> None:
        if self.restore_best and self.best_state is not None:
            model.load_state(self.best_state)


class ModelCheckpoint(_Monitor):
    """Save the model to ``path`` after every epoch (``save_best_only``: only when ``monitor``
    improved), atomically, through ``Model.save``. ``path`` may contain ``{epoch}``."""

    def __init__(self, path: str | Path, monitor: str = "val_loss", save_best_only: bool = False, mode: str = "auto"):
        super().__init__(monitor, mode)
        if not save_best_only:
            self.monitors = ()
        if not isinstance(path, (str, Path)) or not str(path):
            raise CallbackError(f"path must be a file path (str or pathlib.Path), got {path!r}")
        self.path, self.save_best_only = str(path), _flag("save_best_only", save_best_only)
        self.saved: list[str] = []

    def on_train_begin(self, model: Model) -> None:
        self.best = None

    def on_epoch_end(self, epoch: int, logs: dict[str, float], model: Model) -> bool:
        if self.save_best_only:
            value = logs[self.monitor]
            if not self.improved(value):
                return False
            self.best = value
        path = self.path.format(epoch=epoch)
        model.save(path)
        self.saved.append(path)
        return False


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise CallbackError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_callbacks(callbacks: Any, keys: list[str]) -> list[Callback]:
    """The callbacks, checked: each a :class:`Callback` whose monitored keys ``fit`` reports (one
    callback alone is taken as a list of one)."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        callbacks = [callbacks]
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Iterable):
        raise CallbackError(f"callbacks takes a list of tl.callbacks.Callback objects, got {type(callbacks).__name__}")
    callbacks = list(callbacks)
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise CallbackError(f"callbacks take tl.callbacks.Callback objects, got {type(cb).__name__}")
        for key in cb.monitors:
            if key not in keys:
                hint = " (val_ keys need validation_data)" if key.startswith("val_") else ""
                raise CallbackError(unknown_name_message(f"monitor key of {type(cb).__name__}", key, keys) + hint)
    return callbacks
