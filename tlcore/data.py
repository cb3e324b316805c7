"""Data handling shared by every backend: checks, conversion to numpy, seeded batching.

Everything here runs before a backend sees the data, so bad input is refused before any weight is
touched.

Example:
    >>> import numpy as np
    >>> from tlcore.data import batch_slices
    >>> [len(b) for b in batch_slices(10, 4, shuffle=True, rng=np.random.default_rng(0))]
    [4, 4, 2]
"""
from __future__ import annotations

import mmap
import numbers
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np

from .errors import DataError


#: seeds are taken in [0, 2**32), which every framework's generator accepts
MAX_SEED = 2**32 - 1


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int in ``[0, 2**32)``, else a :class:`DataError` (numpy ints are accepted).

    Example:
        >>> check_seed(np.int64(3))
        3
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise DataError(f"{name} must be an int in [0, 2**32), got {seed!r}")
    return int(seed)


def as_float(value: numbers.Real) -> float:
    """A number as a Python float; a numpy float16/float32 becomes the shortest decimal that is the same
    number in its own precision (what was typed: ``np.float32(0.1)`` gives ``0.1``, not
    ``0.10000000149011612``), so a spec built from numpy scalars equals one built from Python numbers.

    Example:
        >>> as_float(np.float32(0.1)), as_float(np.int64(3)), as_float(2.5)
        (0.1, 3.0, 2.5)
    """
    if isinstance(value, np.floating) and value.dtype.itemsize < 8:
        return float(str(value))
    return float(value)


def check_input_shape(shape, name: str = "input_shape") -> tuple[int | None, ...] | None:
    """A per-sample input shape as a tuple of ints >= 1 (None for a size that may vary), or None.

    Example:
        >>> check_input_shape([3, None, None])
        (3, None, None)
    """
    if shape is None:
        return None
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise DataError(f"{name} must be a tuple of sizes per sample (no batch), e.g. (32, 32, 3); got {shape!r}")
    out = []
    for d in shape:
        if d is not None and (isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1):
            raise DataError(f"{name} sizes must be ints >= 1 (or None where they vary), got {tuple(shape)!r}")
        out.append(None if d is None else int(d))
    return tuple(out)


def fully_known(shape) -> bool:
    """True when ``shape`` is a shape with every size known."""
    return shape is not None and all(d is not None for d in shape)


#: what models take: one array, a dict of named arrays (Keras named inputs, Hugging Face's
#: ``input_ids``/``attention_mask``), or a tuple of arrays in input order
Inputs = Union[np.ndarray, dict, tuple]


def to_numpy(value: Any) -> np.ndarray:
    """A numpy view or copy of an array-like: numpy, lists, torch / TensorFlow / JAX tensors."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor (gradients are not data)
        value = value.detach().cpu()
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # torch and TensorFlow tensors
        value = value.numpy()
    return np.asarray(value)


def model_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype tlcore gives an input array: float32 for floats (and uint8 images, which are pixel
    values), int64 for other integers (token ids stay integers), bool as it is."""
    if dtype.kind == "f" or dtype == np.uint8:
        return np.dtype(np.float32)
    if dtype.kind in "iu":
        return np.dtype(np.int64)
    return dtype


#: rows of a memory-mapped array checked at a time (the check reads the file, never holds it)
CHUNK_ROWS = 4096


def _as_array(value: Any, name: str) -> np.ndarray:
    """One input array with tlcore's dtypes (:func:`model_dtype`), checked: not empty, finite where
    float. An ``np.memmap`` keeps its dtype (batches are converted as they are read, see
    :func:`batch_dtypes`) and is checked a chunk at a time, so it is never read whole into memory."""
    try:
        arr = value if isinstance(value, np.memmap) else to_numpy(value)  # np.asarray would drop the mapping
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{name} must be a numeric array, got {type(value).__name__}: {e}") from None
    kind = arr.dtype.kind
    if kind == "c":
        raise DataError(f"{name} is complex ({arr.dtype}); models take real numbers")
    if kind not in "biuf":
        try:
            arr = arr.astype(np.float32)
        except (TypeError, ValueError) as e:
            raise DataError(f"{name} must be a numeric array, got {type(value).__name__} of dtype {arr.dtype}: "
                            f"{e}") from None
    elif not isinstance(arr, np.memmap):
        if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise DataError(f"{name} holds values up to {arr.max()}, beyond int64 (the integers models take)")
        arr = arr.astype(model_dtype(arr.dtype), copy=False)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise DataError(f"{name} is empty (shape {arr.shape}); give at least one sample")
    if arr.dtype.kind == "f":
        rows = CHUNK_ROWS if isinstance(arr, np.memmap) else len(arr)
        for start in range(0, len(arr), rows):
            _check_finite(arr[start:start + rows], name)
            release_pages(arr)
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    # a finite sum proves every value finite without a mask of the whole array (4x faster); an
    # infinite one may be an overflow of finite values, so the exact check decides
    if not np.isfinite(np.add.reduce(arr, axis=None)) and not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise DataError(f"{name} contains {bad} NaN or infinite value(s); clean or impute them first")


def batch_dtypes(x: Any) -> Any:
    """A batch with tlcore's dtypes (a no-op for arrays already converted; memmaps are converted
    here, a batch at a time)."""
    if isinstance(x, dict):
        return {k: batch_dtypes(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(batch_dtypes(v) for v in x)
    return np.asarray(x, dtype=model_dtype(x.dtype))


def release_pages(x: Any) -> None:
    """Unmap the pages a read-only or shared ``np.memmap`` in ``x`` has read (they stay in the OS's
    file cache, so reading them again is cheap): a pass over a file larger than memory then keeps
    only a batch of it resident in this process. Other arrays, and copy-on-write maps (mode ``"c"``,
    whose pages may hold the only copy of a change), are left alone.

    Example:
        >>> release_pages(np.zeros(3))  # not a memmap: nothing to do
    """
    if isinstance(x, dict):
        for v in x.values():
            release_pages(v)
    elif isinstance(x, tuple):
        for v in x:
            release_pages(v)
    elif isinstance(x, np.memmap) and getattr(x, "mode", "c") in ("r", "r+") and hasattr(mmap, "MADV_DONTNEED"):
        mapping = getattr(x, "_mmap", None)  # numpy's handle on the mapping, shared by its views
        if mapping is not None and not mapping.closed:
            mapping.madvise(mmap.MADV_DONTNEED)


def as_inputs(x: Any, input_shape: Sequence[int | None] | None = None, name: str = "x", hint: str = "") -> Inputs:
    """``x`` checked and converted (see :func:`_as_array`): an array, a dict of arrays or a tuple of
    arrays (a list is one array), every array non-empty, finite where it is float, all of the same
    length; one array is checked against the model's per-sample ``input_shape`` (``hint`` is added
    to that error, e.g. the zoo option that sets it).

    Example:
        >>> batch = as_inputs({"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 0]]})
        >>> batch["input_ids"].dtype, num_samples(batch)
        (dtype('int64'), 1)
    """
    if isinstance(x, Mapping):
        if not x:
            raise DataError(f"{name} is an empty dict; give the model's inputs by name")
        out: Inputs = {str(k): _as_array(v, f"{name}[{k!r}]") for k, v in x.items()}
        arrays = list(out.values())
    elif isinstance(x, tuple):
        if not x:
            raise DataError(f"{name} is an empty tuple; give the model's inputs in order")
        out = tuple(_as_array(v, f"{name}[{i}]") for i, v in enumerate(x))
        arrays = list(out)
    else:
        out = _as_array(x, name)
        arrays = [out]
        if input_shape is not None:
            expected = (None, *input_shape)
            if out.ndim != len(expected):
                raise DataError(f"{name} has {out.ndim} dimensions (shape {out.shape}); the model takes "
                                f"{len(expected)}: (batch, {', '.join(map(str, input_shape))})")
            if not _fits(expected[1:], out.shape[1:]):
                raise DataError(f"{name} has per-sample shape {out.shape[1:]}; the model takes {tuple(input_shape)}"
                                + (f" ({hint})" if hint else "") + _layout_hint(tuple(input_shape), out.shape[1:]))
    lengths = {len(a) for a in arrays}
    if len(lengths) > 1:
        sizes = {k: len(v) for k, v in out.items()} if isinstance(out, dict) else [len(a) for a in arrays]
        raise DataError(f"the arrays of {name} have different lengths: {sizes}; every input needs one row per sample")
    return out


def _fits(expected: Sequence[int | None], shape: Sequence[int]) -> bool:
    return len(expected) == len(shape) and all(e is None or e == a for e, a in zip(expected, shape))


def _layout_hint(expected: tuple, shape: tuple) -> str:
    """Advice when images are channels-last and the model takes channels-first (a PyTorch model), or
    the reverse (tlcore's zoo and Keras models take channels-last on every backend)."""
    if len(shape) != 3:
        return ""
    if _fits(expected, (shape[2], shape[0], shape[1])):
        return "; these look channels-last and the model takes channels first: pass x.transpose(0, 3, 1, 2)"
    if _fits(expected, (shape[1], shape[2], shape[0])):
        return "; these look channels-first and the model takes channels last: pass x.transpose(0, 2, 3, 1)"
    return ""


def any_uint8(x: Any) -> bool:
    """True when ``x`` (or an array in it) holds uint8 values: pixels, which train unscaled."""
    if isinstance(x, Mapping):
        return any(any_uint8(v) for v in x.values())
    if isinstance(x, tuple):
        return any(any_uint8(v) for v in x)
    return getattr(x, "dtype", None) == np.uint8


def num_samples(x: Inputs) -> int:
    """The number of samples (rows) of an array, dict or tuple of arrays."""
    first = next(iter(x.values())) if isinstance(x, dict) else x[0] if isinstance(x, tuple) else x
    return len(first)


def take(x: Inputs, index: slice | np.ndarray) -> Inputs:
    """The rows ``index`` (a slice: no copy; or indices) of every array of ``x``; rows at indices of
    a memmap are read from its file (:func:`read_rows`)."""
    if isinstance(x, dict):
        return {k: take(v, index) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(take(v, index) for v in x)
    if isinstance(x, np.memmap) and isinstance(index, np.ndarray):
        rows = read_rows(x, index)
        if rows is not None:
            return rows
    return x[index]


def read_rows(x: np.memmap, index: np.ndarray) -> np.ndarray | None:
    """Rows ``index`` of a C-ordered memmap read with ``os.preadv``, not through the mapping: a
    shuffled batch through the mapping maps a large page-cache folio per row (hundreds of MB of RSS
    for a batch), a read copies only the rows. None where the file position is unknown.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.npy")
        >>> np.save(path, np.arange(12).reshape(4, 3))
        >>> read_rows(np.load(path, mmap_mode="r")[1:], np.array([2, 0])).tolist()
        [[9, 10, 11], [3, 4, 5]]
    """
    mapping, name = getattr(x, "_mmap", None), getattr(x, "filename", None)
    if mapping is None or name is None or mapping.closed or not x.flags.c_contiguous or not hasattr(os, "preadv") \
            or getattr(x, "mode", "c") == "c":  # a copy-on-write map's changes are not in the file
        return None
    index = np.asarray(index)
    if index.ndim != 1 or index.dtype.kind not in "iu" or (index.size and not -len(x) <= index.min() <= index.max() < len(x)):
        return None  # let numpy index (and raise) as it would
    view = np.frombuffer(mapping, dtype=np.uint8)  # the whole mapping, to find where x starts in it
    start = x.__array_interface__["data"][0] - view.__array_interface__["data"][0]
    del view
    position = x.offset - x.offset % mmap.ALLOCATIONGRANULARITY + start  # of row 0 in the file
    out = np.empty((len(index), *x.shape[1:]), dtype=x.dtype)
    row = x.strides[0] if x.ndim else x.itemsize
    fd = os.open(name, os.O_RDONLY)
    try:
        for j, i in enumerate(index.tolist()):
            target = memoryview(out[j:j + 1]).cast("B")
            if os.preadv(fd, [target], position + (i % len(x)) * row) != row:
                return None
    finally:
        os.close(fd)
    return out


def batch_slices(n: int, batch_size: int, shuffle: bool,
                 rng: np.random.Generator) -> Iterator[np.ndarray | slice]:
    """Indices of successive batches over ``n`` samples (the last one may be shorter): index arrays
    when shuffling, plain slices (no copy of the data) otherwise."""
    order = rng.permutation(n) if shuffle else None
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n)) if order is None else order[start:start + batch_size]


def check_positive_int(name: str, value: int) -> int:
    """``value`` as an int >= 1 (numpy ints accepted, bools refused), else a :class:`DataError`.

    Example:
        >>> check_positive_int("epochs", np.int64(2))
        2
    """
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < 1:
        raise DataError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool (``np.bool_`` accepted), else a :class:`DataError`: ``"yes"`` or ``1`` would
    be taken as true by Python, silently.

    Example:
        >>> check_bool("shuffle", np.bool_(False))
        False
    """
    if not isinstance(value, (bool, np.bool_)):
        raise DataError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_fraction(name: str, value: Any, low: float = 0.0, high: float = 1.0) -> float:
    """``value`` as a float strictly between ``low`` and ``high`` (numpy floats accepted), else a
    :class:`DataError`.

    Example:
        >>> check_fraction("test_fraction", np.float32(0.25))
        0.25
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not low < value < high:
        raise DataError(f"{name} must be a number in ({low:g}, {high:g}), got {value!r}")
    return float(value)


def state_value(value: Any, like: np.ndarray) -> tuple[np.ndarray | None, str]:
    """``value`` converted to ``like``'s dtype for ``Model.load_state``, and ``""``; or ``(None, why)``
    when that would not be the value given: not numeric, complex, NaN or infinite, too large for the
    dtype (``1e40`` into float32, ``300`` into uint8), or not a whole number for an integer tensor.
    ``like``'s shape is checked by the caller.

    Example:
        >>> state_value([1e40], np.zeros(1, np.float32))[1]
        'has a value (1e+40) beyond the range of float32 (3.40282e+38)'
        >>> state_value(np.array([1.5]), np.zeros(1, np.int64))[1]
        'has values that are not whole numbers (e.g. 1.5) for an int64 tensor'
    """
    try:
        arr = to_numpy(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        return None, f"is not a numeric array ({type(value).__name__}: {e})"
    dtype, kind = like.dtype, arr.dtype.kind
    if kind == "c":
        return None, f"is complex ({arr.dtype}); tensors hold real numbers"
    if kind not in "biuf":
        return None, f"is not numeric (dtype {arr.dtype})"
    if arr.size == 0:
        return arr.astype(dtype), ""
    if kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            nan = int(np.isnan(arr).sum())
            return None, f"has {nan} NaN and {int(arr.size - finite.sum()) - nan} inf value(s)"
    if dtype.kind == "f":
        if kind == "f" and arr.dtype.itemsize <= dtype.itemsize or kind in "biu" and dtype.itemsize >= 4:
            return arr.astype(dtype), ""  # always in range: no pass over the values
        top = float(np.max(np.abs(arr.astype(np.float64))))
        if top > float(np.finfo(dtype).max):
            return None, f"has a value ({top:g}) beyond the range of {dtype} ({float(np.finfo(dtype).max):g})"
    elif dtype.kind in "iub":
        if kind == "f" and not np.array_equal(arr, np.trunc(arr)):
            example = arr.flat[int(np.flatnonzero(arr != np.trunc(arr))[0])]
            return None, f"has values that are not whole numbers (e.g. {example:g}) for an {dtype} tensor"
        lo, hi = (0, 1) if dtype.kind == "b" else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
        low, high = arr.min(), arr.max()
        low, high = (float(low), float(high)) if kind == "f" else (int(low), int(high))
        if low < lo or high > hi:
            bad = low if low < lo else high
            return None, f"has a value ({bad:g}) out of the range of {dtype} ({lo} to {hi})"
    return arr.astype(dtype), ""


def __getattr__(name: str) -> Any:
    """``tl.data.Deterministic`` and ``tl.data.scale`` live in :mod:`tlcore.sources` (which needs this module)."""
    if name in ("Deterministic", "scale"):
        from . import sources

        return getattr(sources, name)
    raise AttributeError(f"module 'tlcore.data' has no attribute {name!r}")
