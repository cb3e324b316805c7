"""The checkpoint file format, and nothing else: safetensors tensors plus a JSON record in the same
file; no pickle. It knows no models (``Model.save`` and ``tl.load`` in ``tlcore.workflow`` build the
record and rebuild a model from it).

The record (in the safetensors header, key ``tlcore``) holds what the writer puts in it plus the
format name, its version and a SHA-256 of the record itself and of the tensor data, checked on every
read: a changed byte anywhere in the tensors, or an edited field of the record (a freeze policy, a
head), is refused as corruption. (Format version 1 hashed the tensors only; :func:`upgrade` re-seals
such a file once you trust it.)

Reading a file never loads more than it declares: the header is read with bounded reads
(:data:`MAX_HEADER_BYTES`), the file's length must be exactly what the header declares (nothing
missing, nothing appended), and the tensors are copied out of a memory map by safetensors, one at a
time. Malformed input of any kind raises a :class:`CheckpointError` subclass with a one-line message.

Writes are atomic: a temporary file ``.<name>.<host>-<pid>.<random>.tmp`` in the same folder is
written, fsynced and renamed over the target, so a crash mid-save leaves the previous file intact; the
next save to that path removes the temporary files that writers on this host which are no longer
running left behind (never those of a live process).

Example:
    >>> import tempfile, numpy as np
    >>> path = tempfile.mkdtemp() + "/w.safetensors"
    >>> _ = write(path, {"w": np.ones((2, 2), np.float32)}, {"note": "hi"})
    >>> tensors, meta = read(path)
    >>> tensors["w"].shape, meta["note"], meta["format"], meta["version"]
    ((2, 2), 'hi', 'tlcore-checkpoint', 2)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError, short_repr

FORMAT = "tlcore-checkpoint"
VERSION = 2
#: the largest safetensors header (JSON: tensor names, shapes, the record) a read accepts: 16 MiB
MAX_HEADER_BYTES = 16 * 2 ** 20
#: how deeply the record's JSON may nest (a real record nests 4 levels)
MAX_RECORD_DEPTH = 32
#: the most tensors a checkpoint may hold
MAX_TENSORS = 2 ** 16
_RESERVED = ("format", "version", "sha256")


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


def single_line(error: BaseException | str, limit: int = 600) -> str:
    """A message on one line: its lines joined with ``"; "`` (a list of problems after a colon stays
    readable), cut to about ``limit`` characters."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = (lines[0] + " " + "; ".join(lines[1:])).strip() if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit:,} more characters)"


def canonical_json(value: Any) -> bytes:
    """The bytes of ``value`` as canonical JSON (sorted keys, no spaces, ASCII), what the SHA-256 covers."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def digest(tensors: dict[str, np.ndarray], record: dict[str, Any] | None = None) -> str:
    """SHA-256 of the tensors (names, dtypes, shapes, bytes) and, when given, of ``record`` without its
    ``sha256`` field (as :func:`canonical_json`). Without ``record``: format version 1's digest."""
    h = hashlib.sha256()
    if record is not None:
        body = canonical_json({k: v for k, v in record.items() if k != "sha256"})
        h.update(b"tlcore-record:%d:" % len(body) + body)
    for name in sorted(tensors):
        a = contiguous(tensors[name])
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.reshape(-1).view(np.uint8) if a.size else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ writing
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _temp_pattern(name: str) -> re.Pattern:
    """Temporary files of saves to ``name`` from this host: group 1 is the writer's pid."""
    return re.compile(rf"\.{re.escape(name)}\.{_HOST}-(\d+)\.[A-Za-z0-9_]+\.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be saving to the same path
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # a live process of another user (or a pid we cannot judge): keep its file
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that saves to ``path`` by processes of this host that are no longer
    running left behind (a save that was killed); returns what was removed. Files of live writers,
    of other hosts and every other file are kept."""
    path = Path(path)
    pattern, removed = _temp_pattern(path.name), []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass  # another writer removed it first, or we may not: nothing to do
    return removed


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and an atomic rename; first remove
    the temporary files killed saves to ``path`` left behind (see :func:`remove_stale_temporaries`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
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
    the record and the tensors added) to ``path``, atomically.

    Raises:
        ValueError: ``meta`` uses a reserved key (format, version, sha256) or is not JSON data.
    """
    from safetensors.numpy import save as st_save

    reserved = [k for k in _RESERVED if k in meta]
    if reserved:
        raise ValueError(f"checkpoint metadata may not set {reserved}: the format writes them")
    tensors = {k: contiguous(v) for k, v in tensors.items()}
    record = json.loads(json.dumps({"format": FORMAT, "version": VERSION, **meta}))  # tuples -> lists, as read
    record["sha256"] = digest(tensors, record)
    write_atomic(path, st_save(tensors, metadata={"tlcore": json.dumps(record)}))
    return Path(path)


# ------------------------------------------------------------------------------------------ reading
def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tensors and metadata of a tlcore checkpoint, verified against its SHA-256 (tensors and record).

    The record's fields are only checked to be JSON data of bounded depth here; what they mean is
    checked by whoever replays them (``tl.load``).

    Raises:
        CheckpointNotFoundError, CheckpointCorruptedError, NotACheckpointError, CheckpointError.
    """
    path = Path(path)
    header = _read_header(path)
    record = _record(header, path)
    version = record.get("version")
    if type(version) is int and version == 1:
        raise CheckpointError(
            f"{str(path)!r} is a tlcore checkpoint of format version 1, whose checksum does not cover its "
            f"metadata; if you trust the file, convert it once with tlcore.checkpoint.upgrade({str(path)!r})")
    if type(version) is not int or version != VERSION:
        raise NotACheckpointError(f"{str(path)!r} has checkpoint format version {short_repr(version)}; this tlcore "
                                  f"reads version {VERSION} (a newer tlcore may have written it)")
    tensors = _read_tensors(path, header)
    if record.get("sha256") != digest(tensors, record):
        raise CheckpointCorruptedError(f"{str(path)!r} is corrupted: its tensors or its metadata do not match "
                                       "its SHA-256")
    return tensors, record


def upgrade(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Re-seal a format-version-1 checkpoint (its SHA-256 covered the tensors only) as version 2 at
    ``out`` (default: in place). The tensors are checked against the old checksum and kept bit for
    bit; the metadata is taken as it is, so only upgrade files you trust.

    Raises:
        CheckpointError: the file is not a valid version-1 checkpoint.
    """
    path = Path(path)
    header = _read_header(path)
    record = _record(header, path)
    if type(record.get("version")) is not int or record.get("version") != 1:
        raise CheckpointError(f"{str(path)!r} is not a format-version-1 checkpoint (version "
                              f"{short_repr(record.get('version'))}); nothing to upgrade")
    tensors = _read_tensors(path, header)
    if record.get("sha256") != digest(tensors):
        raise CheckpointCorruptedError(f"{str(path)!r} is corrupted: its tensor data does not match its SHA-256")
    return write(path if out is None else out, tensors, {k: v for k, v in record.items() if k not in _RESERVED})


def _read_header(path: Path) -> dict:
    """The safetensors JSON header, read with bounded reads, after checking that the file is exactly
    as long as the header declares. A named error for anything else."""
    shown = str(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"no checkpoint at {shown!r}")
    if not path.is_file():  # a folder, a FIFO (opening it would block), a device
        raise NotACheckpointError(f"{shown!r} is not a regular file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointCorruptedError(f"{shown!r} is truncated ({size} bytes)")
            n = int.from_bytes(prefix, "little")
            if n < 2 or 8 + n > size:
                raise NotACheckpointError(f"{shown!r} is not a safetensors file, or its header is truncated "
                                          f"(header of {n:,} bytes declared, file of {size:,} bytes)")
            if n > MAX_HEADER_BYTES:
                raise NotACheckpointError(f"{shown!r} declares a header of {n:,} bytes, more than the "
                                          f"{MAX_HEADER_BYTES:,} a checkpoint may have")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no checkpoint at {shown!r}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {shown!r}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise NotACheckpointError(f"{shown!r} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise NotACheckpointError(f"{shown!r} is not a safetensors file (its header is not a JSON object)")
    if len(header) > MAX_TENSORS + 1:
        raise CheckpointCorruptedError(f"{shown!r} declares {len(header) - 1:,} tensors, more than the "
                                       f"{MAX_TENSORS:,} a checkpoint may hold")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointCorruptedError(f"{shown!r} is corrupted: its header's __metadata__ is not a map of strings")
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointCorruptedError(f"{shown!r} is corrupted: tensor {short_repr(name)} has no valid data_offsets")
        end = max(end, offsets[1])
    expected = 8 + n + end
    if size != expected:
        what = "truncated" if size < expected else f"followed by {size - expected:,} bytes it does not declare"
        raise CheckpointCorruptedError(f"{shown!r} is {what}: its header declares {expected:,} bytes, the file has "
                                       f"{size:,}")
    return header


def _record(header: dict, path: Path) -> dict[str, Any]:
    """The tlcore record of a safetensors header: a JSON object of bounded depth, with our format."""
    metadata = header.get("__metadata__") or {}
    if "tlcore" not in metadata:
        raise NotACheckpointError(f"{str(path)!r} is a safetensors file but not a tlcore checkpoint "
                                  "(no 'tlcore' metadata); load plain state dicts with tl.zoo.create(weights=...)")
    try:
        record = json.loads(metadata["tlcore"])
    except (ValueError, RecursionError, MemoryError):  # ValueError: bad JSON, or an int of too many digits
        raise CheckpointCorruptedError(f"{str(path)!r} is corrupted: its tlcore metadata is not valid JSON") from None
    if not isinstance(record, dict):
        raise CheckpointCorruptedError(f"{str(path)!r} is corrupted: its tlcore metadata is a "
                                       f"{type(record).__name__}, not a JSON object")
    _check_depth(record, path)
    if record.get("format") != FORMAT:
        raise NotACheckpointError(f"{str(path)!r} has format {short_repr(record.get('format'))}, not {FORMAT!r}")
    return record


def _check_depth(value: Any, path: Path) -> None:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_RECORD_DEPTH:
            raise CheckpointCorruptedError(f"{str(path)!r} is corrupted: its tlcore metadata nests deeper than "
                                           f"{MAX_RECORD_DEPTH} levels")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def _read_tensors(path: Path, header: dict) -> dict[str, np.ndarray]:
    """Every tensor of a file whose header :func:`_read_header` checked, copied out of a memory map
    (safetensors validates names, dtypes, shapes and offsets first)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no checkpoint at {str(path)!r}") from None
    except (SafetensorError, ValueError, TypeError, KeyError, OSError, OverflowError, MemoryError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointCorruptedError(f"{str(path)!r} is truncated or corrupted: {short_repr(first, 200)}") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A plain state dict in PyTorch's key layout: ``.safetensors`` or ``.pth``/``.pt``
    (read with ``torch.load(weights_only=True)``, never unpickling code). A tlcore checkpoint is read
    with :func:`read`, so its checksum is verified."""
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
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointCorruptedError(f"cannot read {str(path)!r} as a weights-only state dict: "
                                           f"{short_repr(first, 200)}") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise NotACheckpointError(f"{str(path)!r} does not hold a state dict of tensors")
        return {k: v.detach().cpu().numpy() for k, v in sd.items()}
    header = _read_header(path)
    if "tlcore" in (header.get("__metadata__") or {}):
        return read(path)[0]
    return _read_tensors(path, header)
