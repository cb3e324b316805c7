"""Portable checkpoints: safetensors tensors plus JSON metadata in the same file; no pickle.

A checkpoint holds ``Model.state()`` (canonical names and PyTorch layouts for zoo models, so it loads
on any backend) and, in the safetensors header, a JSON record: architecture and config, the cut and
head steps that ``tl.finetune`` applied, the freeze policy, the backend and framework versions, and a
SHA-256 of the tensor data. Saves are atomic: a temporary file in the same folder is written,
fsynced and renamed over the target, so a crash mid-save leaves the previous file intact.

Example:
    >>> ft.save("digits59.safetensors")                      # doctest: +SKIP
    >>> again = tl.load("digits59.safetensors", backend="jax")  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import CheckpointError

if TYPE_CHECKING:
    from .model import Model

FORMAT = "tlcore-checkpoint"
VERSION = 1


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


class CheckpointCorruptedError(CheckpointError):
    """The file is truncated or its bytes were changed."""


class NotACheckpointError(CheckpointError):
    """The file is readable but was not written by tlcore."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the model (names or shapes)."""


def contiguous(a) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (``np.ascontiguousarray`` makes them 1-d)."""
    return np.require(np.asarray(a), requirements="C")


def digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = contiguous(tensors[name])
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(model: Model, path: str | os.PathLike) -> Path:
    """Save ``model`` (weights, non-trainable state and how it was built) to ``path``."""
    from safetensors.numpy import save as st_save

    from .registry import get_backend

    tensors = {k: contiguous(v) for k, v in model.state().items()}
    meta = {
        "format": FORMAT, "version": VERSION, "backend": model.backend,
        "versions": get_backend(model.backend).versions(),
        "arch": model.meta.get("arch"), "config": model.meta.get("config"),
        "pretrained": model.meta.get("pretrained"), "steps": model.meta.get("steps", []),
        "policy": model.policy.to_dict(), "input_shape": model.input_shape,
        "layers": model.layers, "trainable": model.trainable_mask(), "sha256": digest(tensors),
    }
    write_atomic(path, st_save(tensors, metadata={"tlcore": json.dumps(meta)}))
    return Path(path)


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tensors and metadata of a tlcore checkpoint, verified against its SHA-256.

    Raises:
        CheckpointNotFoundError, CheckpointCorruptedError, NotACheckpointError.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load

    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"no checkpoint at {str(path)!r}")
    raw = path.read_bytes()
    header = _header(raw, path)
    if "tlcore" not in (header.get("__metadata__") or {}):
        raise NotACheckpointError(f"{str(path)!r} is a safetensors file but not a tlcore checkpoint "
                                  "(no 'tlcore' metadata); load plain state dicts with tl.zoo.create(weights=...)")
    try:
        meta = json.loads(header["__metadata__"]["tlcore"])
        tensors = st_load(raw)
    except (SafetensorError, ValueError) as e:
        raise CheckpointCorruptedError(f"{str(path)!r} is truncated or corrupted: {e}") from None
    if meta.get("format") != FORMAT:
        raise NotACheckpointError(f"{str(path)!r} has format {meta.get('format')!r}, not {FORMAT!r}")
    if meta.get("sha256") != digest(tensors):
        raise CheckpointCorruptedError(f"{str(path)!r} is corrupted: its tensor data does not match its SHA-256")
    return tensors, meta


def _header(raw: bytes, path: Path) -> dict:
    """The safetensors JSON header, or a named error when the bytes are not a safetensors file."""
    if len(raw) < 8:
        raise CheckpointCorruptedError(f"{str(path)!r} is truncated ({len(raw)} bytes)")
    n = int.from_bytes(raw[:8], "little")
    if n <= 0 or 8 + n > len(raw):
        raise NotACheckpointError(f"{str(path)!r} is not a safetensors file, or its header is truncated")
    try:
        header = json.loads(raw[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NotACheckpointError(f"{str(path)!r} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise NotACheckpointError(f"{str(path)!r} is not a safetensors file")
    return header


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A plain state dict in PyTorch's key layout: ``.safetensors`` or ``.pth``/``.pt``
    (read with ``torch.load(weights_only=True)``, never unpickling code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"no weights file at {str(path)!r}")
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"reading {path.suffix} files needs torch; convert {str(path)!r} to "
                                  ".safetensors to load it without torch") from None
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
            raise CheckpointCorruptedError(f"cannot read {str(path)!r} as a weights-only state dict: {e}") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise NotACheckpointError(f"{str(path)!r} does not hold a state dict of tensors")
        return {k: v.detach().cpu().numpy() for k, v in sd.items()}
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load

    raw = path.read_bytes()
    _header(raw, path)
    try:
        return st_load(raw)
    except SafetensorError as e:
        raise CheckpointCorruptedError(f"{str(path)!r} is truncated or corrupted: {e}") from None


def fit_state_dict(model: Model, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` restricted to what ``model`` holds, ignoring PyTorch's BatchNorm counters;
    raises :class:`CheckpointMismatchError` listing every missing, unexpected or misshapen tensor."""
    current = model.state()
    counter = lambda k: k.endswith("num_batches_tracked")  # noqa: E731  (PyTorch-only BatchNorm counters)
    arrays = {k: v for k, v in arrays.items() if k in current or not counter(k)}
    problems = [f"missing {k!r} (model shape {current[k].shape})" for k in current if k not in arrays and not counter(k)]
    problems += [f"unexpected {k!r} (checkpoint shape {arrays[k].shape})" for k in arrays if k not in current]
    problems += [f"{k}: checkpoint {arrays[k].shape} vs model {current[k].shape}"
                 for k in current if k in arrays and arrays[k].shape != current[k].shape]
    if problems:
        raise CheckpointMismatchError(
            f"the weights do not fit this {model.meta.get('arch') or 'model'} ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems[:50]))
    return {k: arrays[k] for k in current if k in arrays}


def load(path: str | os.PathLike, backend: str | None = None, model: Any = None) -> Model:
    """Restore a saved model on ``backend`` (default: the one it was saved from).

    Zoo models (fine-tuned ones included: cut, head and policy are replayed) load on any backend.
    A wrapped native model is rebuilt from ``model``, the same native architecture, on its backend.
    Nothing is returned unless every tensor fits.

    Raises:
        tl.CheckpointError (and its subclasses): missing, corrupted, foreign or mismatched files.
    """
    from .cut import LayerCut
    from .workflow import finetune, wrap
    from .freeze import FreezePolicy
    from .head import Head
    from .zoo import _build

    tensors, meta = read(path)
    if model is not None:
        base = wrap(model, backend=backend)
    elif meta.get("arch"):
        base = _build(meta["arch"], backend or meta["backend"], meta["config"])
        base.meta["pretrained"] = meta.get("pretrained")
    else:
        raise CheckpointError(f"{str(path)!r} holds a wrapped {meta['backend']} model that is not from the zoo; "
                              f"pass the same architecture as tl.load(path, model=<native {meta['backend']} model>)")
    for step in meta.get("steps", []):
        base = finetune(base, cut=LayerCut(at=step["cut"]) if step["cut"] else None,
                        head=Head.from_dict(step["head"]) if step["head"] else None,
                        freeze=FreezePolicy.none(), input_shape=meta.get("input_shape"))
    base.load_state(fit_state_dict(base, tensors))
    base.freeze(FreezePolicy.from_dict(meta["policy"]))
    return base
