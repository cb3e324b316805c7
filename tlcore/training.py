"""The training loop every backend shares: a source's batches through the backend's step, metrics in
numpy from the step's outputs, progress, and the frozen-feature cache.

Example:
    >>> resolve_progress(False), resolve_progress("epoch")
    ('off', 'epoch')
"""
from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
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
    read ahead in a background thread."""
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


def run_epoch(trainer: Any, source: Source, rng: np.random.Generator, acc: Accumulator, check,
              progress: Progress, lrs: LearningRates) -> int:
    """Train one epoch at the schedule's rates; add every batch's outputs to ``acc``; return the
    number of steps."""
    if type(source) is Arrays and source.converted:  # arrays in memory: the backend may run the epoch at once
        index = source.index_batches(rng)
        outs = trainer.epoch(source.x, source.y, source.w, index, progress.step, lrs.take(len(index)))
        for b, logits in zip(index, outs):
            acc.update(np.asarray(logits), source.y[b], None if source.w is None else source.w[b])
        return len(index)
    steps = 0
    for batch in checked_batches(source, rng, check):
        logits = trainer.step(batch.x, batch.y, batch.w, lrs.take(1)[0])
        acc.update(np.asarray(logits), batch.y, batch.w)
        progress.step()
        steps += 1
    return steps


def evaluate_source(forward, source: Source, names: tuple[str, ...], spec: losses.LossSpec, check) -> dict:
    """Loss and metrics of ``forward(x)`` over a source's batches (inference)."""
    acc = Accumulator(names, spec)
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

    def __init__(self, limit: int = CACHE_MEMORY_BYTES):
        self.limit, self.bytes = limit, 0
        self.items: list = []
        self.folder: Path | None = None

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    @property
    def steps(self) -> int:
        return len(self.items)

    def add(self, batch: Batch) -> None:
        self.bytes += batch.x.nbytes
        if self.bytes > self.limit:
            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix="tlcore-features-"))
            path = self.folder / f"{len(self.items)}.npy"
            np.save(path, batch.x)
            self.items.append(Batch(path, batch.y, batch.w))
        else:
            self.items.append(batch)

    def batches(self, rng: np.random.Generator) -> Iterator[Batch]:
        for item in self.items:
            yield item if not isinstance(item.x, Path) else item._replace(x=np.load(item.x, mmap_mode="r"))

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def cache_features(features, source: Source, rng: np.random.Generator, check, batch_size: int) -> Source:
    """The frozen features of ``source`` as a source for the head: arrays (shuffled as the original
    would be) for arrays, a :class:`FeatureCache` replaying a deterministic stream's order."""
    if type(source) is Arrays:
        n = source.n
        feats = np.concatenate([np.asarray(features(data.take(source.x, slice(i, i + batch_size))))
                                for i in range(0, n, batch_size)])
        return Arrays(feats, source.y, source.w, source.batch_size, source.shuffle)
    cache = FeatureCache()
    for batch in checked_batches(source, rng, check):
        cache.add(Batch(np.asarray(features(batch.x)), batch.y, batch.w))
    return cache


def elapsed(t0: float) -> float:
    return time.perf_counter() - t0
