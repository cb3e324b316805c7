"""The training loop every backend shares: a source's batches through the backend's step, metrics in
numpy from the step's outputs, progress, and the frozen-feature cache.

Example:
    >>> resolve_progress(False), resolve_progress("epoch")
    ('off', 'epoch')
"""
from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import data, losses
from .errors import DataError
from .metrics import Accumulator
from .sources import Arrays, Batch, Source, prefetch

log = logging.getLogger("tlcore")

PROGRESS = ("bar", "epoch", "off")
#: bytes of cached frozen features kept in memory; beyond, batches are written to a temporary folder
#: and read back memory-mapped
CACHE_MEMORY_BYTES = 1 << 30
#: bytes of each block the in-memory feature cache copies small batches into (see FeatureCache.keep)
CACHE_BLOCK_BYTES = 8 << 20


def resolve_progress(progress: bool | str) -> str:
    """``"bar"`` (tqdm), ``"epoch"`` (one line per epoch) or ``"off"``; ``True``: a bar on a terminal,
    lines otherwise."""
    if progress is True:
        return "bar" if sys.stderr.isatty() else "epoch"
    if progress is False or progress is None:
        return "off"
    if progress not in PROGRESS:
        raise DataError(f"progress must be True, False, 'bar' or 'epoch', got {progress!r}")
    return progress


class Progress:
    """What a fit reports: a tqdm bar, a line per epoch (through the ``tlcore`` logger when logging is
    configured for INFO, else on stderr), or nothing."""

    def __init__(self, mode: str, total: int | None, desc: str):
        self.mode = mode
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", leave=False, desc=desc)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def epoch(self, index: int, epochs: int, metrics: dict[str, float], seconds: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()})
        elif self.mode == "epoch":
            line = f"epoch {index + 1}/{epochs} - " + " - ".join(f"{k} {v:.4f}" for k, v in metrics.items()) \
                + f" - {seconds:.1f} s"
            if log.isEnabledFor(logging.INFO) and (log.handlers or logging.getLogger().handlers):
                log.info(line)
            else:
                print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def checked_batches(source: Source, rng: np.random.Generator, check) -> Iterator[Batch]:
    """The source's batches for one epoch, each checked by ``check(batch, index)`` (targets converted),
    read ahead in a background thread. The check runs here, in the caller's thread: it may run the
    model (a dry run for the output width), which must not overlap the training step."""
    for i, batch in enumerate(prefetch(source.batches(rng))):
        yield check(batch, i)


class LearningRates:
    """The base learning rate of each step of an epoch, from a schedule and the optimizer step the
    epoch starts at; ``applied`` records those handed to the trainer."""

    def __init__(self, schedule: Any, start: int):
        self.schedule, self.start, self.applied = schedule, start, []

    def take(self, n: int) -> list[float]:
        """The rates of the next ``n`` steps."""
        first = self.start + len(self.applied)
        rates = np.atleast_1d(self.schedule.lr_at(np.arange(first, first + n))).tolist()
        self.applied += rates
        return rates


#: stream steps whose outputs may be collected later than dispatched (see Trainer.dispatch)
PIPELINE = 2


def run_epoch(trainer: Any, source: Source, rng: np.random.Generator, acc: Accumulator, check,
              on_step: Callable[[int], Any], lrs: LearningRates, start: int = 0, every: int | None = None,
              on_boundary: Callable[[int], Any] | None = None) -> int:
    """Train one epoch from its batch ``start`` (those before were trained already: a resumed run) at
    the schedule's rates; add every applied batch's outputs to ``acc``; after each step that makes the
    run's step count a multiple of ``every``, call ``on_boundary(batches of the epoch done)``. Stops
    after a step the trainer refused as non-finite (``trainer.nonfinite``). Returns the batches of
    the epoch done (``start`` + the steps applied); ``lrs.applied`` holds the applied steps' rates."""
    def boundary(done: int) -> None:
        if on_boundary is not None and every is not None and (lrs.start + len(lrs.applied)) % every == 0:
            on_boundary(done)

    if type(source) is Arrays and source.converted:  # arrays in memory: the backend may run the epoch at once
        index = source.index_batches(rng)
        done = start
        while done < len(index):
            run_steps = lrs.start + len(lrs.applied)
            end = len(index) if every is None else min(len(index), done + every - run_steps % every)
            part = index[done:end]
            outs = trainer.epoch(source.x, source.y, source.w, part, on_step, lrs.take(len(part)))
            applied = len(outs) - (trainer.nonfinite is not None)
            del lrs.applied[len(lrs.applied) - len(part) + applied:]  # rates of steps that did not apply
            for b, logits in zip(part[:applied], outs):
                acc.update(np.asarray(logits), source.y[b], None if source.w is None else source.w[b])
            done += applied
            if trainer.nonfinite is not None:
                break
            boundary(done)
        return done
    # a stream: each step dispatched, its outputs collected up to PIPELINE steps later (a framework
    # that runs asynchronously reads the next batch meanwhile), every one before a checkpoint
    pending: deque = deque()
    collected = [start]

    def collect(keep: int) -> bool:
        while len(pending) > keep:
            i, handle, batch = pending.popleft()
            logits = trainer.collect(handle)
            if trainer.nonfinite is not None:  # this step and those dispatched after it changed nothing
                del lrs.applied[len(lrs.applied) - 1 - len(pending):]
                return False
            acc.update(np.asarray(logits), batch.y, batch.w)
            collected[0] = i + 1
        return True

    try:
        for i, batch in enumerate(checked_batches(source, rng, check)):
            if i < start:
                continue  # trained before the run was interrupted
            pending.append((i, trainer.dispatch(batch.x, batch.y, batch.w, lrs.take(1)[0]), batch))
            due = on_boundary is not None and every is not None and (lrs.start + len(lrs.applied)) % every == 0
            if not collect(0 if due else PIPELINE):
                return collected[0]
            on_step(1)
            if due:
                boundary(collected[0])
    except BaseException:  # Ctrl-C, a bad batch: the steps dispatched are done, count them first
        collect(0)
        raise
    collect(0)
    return collected[0]


class DeferredInterrupt:
    """Ctrl-C while training stops at the next step boundary, not inside a step, so that the model is
    the last completed step's (weights, BatchNorm statistics, optimizer state, all from one step). A
    second Ctrl-C stops at once. Outside :meth:`steps` (validation, feature caching) Ctrl-C stops at
    once as usual. Only in the main thread, and only when Python's own handler is installed.

    Example:
        >>> with DeferredInterrupt() as interrupt:
        ...     with interrupt.steps():
        ...         pass  # the training steps; call interrupt.check() between them
    """

    def __init__(self) -> None:
        self.requested = self.deferring = False
        self.previous: Any = None

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.deferring or self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ntlcore: stopping after the step in progress (Ctrl-C again to stop at once)", file=sys.stderr)

    @contextlib.contextmanager
    def steps(self) -> Iterator[None]:
        """Within this block Ctrl-C is deferred to the next :meth:`check` (or the block's end)."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        self.check()

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed since the last check."""
        if self.requested:
            self.requested = False
            raise KeyboardInterrupt


def evaluate_source(forward, source: Source, names: tuple[str, ...], spec: losses.LossSpec, check,
                    nonfinite: str = "raise") -> dict:
    """Loss and metrics of ``forward(x)`` over a source's batches (inference); ``nonfinite`` as
    :class:`~tlcore.metrics.Accumulator`'s."""
    acc = Accumulator(names, spec, nonfinite)
    for batch in checked_batches(source, np.random.default_rng(0), check):
        acc.update(forward(batch.x), batch.y, batch.w)
    return acc.result()


class FeatureCache(Source):
    """Frozen features of a deterministic source, batch by batch in its order, replayed every epoch;
    in memory up to :data:`CACHE_MEMORY_BYTES`, then in a temporary folder (memory-mapped).

    Example:
        >>> cache = FeatureCache(limit=0)          # everything to disk
        >>> cache.add(Batch(np.ones((2, 3), np.float32), np.array([0, 1]), None))
        >>> [b.x.shape for b in cache.batches(np.random.default_rng(0))], cache.on_disk
        ([(2, 3)], True)
        >>> cache.close()
    """

    deterministic = True

    def __init__(self, limit: int = CACHE_MEMORY_BYTES, block: int = CACHE_BLOCK_BYTES):
        self.limit, self.bytes, self.block = limit, 0, block
        self.items: list = []
        self.folder: Path | None = None
        self._free: np.ndarray | None = None  # the unused end of the current block

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    @property
    def steps(self) -> int:
        return len(self.items)

    def add(self, batch: Batch) -> None:
        self.bytes += batch.x.nbytes
        y, w = self.keep(batch.y), self.keep(batch.w)
        if self.bytes > self.limit:
            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix="tlcore-features-"))
            path = self.folder / f"{len(self.items)}.npy"
            np.save(path, batch.x)
            self.items.append(Batch(path, y, w))
        else:
            self.items.append(Batch(self.keep(batch.x), y, w))

    def keep(self, a: Any) -> Any:
        """``a`` (a numpy array smaller than half a block) copied into the cache's current block of
        :data:`CACHE_BLOCK_BYTES`: what the cache keeps then lies in a few large blocks, not in a small
        array per batch. Small arrays kept one by one while batch-sized ones (the inputs, the frozen
        part's activations) come and go between them fragment the process's heap: on glibc, caching
        the features of 50,000 images of 64x64x3 peaked at up to 3x the RSS of caching 500."""
        if not isinstance(a, np.ndarray) or a.dtype.hasobject or 2 * a.nbytes > self.block:
            return a
        size = -(-a.nbytes // 64) * 64  # each array 64-byte aligned in its block
        if self._free is None or len(self._free) < size:
            self._free = np.empty(self.block, np.uint8)
        out = self._free[:a.nbytes].view(a.dtype).reshape(a.shape)
        out[...] = a
        self._free = self._free[size:]
        return out

    def batches(self, rng: np.random.Generator) -> Iterator[Batch]:
        for item in self.items:
            yield item if not isinstance(item.x, Path) else item._replace(x=np.load(item.x, mmap_mode="r"))

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def stacked(chunks: Iterator, n: int) -> np.ndarray:
    """The ``n`` rows of ``chunks`` (arrays of rows, in order) in one array allocated at the first
    chunk: each chunk is freed as soon as it is copied, so no small array outlives its batch (kept
    until the end, they would pin the heap between the batches' large buffers and let it grow).

    Example:
        >>> stacked(iter([np.zeros((2, 3)), np.ones((1, 3))]), 3).sum()
        np.float64(3.0)
    """
    out, at = None, 0
    for chunk in chunks:
        chunk = np.asarray(chunk)
        if out is None:
            out = np.empty((n, *chunk.shape[1:]), chunk.dtype)
        out[at:at + len(chunk)] = chunk
        at += len(chunk)
    if out is None or at != n:
        raise DataError(f"the feature pass gave {at} rows for {n} samples")
    return out


def cache_features(features, source: Source, rng: np.random.Generator, check, batch_size: int) -> Source:
    """The frozen features of ``source`` as a source for the head: arrays (shuffled as the original
    would be) for arrays, a :class:`FeatureCache` replaying a deterministic stream's order."""
    if type(source) is Arrays:
        chunks = (features(data.take(source.x, slice(i, i + batch_size))) for i in range(0, source.n, batch_size))
        return Arrays(stacked(chunks, source.n), source.y, source.w, source.batch_size, source.shuffle)
    if isinstance(source, Arrays):  # converted batch by batch (tl.data.scale): in order, then shuffled per epoch
        ordered = copy.copy(source)
        ordered.shuffle, ordered.batch_size = False, batch_size
        chunks = (features(b.x) for b in checked_batches(ordered, rng, check))
        return Arrays(stacked(chunks, source.n), source.y, source.w, source.batch_size, source.shuffle)
    cache = FeatureCache()
    for batch in checked_batches(source, rng, check):
        cache.add(Batch(np.asarray(features(batch.x)), batch.y, batch.w))
    return cache


def elapsed(t0: float) -> float:
    return time.perf_counter() - t0
