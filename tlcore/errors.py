"""Named exceptions. Every error tlcore raises on purpose derives from :class:`TlcoreError`.

Example:
    >>> import tlcore as tl
    >>> try:
    ...     tl.LayerCut(at="nope").resolve(["conv", "fc"])
    ... except tl.LayerNotFoundError as e:
    ...     print(type(e).__name__)
    LayerNotFoundError
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class TlcoreError(Exception):
    """Base class of every error raised by tlcore on purpose."""


class BackendNotFoundError(TlcoreError, LookupError):
    """An unknown or uninstalled backend name was asked for."""


class UnsupportedModelError(TlcoreError, TypeError):
    """No backend recognises the object given to ``tl.wrap``."""


class LayerNotFoundError(TlcoreError, LookupError):
    """A layer name (for a cut or a policy) is not one of the model's layers."""

    def __str__(self) -> str:  # LookupError would quote the message like a KeyError
        return str(self.args[0]) if self.args else ""


class CutError(TlcoreError, ValueError):
    """The model cannot be cut where it was asked (e.g. it cannot be traced)."""


class FreezePolicyError(TlcoreError, ValueError):
    """A freeze policy is malformed or matches no parameter."""


class OptimizerConfigError(TlcoreError, ValueError):
    """An optimizer or loss spec has an invalid value."""


class DataError(TlcoreError, ValueError):
    """Training or inference data is malformed (shapes, NaN, labels...)."""


class FrozenWeightsChanged(TlcoreError, AssertionError):
    """A tensor that should be frozen differs from its snapshot.

    Attributes:
        changed: ``{tensor name: max |difference|}`` for every changed tensor.
    """

    def __init__(self, changed: dict[str, float]):
        self.changed = dict(changed)
        lines = [f"  {name}: max |diff| = {diff:.6g}" for name, diff in self.changed.items()]
        super().__init__(f"{len(self.changed)} frozen tensor(s) changed:\n" + "\n".join(lines))


class CheckpointError(TlcoreError, ValueError):
    """A checkpoint file is missing, corrupted, not a tlcore checkpoint, or does not fit."""


class TrainingDiverged(TlcoreError, FloatingPointError):
    """A training step's loss or a gradient was not finite (NaN or inf); the model keeps the weights of
    the last finite step.

    Attributes:
        epoch: the epoch (from 0) of the step; step: the optimizer step (from 0, counted over the run)
        that went non-finite; tensor: ``"loss"`` or the name of the first parameter whose gradient did.
    """

    def __init__(self, epoch: int, step: int, tensor: str):
        self.epoch, self.step, self.tensor = epoch, step, tensor
        what = "the loss" if tensor == "loss" else f"the gradient of {tensor!r}"
        super().__init__(f"training diverged at epoch {epoch}, step {step}: {what} is not finite (NaN or inf); "
                         "the model keeps the weights of the last finite step (lower the learning rate, clip "
                         "gradients with clip_grad_norm=..., check the data; fit(on_nonfinite='ignore') trains on)")


class FitInProgressError(TlcoreError, RuntimeError):
    """``fit`` was called on a model that another thread is training."""


class DistributedError(TlcoreError, RuntimeError):
    """A data-parallel strategy this backend or process cannot run (see ``tl.distribute``)."""


class AdapterError(TlcoreError, ValueError):
    """A LoRA adapter spec, target or file that does not fit (see ``tl.Adapter``)."""


class ZooError(TlcoreError, LookupError):
    """An unknown zoo architecture or pretrained tag."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def unknown_name_message(what: str, name: object, valid: Sequence[str]) -> str:
    """A message naming the bad value, the closest valid one, and the valid ones.

    Example:
        >>> unknown_name_message("layer", "layr3", ["layer1", "layer3"])
        "unknown layer 'layr3'; did you mean 'layer3'? Valid: 'layer1', 'layer3'"
    """
    msg = f"unknown {what} {name!r}"
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.5)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    return msg + f" Valid: {_listing(valid)}"


def _listing(items: Iterable[str], limit: int = 40) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown or "(none)"


class ZooConfigError(ZooError, ValueError):
    """A zoo architecture option has the wrong type or is out of bounds (e.g. a float width, or a
    configuration whose parameters would not fit in :data:`tlcore.zoo.MAX_PARAMS`)."""


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for messages about values that may be huge
    (a list of a million sizes, a long string read from a file).

    Example:
        >>> short_repr(list(range(100)), limit=20)
        '[0, 1, 2, 3, 4, 5, ...] (100 items)'
    """
    import reprlib

    r = reprlib.Repr()
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 6
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlevel = 3
    text = r.repr(value)
    if len(text) > limit + 20:
        text = text[:limit] + "..."
    if isinstance(value, (list, tuple, dict)) and len(value) > 6:
        text += f" ({len(value)} items)"
    return text
