"""Data-parallel fine-tuning on each framework's own engine: ``fit(..., strategy=tl.distribute.DataParallel())``.

Each backend runs its framework's data parallelism: PyTorch's ``DistributedDataParallel`` in the
processes ``torchrun`` starts (each process reads its shard of every global batch), a sharded ``jit``
over JAX's devices (a 1-D mesh, the batch split, parameters and optimizer state replicated), and
TensorFlow's ``MirroredStrategy`` over the visible devices on Keras (or the strategy passed as
``engine``: a ``MultiWorkerMirroredStrategy`` for several hosts). ``batch_size`` is the global
batch; the loss is the global batch's (weighted) mean, so training equals the single-device run up to
the order of floating-point sums. Frozen tensors are never synchronised nor updated. With one device
(or one process) the fit is exactly the single-device one.

Example:
    >>> import tlcore as tl
    >>> tl.distribute.DataParallel()
    DataParallel(devices=None, engine=None)
    >>> tl.distribute.check_batches(64, 2, rows=1000)
    >>> tl.distribute.check_batches(63, 2)
    Traceback (most recent call last):
    ...
    tlcore.errors.DataError: batch_size 63 does not split over 2 replicas; use a multiple of 2 (e.g. 64)
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .errors import DataError, DistributedError, short_repr

__all__ = ["DataParallel", "DistributedError", "Replicas", "check_batches", "check_same_frozen", "check_split"]


@dataclass(frozen=True)
class DataParallel:
    """Replicate the model, split every global batch over the replicas, average the gradients.

    ``devices``: how many local devices to use (JAX and TensorFlow; default all visible ones). Under
    ``torchrun`` the replicas are its processes and ``devices`` must be None.

    ``engine``: the framework's own strategy object to run on instead of the default one; on Keras a
    ``tf.distribute.MultiWorkerMirroredStrategy`` (several hosts: made at the start of every
    process, with ``TF_CONFIG`` set, before TensorFlow runs anything) or a ``MirroredStrategy`` over
    devices of your choice. PyTorch (torchrun's process group) and JAX (``jax.devices()``) take none.
    """

    devices: int | None = None
    engine: Any = None

    def __post_init__(self) -> None:
        if self.devices is not None and (isinstance(self.devices, bool) or not isinstance(self.devices, numbers.Integral)
                                         or not 1 <= self.devices <= 4096):
            raise DistributedError(f"DataParallel(devices=...) takes None or a device count from 1 to 4096, got "
                                   f"{short_repr(self.devices)}")
        if self.devices is not None and self.engine is not None:
            raise DistributedError("DataParallel takes devices=... or engine=..., not both: an engine brings its own "
                                   "devices")

    def refuse_engine(self, backend: str, replicas: str) -> None:
        """Raise unless ``engine`` is None, for a ``backend`` whose replicas are always ``replicas``.

        Example:
            >>> DataParallel(engine=object()).refuse_engine("torch", "torchrun's processes")
            Traceback (most recent call last):
            ...
            tlcore.errors.DistributedError: DataParallel(engine=object) is for the keras backend ...
        """
        if self.engine is not None:
            raise DistributedError(f"DataParallel(engine={type(self.engine).__name__}) is for the keras backend (a "
                                   f"tf.distribute strategy); on {backend} the replicas are {replicas}: leave "
                                   "engine=None")


class Replicas(NamedTuple):
    """How many replicas a strategy runs on (``count``) and which one this process is (``rank``: the
    process's rank under torchrun; 0 where one process drives every device)."""

    count: int
    rank: int = 0


def check_batches(batch_size: int, count: int, rows: int | None = None) -> None:
    """Refuse a global batch (or the last, shorter batch of ``rows`` samples) that ``count`` replicas
    cannot split evenly.

    Raises:
        DataError: naming the batch and sizes that would split.
    """
    if batch_size % count:
        good = -(-batch_size // count) * count
        raise DataError(f"batch_size {batch_size} does not split over {count} replicas; use a multiple of {count} "
                        f"(e.g. {good})")
    last = rows % batch_size if rows else 0
    if last % count:
        raise DataError(f"the last batch of an epoch has {last} of the {rows} samples, which does not split over "
                        f"{count} replicas; use {rows - last} samples, or a batch_size that divides {rows} into "
                        f"batches of multiples of {count}")


def check_split(n: int, count: int, what: str = "a batch") -> None:
    """Refuse a batch of ``n`` samples (``what``: a stream's batch, whose size is known only once read)
    that ``count`` replicas cannot split evenly.

    Raises:
        DataError: naming the batch and the replica count.

    Example:
        >>> check_split(6, 3)
        >>> check_split(7, 2, "batch 3 of loader")
        Traceback (most recent call last):
        ...
        tlcore.errors.DataError: batch 3 of loader: a batch of 7 samples does not split over 2 replicas; give ...
    """
    if n % count:
        raise DataError(f"{what}: a batch of {n} samples does not split over {count} replicas; give batches of a "
                        f"multiple of {count} samples")


def check_same_frozen(fingerprints: np.ndarray, names: list[str], between: str, hint: str = "") -> None:
    """Refuse frozen tensors that differ between the processes of a data-parallel fit: only what
    trains is broadcast from the first replica. ``fingerprints``: one row per process (every process
    holds them all, so each raises alike), one integer checksum of each tensor of ``names`` per column.

    Raises:
        DistributedError: naming how many differ and the first.

    Example:
        >>> check_same_frozen(np.array([[1, 2], [1, 2]]), ["a", "b"], "ranks")
        >>> check_same_frozen(np.array([[1, 2], [1, 3]]), ["a", "b"], "ranks")
        Traceback (most recent call last):
        ...
        tlcore.errors.DistributedError: 1 tensor(s) that do not train differ between the ranks (first: 'b'); ...
    """
    differ = np.flatnonzero((fingerprints != fingerprints[:1]).any(axis=0))
    if len(differ):
        raise DistributedError(f"{len(differ)} tensor(s) that do not train differ between the {between} (first: "
                               f"{names[differ[0]]!r}); only what trains is broadcast from the first replica, so every "
                               f"process must build the same model: load the same weights, or seed the "
                               f"initialisation alike{hint}")
