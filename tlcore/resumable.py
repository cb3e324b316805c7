"""Resumable training: ``fit(checkpoint_dir=...)`` writes the state of the run as it trains, and
:func:`resume` continues it in a new process, on the same backend (bit-identical to a run that was
never interrupted) or on another one (the same within float tolerance).

The training state is one file, ``<checkpoint_dir>/train_state.safetensors``, written as
``Model.save`` writes (atomic, verified on read, no pickle): the model (weights, frozen state, how it
was built, its freeze policy, i.e. the unfreezing stage), the optimizer state in the framework-neutral
layout of ``Trainer.export_state`` (moments and step counts per tensor), the optimizer step (so
schedules go on), where the fit stands (epoch, batches of it done, the shuffling generator's state at
the epoch's start), the random state of dropout, the metric sums of the epoch so far, the ``History``
so far, and fingerprints of the data, optimizer and recipe. A fit that continues checks the
fingerprints first and refuses a different data set, optimizer or recipe unless ``resume="force"``.

Arrays are shuffled by tlcore, so a resumed epoch replays the same order and skips the batches done.
A data loader is iterated again and its first batches skipped: that assumes it yields the same
batches in the same order when iterated again for that epoch (no shuffling, or a sampler seeded per
epoch); wrap it in ``tl.data.Deterministic`` to say so.

Not carried: the state of your callbacks (``EarlyStopping`` counts its patience afresh), and the loss
scale of float16 mixed precision (it starts again at its initial value).

Example:
    >>> hist = ft.fit(x, y, epochs=20, optimizer=opt, checkpoint_dir="runs/a", checkpoint_every=50)  # doctest: +SKIP
    >>> ft = tl.resume("runs/a")                # in a new process, after a kill     # doctest: +SKIP
    >>> hist = ft.fit(x, y, epochs=20, optimizer=opt, checkpoint_dir="runs/a")       # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint
from .errors import CheckpointError, DataError, short_repr
from .metrics import Accumulator

#: the training state's file name in a checkpoint folder
STATE_FILE = "train_state.safetensors"
#: rows of each input array hashed into the data fingerprint (evenly spaced; all of y and weights)
SAMPLED_ROWS = 64


class ResumeMismatchError(CheckpointError):
    """The data, optimizer or recipe of a fit differ from those of the run it would continue."""


@dataclass
class ResumePoint:
    """Where a saved run stands; ``tl.resume`` attaches one to the model it returns and the next
    ``fit`` continues from it.

    ``epoch``: the fit's epoch to continue (from 0), of which ``batch`` batches are done; ``step``: the
    optimizer steps of the run; ``rng``: the shuffling generator's state at the start of ``epoch``.
    """

    folder: Path
    epoch: int
    batch: int
    step: int
    seed: int
    rng: dict
    history: list[dict[str, float]]
    info: dict[str, Any]
    optimizer: dict
    fingerprints: dict[str, str]
    metrics: dict = field(default_factory=dict)
    metric_arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def check(self, now: dict[str, str], force: bool) -> None:
        """Refuse to continue with other data, optimizer or recipe (unless ``force``)."""
        if force:
            return
        for what in ("data", "optimizer", "recipe"):
            if self.fingerprints.get(what) != now[what]:
                raise ResumeMismatchError(
                    f"{str(self.folder)!r} was trained with another {what}: saved {_short(self.fingerprints.get(what))}, "
                    f"now {_short(now[what])}; pass the same {what}, or fit(..., resume='force') to continue anyway")

    def generator(self) -> np.random.Generator:
        """The shuffling generator as it was at the start of :attr:`epoch`."""
        rng = np.random.default_rng()
        rng.bit_generator.state = _ints(self.rng)
        return rng

    def restore_metrics(self, acc: Accumulator) -> None:
        """Put the saved metric sums of the epoch so far into ``acc``."""
        if self.metrics:
            acc.load_state(self.metrics, self.metric_arrays)


def _short(text: str | None, limit: int = 160) -> str:
    text = "(none)" if text is None else text
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _ints(state: Any) -> Any:
    """A generator state with its big integers back from strings (JSON keeps them as text)."""
    if isinstance(state, dict):
        return {k: _ints(v) for k, v in state.items()}
    if isinstance(state, str) and state.isdigit():
        return int(state)
    return state


def _texts(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: _texts(v) for k, v in state.items()}
    return str(state) if isinstance(state, int) and not isinstance(state, bool) else state


# ---------------------------------------------------------------------------- fingerprints
def _text(obj: Any) -> str:
    """A stable description of a spec: its repr without memory addresses."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def _digest_into(h: Any, obj: Any, sample: bool) -> None:
    if obj is None:
        h.update(b"none")
    elif isinstance(obj, dict):
        for k in sorted(obj):
            h.update(str(k).encode())
            _digest_into(h, obj[k], sample)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _digest_into(h, v, sample)
    else:
        a = np.asarray(obj)
        h.update(f"{a.dtype}{a.shape}".encode())
        if sample and a.ndim and len(a) > SAMPLED_ROWS:
            a = a[np.linspace(0, len(a) - 1, SAMPLED_ROWS).astype(np.int64)]
        h.update(np.ascontiguousarray(a).tobytes())


def data_fingerprint(source: Any) -> str:
    """Arrays: their shapes, dtypes and a hash of the targets, weights and evenly spaced input rows;
    other sources: their description and length."""
    from .sources import Arrays

    if isinstance(source, Arrays):
        h = hashlib.blake2b(digest_size=12)
        _digest_into(h, source.x, sample=True)
        _digest_into(h, (source.y, source.w), sample=False)
        return f"{source.describe()} (batches of {source.batch_size}, shuffle={source.shuffle}), {h.hexdigest()}"
    return f"{source.describe()}, {source.steps} batches per epoch"


def fingerprints(source: Any, spec: Any, **recipe: Any) -> dict[str, str]:
    """What a continued fit must share with the saved run: data, optimizer, and the recipe (loss,
    clipping, precision, seed, freezing/unfreezing, and ``recipe``'s other settings)."""
    settings = {"loss": spec.loss, "clip_grad_norm": spec.clip_grad_norm, "precision": spec.precision,
                "seed": spec.seed, **recipe}
    return {"data": data_fingerprint(source), "optimizer": _text(spec.optimizer),
            "recipe": ", ".join(f"{k}={_text(v)}" for k, v in settings.items())}


# ---------------------------------------------------------------------------- writing
def check_every(every: Any) -> int | str:
    """``checkpoint_every``: a number of optimizer steps (int > 0) or ``"epoch"``."""
    if every == "epoch":
        return every
    if isinstance(every, (int, np.integer)) and not isinstance(every, bool) and every > 0:
        return int(every)
    raise CheckpointError(f"checkpoint_every must be a number of steps > 0 or 'epoch', got {every!r}")


class Checkpointer:
    """Writes a fit's training state to ``folder`` every ``every`` optimizer steps (``"epoch"``: at
    the end of every epoch) and when the fit ends."""

    def __init__(self, folder: str | os.PathLike, every: int | str, fingerprints: dict[str, str]):
        if not isinstance(folder, (str, os.PathLike)):
            raise CheckpointError(f"checkpoint_dir must be a folder path, got {type(folder).__name__}")
        self.folder, self.every, self.fingerprints = Path(folder), check_every(every), fingerprints
        self.path = self.folder / STATE_FILE
        if self.folder.exists() and not self.folder.is_dir():
            raise CheckpointError(f"checkpoint_dir {str(folder)!r} is a file, not a folder")
        self.writes = 0

    @property
    def every_steps(self) -> int | None:
        return None if self.every == "epoch" else self.every

    def save(self, model: Any, optimizer: dict, *, epoch: int, batch: int, step: int, seed: int, rng: dict,
             history: list[dict], info: dict, acc: Accumulator | None) -> Path:
        """Write the state (``optimizer`` in the model's tensor names) atomically."""
        from .workflow import model_meta

        tensors = {f"model/{k}": v for k, v in model.state().items()}
        for name, slots in optimizer["slots"].items():
            for slot, value in slots.items():
                tensors[f"optimizer/{slot}/{name}"] = np.asarray(value, dtype=np.float32)
        tensors.update({f"random/{k}": v for k, v in model._random_state().items()})
        metrics = {}
        if acc is not None and acc.num_samples:
            metrics, arrays = acc.export_state()
            tensors.update({f"metrics/{k}": v for k, v in arrays.items()})
        train = {"epoch": epoch, "batch": batch, "step": step, "seed": seed, "rng": _texts(rng),
                 "history": history, "info": info, "steps": optimizer["steps"], "metrics": metrics,
                 "fingerprints": self.fingerprints}
        self.writes += 1
        return checkpoint.write(self.path, tensors, {**model_meta(model), "train": train})


# ---------------------------------------------------------------------------- reading
def _train_record(meta: dict, path: Path) -> dict:
    """The ``train`` record of a training state, its fields' types checked."""
    train = meta.get("train")
    if not isinstance(train, dict):
        raise checkpoint.NotACheckpointError(f"{str(path)!r} is a model checkpoint, not a training state "
                                             "(load it with tl.load)")
    types = {"epoch": int, "batch": int, "step": int, "seed": int, "rng": dict, "history": list, "info": dict,
             "steps": dict, "metrics": dict, "fingerprints": dict}
    for key, kind in types.items():
        value = train.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and not 0 <= value < 2 ** 62):
            raise checkpoint.CheckpointCorruptedError(
                f"{str(path)!r} has a malformed training state: {key!r} must be "
                f"{'an int in [0, 2**62)' if kind is int else 'a ' + kind.__name__}, got {short_repr(value)}")
    def bad(what: str) -> checkpoint.CheckpointCorruptedError:
        return checkpoint.CheckpointCorruptedError(f"{str(path)!r} has a malformed training state: {what}")

    if not all(isinstance(logs, dict) and all(isinstance(v, (int, float)) for v in logs.values())
               for logs in train["history"]):
        raise bad("'history' must be a list of {name: number} per epoch")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 62 for v in train["steps"].values()):
        raise bad("'steps' must map tensor names to step counts (ints >= 0)")
    if not all(isinstance(v, str) for v in train["fingerprints"].values()):
        raise bad("'fingerprints' must map names to text")
    return train


def resume(folder: str | os.PathLike, backend: str | None = None, model: Any = None, head: Any = None):
    """The model of the run saved in ``folder`` by ``fit(checkpoint_dir=folder)``, ready to continue:
    its next ``fit`` (same data, optimizer and recipe) goes on from the saved step.

    Args:
        folder: the ``checkpoint_dir`` of the run.
        backend: continue on this backend (default: the one it was trained on). The weights and
            optimizer state carry over exactly; dropout's random stream is the new backend's own.
        model, head: as for :func:`tl.load` (a wrapped native model needs its architecture again).

    Raises:
        tl.CheckpointError (and subclasses): no training state in ``folder``, a corrupted or foreign file.
    """
    from .workflow import rebuild

    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise checkpoint.CheckpointNotFoundError(
            f"no training state in {str(folder)!r} (fit(checkpoint_dir={str(folder)!r}) writes {STATE_FILE} there)")
    tensors, meta = checkpoint.read(path)
    train = _train_record(meta, path)
    parts: dict[str, dict[str, np.ndarray]] = {"model": {}, "optimizer": {}, "random": {}, "metrics": {}}
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        if kind not in parts or not rest:
            raise checkpoint.CheckpointCorruptedError(f"{str(path)!r} holds an unexpected tensor {key!r}")
        parts[kind][rest] = value
    slots: dict[str, dict[str, np.ndarray]] = {}
    for key, value in parts["optimizer"].items():
        slot, _, name = key.partition("/")
        slots.setdefault(name, {})[slot] = value
    point = ResumePoint(Path(folder), train["epoch"], train["batch"], train["step"], train["seed"], train["rng"],
                        train["history"], train["info"], {"slots": slots, "steps": dict(train["steps"])},
                        dict(train["fingerprints"]), train["metrics"], parts["metrics"])
    try:  # the parts rebuild() does not check, checked before anything is built
        point.generator()
        point.restore_metrics(Accumulator(["accuracy"]))
    except (DataError, TypeError, ValueError, KeyError) as e:
        raise checkpoint.CheckpointCorruptedError(f"{str(path)!r} has a malformed training state: {e}") from None
    m = rebuild(parts["model"], meta, path, backend=backend, model=model, head=head)
    if m.backend == meta.get("backend"):
        try:
            m._set_random_state(parts["random"])
        except (TypeError, ValueError, RuntimeError) as e:
            raise checkpoint.CheckpointCorruptedError(f"{str(path)!r} has a malformed random state: {e}") from None
    m._resume_point = point
    return m
