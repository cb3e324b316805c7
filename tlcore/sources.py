"""Where training and inference data come from: one dispatch from any source to batches of numpy
arrays that every backend takes (as Keras' data adapters do for Keras alone).

Sources:

* arrays (numpy, ``np.memmap``, torch / TensorFlow / JAX tensors, dicts and tuples of them) with
  targets ``y`` and optional ``sample_weight``: batched and shuffled by tlcore's own seeded RNG, so
  the order is the same on every backend; converted batch by batch, so a memmap larger than memory
  is read a batch at a time;
* a torch ``DataLoader`` (or any re-iterable of batches), a ``tf.data.Dataset`` of batches, a
  generator function (called once per epoch), or a generator (one pass: give ``steps_per_epoch`` to
  read it across epochs): each yields ``(x, y)`` or ``(x, y, sample_weight)`` (``x`` alone for
  ``predict``); their own order is respected;
* a map-style torch ``Dataset`` (``__getitem__`` + ``__len__``): batched by tlcore like arrays.

A source is *deterministic* when it gives the same batches in the same order every epoch; only then
are frozen features cached. Arrays are; a loader is when you say so (``tl.data.Deterministic``).

Example:
    >>> import numpy as np
    >>> src = as_source(np.zeros((5, 2), np.float32), np.arange(5), batch_size=2, shuffle=False)
    >>> [b.x.shape[0] for b in src.batches(np.random.default_rng(0))], src.deterministic
    ([2, 2, 1], True)
    >>> gen = lambda: ((np.ones((2, 3)), np.array([0, 1])) for _ in range(3))
    >>> [b.y.tolist() for b in as_source(gen).batches(np.random.default_rng(0))]
    [[0, 1], [0, 1], [0, 1]]
"""
from __future__ import annotations

import abc
import numbers
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import data
from .errors import DataError


class Batch(NamedTuple):
    """One batch: inputs, targets (None for inference) and sample weights (None: all 1)."""

    x: Any
    y: np.ndarray | None = None
    w: np.ndarray | None = None


class Source(abc.ABC):
    """Batches for one epoch at a time."""

    #: the same batches in the same order every epoch (frozen features may then be cached)
    deterministic: bool = False
    #: the inputs were declared scaled (``tl.data.scale``): no warning about uint8 pixels
    scaled: bool = False

    @abc.abstractmethod
    def batches(self, rng: np.random.Generator) -> Iterator[Batch]:
        """The batches of one epoch (``rng``: tlcore's shuffling generator, for sources it shuffles)."""

    def first(self) -> Batch:
        """The first batch (to check the data and size a head before training)."""
        for batch in self.batches(np.random.default_rng(0)):
            return batch
        raise DataError(f"{self.describe()} yields no batch; it must give at least one")

    def describe(self) -> str:
        return type(self).__name__

    @property
    def steps(self) -> int | None:
        """Batches per epoch, when known."""
        return None


# ---------------------------------------------------------------------------- arrays
class Arrays(Source):
    """In-memory (or memory-mapped) arrays, batched and shuffled by tlcore."""

    deterministic = True  # a shuffle is tlcore's seeded RNG: a cache replays it exactly

    def __init__(self, x: data.Inputs, y: np.ndarray | None = None, w: np.ndarray | None = None,
                 batch_size: int = 32, shuffle: bool = False, scaled: bool = False):
        self.x, self.y, self.w = x, y, w
        self.batch_size, self.shuffle, self.scaled = batch_size, shuffle, scaled
        self.n = data.num_samples(x)

    @property
    def steps(self) -> int:
        return -(-self.n // self.batch_size)

    @property
    def converted(self) -> bool:
        """Every array already has tlcore's dtypes in memory (not a memmap converted batch by batch)."""
        arrays = self.x.values() if isinstance(self.x, dict) else self.x if isinstance(self.x, tuple) else [self.x]
        return all(not isinstance(a, np.memmap) and a.dtype == data.model_dtype(a.dtype) for a in arrays)

    def index_batches(self, rng: np.random.Generator) -> list:
        return list(data.batch_slices(self.n, self.batch_size, self.shuffle, rng))

    def batches(self, rng: np.random.Generator) -> Iterator[Batch]:
        for index in self.index_batches(rng):
            yield Batch(self._convert(data.take(self.x, index)), None if self.y is None else self.y[index],
                        None if self.w is None else self.w[index])
            data.release_pages(self.x)  # a memmap keeps only the batches in flight resident

    def _convert(self, x: data.Inputs) -> data.Inputs:
        """A batch's rows with tlcore's dtypes."""
        return data.batch_dtypes(x)

    def describe(self) -> str:
        return f"arrays of {self.n} samples"


# ---------------------------------------------------------------------------- streams
class Stream(Source):
    """Batches from an iterable: a loader, a ``tf.data.Dataset``, a generator (function).

    Args:
        make: returns the iterator of one epoch.
        name: what the source is, for messages.
        steps_per_epoch: stop an epoch after this many batches (required for an endless source).
        once: ``make`` can only be called once (a generator object): its batches are read on, epoch
            after epoch, and ``steps_per_epoch`` says where an epoch ends.
    """

    def __init__(self, make: Callable[[], Iterable], name: str, steps_per_epoch: int | None = None,
                 once: bool = False, deterministic: bool = False, scaled: bool = False):
        self.make, self.name, self.steps_per_epoch, self.once = make, name, steps_per_epoch, once
        self.deterministic, self.scaled = deterministic, scaled
        self._iterator: Iterator | None = None
        self._peeked: list = []  # the first batch, read by first(), and the iterator it came from
        self._rest: Iterator | None = None
        self._structure: tuple | None = None

    @property
    def steps(self) -> int | None:
        return self.steps_per_epoch

    def describe(self) -> str:
        return self.name

    def _raw(self) -> Iterator:
        if not self.once:
            return iter(self.make())
        if self._iterator is None:
            self._iterator = iter(self.make())
        return self._iterator

    def first(self) -> Batch:
        if not self._peeked:
            it = self._raw()
            try:
                raw = next(it)
            except StopIteration:
                raise DataError(f"{self.name} yields no batch; it must give at least one") from None
            self._peeked, self._rest = [raw], it
        return self._convert(self._peeked[0], 0)

    def batches(self, rng: np.random.Generator) -> Iterator[Batch]:
        # the epoch after a peek goes on with the peeked iterator: a loader is not started twice (its
        # workers, its sampler's shuffle) and the peeked batch is not read twice
        pending, it = (self._peeked, self._rest) if self._peeked else ([], self._raw())
        self._peeked, self._rest = [], None
        count = 0
        for raw in _chain(pending, it):
            yield self._convert(raw, count)
            count += 1
            if self.steps_per_epoch is not None and count >= self.steps_per_epoch:
                return
        if count == 0:
            raise DataError(f"{self.name} yields no batch in this epoch"
                            + ("; a generator is read once: pass a generator function, or steps_per_epoch"
                               if self.once else ""))

    def _convert(self, raw: Any, index: int) -> Batch:
        x, y, w = _split(raw, self.name, index)
        x = data.as_inputs(x, name=f"x of batch {index} of {self.name}")
        n = data.num_samples(x)
        y = None if y is None else data.to_numpy(y)
        w = None if w is None else data.to_numpy(w)
        for what, arr in (("y", y), ("sample_weight", w)):
            if arr is not None and (arr.ndim == 0 or len(arr) != n):
                raise DataError(f"batch {index} of {self.name} has {n} inputs but {len(arr) if arr.ndim else 0} "
                                f"{what} values")
        structure = _structure(x, y, w)
        if self._structure is None:
            self._structure = structure
        elif structure != self._structure:
            raise DataError(f"batch {index} of {self.name} has another structure than batch 0: {structure} "
                            f"instead of {self._structure} (every batch needs the same inputs, per-sample "
                            "shapes and kinds of values)")
        return Batch(x, y, w)


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


def _split(raw: Any, name: str, index: int) -> tuple[Any, Any, Any]:
    """``(x, y, w)`` of a raw batch: ``(x, y)``, ``(x, y, w)``, a dict with ``x``/``y``/``sample_weight``
    keys, or ``x`` alone."""
    if isinstance(raw, (tuple, list)) and len(raw) in (2, 3) and not _is_number_list(raw):
        return raw[0], raw[1], raw[2] if len(raw) == 3 else None
    if isinstance(raw, Mapping) and "x" in raw:
        return raw["x"], raw.get("y"), raw.get("sample_weight")
    if isinstance(raw, (tuple, list)) and len(raw) == 1:
        return raw[0], None, None
    if isinstance(raw, (tuple, list)) and len(raw) > 3:
        raise DataError(f"batch {index} of {name} has {len(raw)} parts; a batch is (x, y) or (x, y, sample_weight)")
    return raw, None, None


def _is_number_list(raw: Any) -> bool:
    return isinstance(raw, list) and all(isinstance(v, (int, float)) for v in raw)


def _structure(x: Any, y: Any, w: Any) -> tuple:
    """What must stay the same from batch to batch: names, per-sample shapes, kinds of values."""
    def sig(a: np.ndarray) -> tuple:
        return (a.shape[1:], a.dtype.kind)
    if isinstance(x, dict):
        xs = tuple(sorted((k, sig(v)) for k, v in x.items()))
    elif isinstance(x, tuple):
        xs = tuple(sig(v) for v in x)
    else:
        xs = sig(x)
    return (xs, None if y is None else sig(y), w is not None)


# ---------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Deterministic:
    """Declare that ``source`` gives the same batches in the same order every epoch (no random
    augmentation, no shuffling), so that frozen features may be cached.

    Example:
        >>> import tlcore as tl
        >>> loader = [(np.zeros((2, 3)), np.array([0, 1]))]
        >>> as_source(tl.data.Deterministic(loader)).deterministic
        True
    """

    source: Any


@dataclass(frozen=True)
class Scaled:
    """``x`` multiplied by ``factor`` batch by batch (see :func:`scale`)."""

    x: Any
    factor: float


def scale(x: Any, factor: float) -> Scaled:
    """Declare that inputs ``x`` (e.g. uint8 pixels) are multiplied by ``factor`` (e.g. ``1 / 255``)
    as they are batched: a memmap of images stays on disk, and ``fit`` does not warn about uint8.

    Example:
        >>> src = as_source(scale(np.full((2, 2), 255, np.uint8), 1 / 255), np.array([0, 1]), batch_size=2)
        >>> next(src.batches(np.random.default_rng(0))).x.tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    if isinstance(factor, (bool, np.bool_)) or not isinstance(factor, numbers.Real) or not np.isfinite(factor) \
            or factor == 0:
        raise DataError(f"scale factor must be a finite number other than 0 (e.g. 1 / 255), got {factor!r}")
    return Scaled(x, data.as_float(factor))


class _ScaledArrays(Arrays):
    def __init__(self, factor: float, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.factor = factor

    def _convert(self, x: data.Inputs) -> data.Inputs:
        return _times(x, self.factor)


def _times(x: Any, factor: float) -> Any:
    """``x`` (a batch's rows as read) with tlcore's dtypes, its float (and uint8) arrays multiplied by
    ``factor`` in float32: one pass and one new array (converting first, then scaling, computes the same
    values through a second batch-sized array)."""
    if isinstance(x, dict):
        return {k: _times(v, factor) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_times(v, factor) for v in x)
    if data.model_dtype(x.dtype) != np.float32:
        return data.batch_dtypes(x)
    return np.multiply(x, np.float32(factor), dtype=np.float32)


# ---------------------------------------------------------------------------- dispatch
def _module(obj: Any) -> str:
    return " ".join(c.__module__ or "" for c in type(obj).__mro__)


def is_source(x: Any) -> bool:
    """True when ``x`` is a source of batches rather than arrays."""
    if isinstance(x, (Source, Deterministic)) or (isinstance(x, Scaled) and is_source(x.x)):
        return True
    if isinstance(x, list) and x and all(isinstance(b, tuple) for b in x):
        return True  # a list of (x, y) batches (a list of lists is one numeric array)
    if isinstance(x, (np.ndarray, Mapping, tuple, list, str, bytes)) or hasattr(x, "__array__"):
        return False
    mods = _module(x)
    if "torch.utils.data" in mods or "tensorflow" in mods and hasattr(x, "as_numpy_iterator"):
        return True
    return callable(x) or isinstance(x, Iterable)


def as_source(x: Any, y: Any = None, sample_weight: Any = None, *, batch_size: int = 32, shuffle: bool = False,
              steps_per_epoch: int | None = None) -> Source:
    """The :class:`Source` for ``x`` (and ``y``/``sample_weight`` for arrays); see the module docstring.

    Raises:
        DataError: a source given with ``y``, arrays without the targets ``fit`` needs (checked by the
            caller), an endless ``tf.data.Dataset`` without ``steps_per_epoch``.
    """
    deterministic, scaled = False, False
    if isinstance(x, Deterministic):
        x, deterministic = x.source, True
    if isinstance(x, Scaled):
        factor, x = x.factor, x.x
        if not is_source(x):
            xs = data.as_inputs(x)
            return _ScaledArrays(factor, xs, _targets(y, xs), _weights(sample_weight, xs), batch_size, shuffle, True)
        scaled = True
    if isinstance(x, Source):
        return x
    if not is_source(x):
        xs = data.as_inputs(x)
        return Arrays(xs, _targets(y, xs), _weights(sample_weight, xs), batch_size, shuffle)
    if y is not None or sample_weight is not None:
        raise DataError(f"{type(x).__name__} is a source of batches: its batches carry the targets (and weights); "
                        "call fit(source) without y and sample_weight")
    mods = _module(x)
    if "torch.utils.data" in mods and not hasattr(x, "__iter__") or _map_style(x, mods):
        return _TorchDataset(x, batch_size, shuffle)
    if "tensorflow" in mods and hasattr(x, "as_numpy_iterator"):
        if steps_per_epoch is None and _endless_tf(x):
            raise DataError("this tf.data.Dataset repeats forever; give fit(..., steps_per_epoch=...) to say where "
                            "an epoch ends")
        return Stream(x.as_numpy_iterator, "tf.data.Dataset", steps_per_epoch, deterministic=deterministic,
                      scaled=scaled)
    if isinstance(x, Iterator):
        return Stream(lambda: x, "generator", steps_per_epoch, once=True, deterministic=deterministic, scaled=scaled)
    if callable(x) and not isinstance(x, Iterable):
        return Stream(x, f"generator function {getattr(x, '__name__', '')}".strip(), steps_per_epoch,
                      deterministic=deterministic, scaled=scaled)
    name = "DataLoader" if "torch.utils.data" in mods else type(x).__name__
    return Stream(lambda: x, name, steps_per_epoch, deterministic=deterministic, scaled=scaled)


def _map_style(x: Any, mods: str) -> bool:
    return "torch.utils.data" in mods and hasattr(x, "__getitem__") and hasattr(x, "__len__") \
        and not hasattr(x, "batch_size")


def _endless_tf(ds: Any) -> bool:
    try:
        import tensorflow as tf

        return int(ds.cardinality()) == int(tf.data.INFINITE_CARDINALITY)
    except Exception:
        return False


def _targets(y: Any, x: Any) -> np.ndarray | None:
    return None if y is None else data.to_numpy(y)


def _weights(w: Any, x: Any) -> np.ndarray | None:
    return None if w is None else data.to_numpy(w)


class _TorchDataset(Source):
    """A map-style torch ``Dataset``: tlcore batches its samples (and shuffles them with its RNG)."""

    deterministic = False  # a dataset's __getitem__ may augment: cached only when declared

    def __init__(self, dataset: Any, batch_size: int, shuffle: bool):
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle

    @property
    def steps(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def describe(self) -> str:
        return f"{type(self.dataset).__name__} of {len(self.dataset)} samples"

    def batches(self, rng: np.random.Generator) -> Iterator[Batch]:
        stream = Stream(lambda: self._collated(rng), self.describe())
        yield from stream.batches(rng)

    def _collated(self, rng: np.random.Generator) -> Iterator[tuple]:
        for index in data.batch_slices(len(self.dataset), self.batch_size, self.shuffle, rng):
            ids = range(index.start, index.stop) if isinstance(index, slice) else index.tolist()
            samples = [self.dataset[i] for i in ids]
            yield _collate(samples)


def _collate(samples: list) -> Any:
    """Stack samples (tuples, dicts or arrays of numpy / tensors) into one batch."""
    first = samples[0]
    if isinstance(first, Mapping):
        return {k: _collate([s[k] for s in samples]) for k in first}
    if isinstance(first, (tuple, list)):
        return tuple(_collate([s[i] for s in samples]) for i in range(len(first)))
    return np.stack([data.to_numpy(s) for s in samples])


# ---------------------------------------------------------------------------- prefetching
def prefetch(batches: Iterator[Batch], depth: int = 2) -> Iterator[Batch]:
    """The same batches, produced (read, converted) in a background thread ``depth`` batches ahead,
    so that reading the next batch overlaps the current step. An error in the thread is raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def work() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        q.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    thread = threading.Thread(target=work, daemon=True, name="tlcore-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


__all__ = ["Arrays", "Batch", "Deterministic", "Source", "Stream", "as_source", "is_source", "prefetch", "scale"]
