"""Data parallel on PyTorch (``fit(..., strategy=tl.distribute.DataParallel())``): PyTorch's own
``DistributedDataParallel`` over the processes ``torchrun`` starts.

How it runs:

* **Replicas.** The replicas are the processes of the default process group. When none is
  initialised but ``torchrun``'s variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)
  are set, tlcore initialises it (``nccl`` for a model on a GPU, ``gloo`` on the CPU); with neither,
  ``DataParallel()`` raises :class:`tlcore.DistributedError`. ``DataParallel(devices=k)`` must name the
  group's size; ``devices=1`` outside ``torchrun`` and a 1-process group are the single-device fit
  itself (bit-identical).
* **Step.** Every process gets the whole global batch from the core (same shuffling everywhere) and
  trains on its rows ``[rank * B / W, (rank + 1) * B / W)``. The module is wrapped in
  ``DistributedDataParallel``; frozen parameters (``requires_grad=False``) are not in its buckets, so no
  ``find_unused_parameters``. Each rank's loss is its shard's ``sum(w * l)`` over the *global*
  ``sum(w * d)``, times ``W``: DDP's gradient average is then exactly the global batch's gradient.
  Clipping sees the averaged gradient (DDP reduces inside ``backward``). The outputs of the whole
  global batch are gathered in rank order, so the core's loss, metrics and ``History`` are the same on
  every rank; each rank's "my loss is not finite" flag rides along, so the non-finite guard makes the
  same decision everywhere (the gradients and their norm are the averaged ones, the same everywhere).
  The gathering costs no collective of its own: a DDP communication hook (:meth:`DataParallelTrainer.
  _reduce_hook`) appends every rank's outputs, each in its own zeroed slot, to the last gradient
  bucket's all-reduce (a sum: the slots arrive as a gather). A separate ``all_gather`` serves where no
  bucket can carry them (nothing trainable, or gradients of another dtype).
* **Frozen tensors never sync.** DDP is built with ``init_sync=False`` and ``forward_sync_buffers=False``;
  tlcore broadcasts only the trainable parameters (and trainable BatchNorm statistics) from rank 0 when
  a run starts or continues. A frozen BatchNorm runs in inference mode: never synced nor updated.
* **Trainable BatchNorm** normalises with each replica's shard statistics (DDP's default; no
  ``SyncBatchNorm`` conversion, which would replace the user's modules). Its running statistics are
  averaged over the replicas at the end of every epoch, so every rank holds the same state; the
  running mean is then the single-device one (the update is linear), the running variance the mean of
  the replicas' (the spread between shards left out).
* **Dropout** draws from a generator seeded per replica (rank 0 keeps ``seed``), so the shards get
  independent masks.
* **Re-wrapping.** A new freeze policy (between fits or stages) makes a new trainer, hence a new
  ``DistributedDataParallel`` over the new trainable set.

Example (a script run with ``torchrun --nproc-per-node 2 train.py``):
    >>> hist = ft.fit(x, y, epochs=3, batch_size=64, strategy=tl.distribute.DataParallel())  # doctest: +SKIP
    >>> shard_rows(64, world=2, rank=1)
    slice(32, 64, None)
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tlcore import data, distribute
from tlcore.distribute import DataParallel, Replicas
from tlcore.errors import DistributedError
from tlcore.optim import TrainSpec

from ._torch import nn, torch
from .cut import primary_output
from .train import TorchTrainer, denominators, loss_terms, weighted_loss

dist = torch.distributed

#: what ``torchrun`` sets in every process it starts, and ``init_process_group("env://")`` reads
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

LAUNCH_HINT = ("launch the script with `torchrun --nproc-per-node N script.py` (tlcore then initialises the "
               "process group from RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), or call "
               "torch.distributed.init_process_group(...) before fit")


def launched_by_torchrun(env: Mapping[str, str] = os.environ) -> bool:
    """True when ``env`` holds the variables ``torchrun`` sets for its processes.

    Example:
        >>> launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
        True
        >>> launched_by_torchrun({})
        False
    """
    return all(env.get(k) for k in TORCHRUN_ENV)


def group_backend(device: torch.device) -> str:
    """The collective backend for a model on ``device``: NCCL on a GPU, gloo on the CPU.

    Example:
        >>> group_backend(torch.device("cpu"))
        'gloo'
    """
    return "nccl" if device.type == "cuda" else "gloo"


def ensure_process_group(device: torch.device) -> bool:
    """True when the default process group is (now) initialised: tlcore initialises it from
    ``torchrun``'s variables when the script did not; False outside ``torchrun`` without a group."""
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed, which DataParallel needs")
    if dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=group_backend(device))
    return True


def replicas(strategy: DataParallel, device: torch.device) -> Replicas:
    """The replicas of ``strategy`` for a model on ``device``: the default process group's size and
    this process's rank, checked before anything trains.

    Raises:
        DistributedError: no process group and not under ``torchrun``; ``devices`` other than the
            group's size; a CPU model under an NCCL group.
    """
    strategy.refuse_engine("torch", "the processes torchrun starts")
    if not ensure_process_group(device):
        if strategy.devices == 1:
            return Replicas(1, 0)  # one device asked for, outside torchrun: the single-device fit
        raise DistributedError(f"{strategy!r} on PyTorch trains in the processes torchrun starts, but this "
                               f"process has no torch.distributed process group: {LAUNCH_HINT}")
    world, rank = dist.get_world_size(), dist.get_rank()
    if strategy.devices is not None and strategy.devices != world:
        raise DistributedError(f"{strategy!r} asks for {strategy.devices} replicas, but the process group has "
                               f"{world} process(es); under torchrun the replicas are its processes: "
                               "leave devices=None (or set --nproc-per-node)")
    backend = str(dist.get_backend()).lower()
    if device.type == "cpu" and "nccl" in backend and "gloo" not in backend:
        raise DistributedError(f"the model is on the CPU but the process group runs {backend!r}, which only "
                               "reduces GPU tensors: init_process_group('gloo'), or move the model to its GPU")
    return Replicas(world, rank)


def shard_rows(batch: int, world: int, rank: int) -> slice:
    """Rank ``rank``'s rows of a global batch of ``batch`` rows split evenly over ``world`` replicas
    (the core has checked that it splits).

    Example:
        >>> shard_rows(16, world=2, rank=0)
        slice(0, 8, None)
    """
    size = batch // world
    return slice(rank * size, (rank + 1) * size)


def replica_seed(seed: int, rank: int) -> int:
    """The dropout seed of replica ``rank``: ``seed`` itself on rank 0, an independent stream elsewhere.

    Example:
        >>> replica_seed(7, 0)
        7
        >>> replica_seed(7, 1) != replica_seed(7, 0)
        True
    """
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, np.uint64)[0] >> 1)


def gather_rows(t: torch.Tensor, world: int) -> torch.Tensor:
    """Every replica's ``t`` (the same shape on each) concatenated along the first axis in rank order,
    on every replica."""
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def shard_loss(out: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, rows: slice, world: int,
               spec: Any) -> torch.Tensor:
    """This replica's loss for its outputs ``out`` (rows ``rows`` of the global batch whose targets
    and weights are ``y`` and ``w``), such that the average of the replicas' gradients (DDP's) is the
    gradient of the global batch's weighted mean ``sum(w * l) / sum(w * d)``: its rows' ``sum(w * l)``
    over the global ``sum(w * d)``, times ``world``. Unweighted, that is the mean over its rows."""
    ys, ws = y[rows], None if w is None else w[rows]
    classes = out.reshape(len(out), -1).shape[1]
    d_all = denominators(y, spec, classes, out.dtype)
    if d_all is None and w is None:  # every weight 1: the shard's mean is sum(l) / B * world
        return weighted_loss(out, ys, None, spec)
    per, _ = loss_terms(out, ys, spec)
    s = torch.ones_like(per) if ws is None else ws.to(per.dtype)
    s_all = torch.ones(len(y), dtype=per.dtype, device=per.device) if w is None else w.to(per.dtype)
    total = (s_all * (1 if d_all is None else d_all)).sum()
    return (s * per).sum() / total * world


def sharded_features(compute: Callable[[Any], np.ndarray], x: Any, world: int, rank: int,
                     device: torch.device) -> np.ndarray:
    """``compute(x)`` with each replica computing ``ceil(n / world)`` of the rows of ``x`` (the same
    ``x`` on every replica) and the parts gathered in order: the whole result on every replica."""
    n = data.num_samples(x)
    size = -(-n // world)
    lo, hi = min(rank * size, n), min((rank + 1) * size, n)
    part = np.asarray(compute(data.take(x, slice(lo, hi) if hi > lo else slice(0, 1))))
    part = part[: hi - lo]
    padded = np.zeros((size, *part.shape[1:]), part.dtype)
    padded[: len(part)] = part
    whole = gather_rows(torch.from_numpy(padded).to(device), world)
    return whole[:n].cpu().numpy()


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values, in one broadcast per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            offset = 0
            for t in group:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()


def average_over_ranks(tensors: list[torch.Tensor], world: int) -> None:
    """Floating-point ``tensors`` become their mean over the ranks; integer ones (BatchNorm's
    ``num_batches_tracked``) rank 0's value."""
    floats = [t for t in tensors if t.is_floating_point()]
    with torch.no_grad():
        if floats:
            flat = torch.cat([t.reshape(-1) for t in floats])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for t in floats:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()
    broadcast_from_rank0([t for t in tensors if not t.is_floating_point()])


def check_same_trainables(named: dict[str, nn.Parameter], world: int) -> None:
    """Raise :class:`DistributedError` unless every rank trains the same number of tensors and
    elements (the same model and freeze policy), before anything is reduced."""
    mine = torch.tensor([len(named), sum(p.numel() for p in named.values())], dtype=torch.int64)
    device = next(iter(named.values())).device if named else torch.device("cpu")
    theirs = gather_rows(mine.to(device).reshape(1, 2), world).cpu()
    if not bool((theirs == mine).all()):
        raise DistributedError(f"the replicas train different tensors (count, elements per rank: "
                               f"{theirs.tolist()}); every process must build the same model and freeze policy")


#: the integer type of each float width, whose bits :func:`check_same_frozen` sums
_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def check_same_frozen(module: nn.Module, trained: list[torch.Tensor], world: int) -> None:
    """Raise :class:`DistributedError`, on every rank alike, when a floating-point tensor that does not
    train (a frozen weight, a frozen BatchNorm's statistics) differs between the ranks: only what
    trains is broadcast from rank 0, so every process must build the same model. Each tensor's bit
    patterns are summed as integers (exact in any order, on any hardware; no copy of the tensor), and
    the sums gathered in one collective."""
    skip = {id(t) for t in trained}
    named = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers())
             if id(t) not in skip and t.is_floating_point() and t.element_size() in _BITS]
    if not named:
        return
    with torch.no_grad():
        mine = torch.stack([t.detach().contiguous().view(_BITS[t.element_size()]).sum(dtype=torch.int64)
                            for _, t in named])
    every = gather_rows(mine.reshape(1, -1), world).cpu().numpy()
    distribute.check_same_frozen(every, [n for n, _ in named], "ranks")


class DataParallelTrainer(TorchTrainer):
    """:class:`TorchTrainer` on this process's shard of every global batch, its module wrapped in
    ``DistributedDataParallel`` over the default process group (see the module docstring).

    Args: as :class:`TorchTrainer`.
    """

    def __init__(self, module: nn.Module, frozen_bn: list[nn.Module], spec: TrainSpec,
                 to_module: Callable[[Any], tuple[tuple, dict]], device: torch.device,
                 params: dict[str, nn.Parameter], rng: dict):
        super().__init__(module, frozen_bn, spec, to_module, device, params, rng)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.ddp: nn.Module | None = None
        self._group: Any = None
        self._stepped = False  # a step since the last finish (trainable BatchNorm statistics to average)
        #: this step's outputs and loss flag, until a gradient bucket's all-reduce takes them along
        self._payload: torch.Tensor | None = None
        self._slots: torch.Tensor | None = None  # every rank's payload, once that all-reduce finished
        self._pending: tuple | None = None  # a separate gathering of the payload (see _gather_start)
        self._result: tuple[torch.Tensor, bool] | None = None  # the gathered outputs and flag

    def _wrap(self) -> None:
        """Wrap the module (once per process group) and start every rank from rank 0's trainable
        tensors. A collective: every rank reaches it together (reset/resume)."""
        group = dist.group.WORLD
        if self._group is not group:
            check_same_trainables(self.named, self.world)
            self.ddp = None
            if self.params:
                self.ddp = nn.parallel.DistributedDataParallel(
                    self.module, device_ids=[self.device] if self.device.type == "cuda" else None,
                    init_sync=False, forward_sync_buffers=False)
                # (unannotated: DDP checks a hook's annotations against its own classes, and this
                # module's are strings)
                self.ddp.register_comm_hook(None, lambda state, bucket: self._reduce_hook(bucket))
            self._group = group
        check_same_frozen(self.module, self.params + self.written, self.world)
        broadcast_from_rank0(self.params + self.written)

    def reset(self, seed: int) -> None:
        super().reset(replica_seed(seed, self.rank))
        self._wrap()

    def resume(self) -> None:
        super().resume()
        self._wrap()

    def finish(self) -> None:
        super().finish()
        if self._stepped and self.written:
            average_over_ranks(self.written, self.world)
        self._stepped = False

    def _forward_loss(self, x: Any, y: np.ndarray, w: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        self._stepped = True
        rows = shard_rows(len(y), self.world, self.rank)
        args, kwargs = self.to_module(data.take(x, rows))
        net = self.ddp if self.ddp is not None else self.module
        with self.precision():
            out = primary_output(net(*args, **kwargs))
        yb = torch.from_numpy(y).to(self.device, non_blocking=True)
        wb = None if w is None else torch.from_numpy(w).to(self.device, non_blocking=True)
        out = out.float()
        loss = shard_loss(out, yb, wb, rows, self.world, self.spec.loss)
        self._payload = torch.cat([out.detach().reshape(-1),
                                   (~torch.isfinite(loss.detach())).to(out.dtype).reshape(1)])
        self._shape, self._slots, self._pending, self._result = out.shape, None, None, None
        if self.ddp is None:  # no gradient to reduce: the outputs travel on their own
            self._gather_start()
        return out, loss

    def _reduce_hook(self, bucket: dist.GradBucket) -> torch.futures.Future:
        """DDP's gradient reduction (its default hook's: divide by the world size, all-reduce the sum);
        the last bucket of a step also carries this step's payload (outputs and loss flag) in this
        rank's slot of ``world`` zeroed slots, so the sum is every rank's payload in rank order."""
        grads = bucket.buffer()
        grads.div_(self.world)
        payload = self._payload
        if not bucket.is_last() or payload is None or payload.dtype != grads.dtype:
            return dist.all_reduce(grads, async_op=True).get_future().then(lambda fut: fut.value()[0])
        self._payload = None
        n, m = payload.numel(), grads.numel()
        flat = torch.zeros(m + self.world * n, dtype=grads.dtype, device=grads.device)
        flat[:m] = grads
        flat[m + self.rank * n: m + (self.rank + 1) * n] = payload

        def arrived(fut: torch.futures.Future) -> torch.Tensor:
            whole = fut.value()[0]
            self._slots = whole[m:]
            return grads.copy_(whole[:m])
        return dist.all_reduce(flat, async_op=True).get_future().then(arrived)

    def _gather_start(self) -> None:
        """Start gathering every rank's payload in a collective of its own; :meth:`_gathered` waits."""
        parts = [torch.empty_like(self._payload) for _ in range(self.world)]
        self._pending = (dist.all_gather(parts, self._payload, async_op=True), parts)
        self._payload = None

    def _gathered(self) -> tuple[torch.Tensor, bool]:
        """The whole global batch's outputs (rank order) and whether any rank's loss is not finite."""
        if self._result is None:
            if self._slots is None:
                if self._pending is None:  # no bucket carried the payload
                    self._gather_start()
                work, parts = self._pending
                work.wait()
                self._slots = torch.stack(parts)
            whole = self._slots.reshape(self.world, -1)
            self._result = whole[:, :-1].reshape(-1, *self._shape[1:]), bool(whole[:, -1].amax())
        return self._result

    def _nonfinite_now(self, loss: torch.Tensor, norm: torch.Tensor | None) -> str | None:
        """The same decision on every rank: the gradients (and their norm) are the averaged ones, the
        same everywhere; the losses are each rank's, and whether any is not finite came with the
        outputs."""
        _, bad_loss = self._gathered()
        if bad_loss:
            return "loss"
        return None if norm is None or bool(torch.isfinite(norm)) else self._first_nonfinite_grad()

    def _outputs(self, out: torch.Tensor) -> np.ndarray:
        """The outputs of the whole global batch, the same on every rank."""
        return self._gathered()[0].cpu().numpy()
