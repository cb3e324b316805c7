"""The checkpoint file format, and nothing else: safetensors tensors plus a JSON record in the same
file; no pickle. It knows no models (``Model.save`` and ``tl.load`` in ``tlcore.workflow`` build the
record and rebuild a model from it).

The record (in the safetensors header, key ``tlcore``) holds what the writer puts in it plus the
format name, its version and a SHA-256 of the tensor data, checked on every read. Writes are atomic:
a temporary file in the same folder is written, fsynced and renamed over the target, so a crash
mid-save leaves the previous file intact.

Example:
    >>> import tempfile, numpy as np
    >>> path = tempfile.mkdtemp() + "/w.safetensors"
    >>> _ = write(path, {"w": np.ones((2, 2), np.float32)}, {"note": "hi"})
    >>> tensors, meta = read(path)
    >>> tensors["w"].shape, meta["note"], meta["format"]
    ((2, 2), 'hi', 'tlcore-checkpoint')
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError

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


def write(path: str | os.PathLike, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and the JSON record ``meta`` (with ``format``, ``version`` and the SHA-256 of
    the tensors added) to ``path``, atomically."""
    from safetensors.numpy import save as st_save

    tensors = {k: contiguous(v) for k, v in tensors.items()}
    record = {"format": FORMAT, "version": VERSION, **meta, "sha256": digest(tensors)}
    write_atomic(path, st_save(tensors, metadata={"tlcore": json.dumps(record)}))
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
