"""Data parallel on JAX (``fit(..., strategy=tl.distribute.DataParallel())``): one jitted step over a
1-D device mesh (axis ``"data"``), the global batch sharded over it, parameters, optimizer state and
the rest of the step's state replicated (``NamedSharding``). XLA partitions the step (GSPMD): each
device runs the forward and backward pass of its shard, and the collectives it inserts make every
reduction over the batch global, so the gradients are those of the global batch's loss (as on one
device, up to the order of the sums), a trainable BatchNorm normalises with the statistics of the
global batch (and its moving statistics follow them), and the replicated results are the same on
every device. Frozen tensors only ever enter the step as constants: nothing is computed, reduced or
written for them (a frozen BatchNorm runs on its moving statistics).

The devices: all of ``jax.devices()`` by default (every process's after ``jax.distributed.initialize()``),
or the first ``DataParallel(devices=k)`` local devices (of every process). On CPU, XLA can be asked
for several host devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set before JAX
starts.

The step is compiled once per (structure, configuration, mesh) and shared by every model of that
structure, as the single-device step is (``train.compiled_step``). With one device the core does not
pass the strategy, so the single-device path runs unchanged.

Example:
    >>> plan = plan_for(DataParallel(devices=1))
    >>> plan.count, plan.mesh.axis_names
    (1, ('data',))
    >>> shard_batch(np.zeros((4, 3), np.float32), plan).sharding.spec
    P('data',)
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tlcore.data import Inputs, num_samples
from tlcore.distribute import DataParallel, DistributedError, Replicas
from tlcore.optim import TrainSpec

from .freeze import Partition
from .inputs import check_call, to_device
from .train import JaxTrainer, _infer_leaves

if TYPE_CHECKING:
    from .model import JaxModel

#: the name of the mesh's one axis, over which the batch is split
AXIS = "data"
#: the XLA flag that gives JAX several CPU devices (to name in errors)
HOST_DEVICES_FLAG = "XLA_FLAGS=--xla_force_host_platform_device_count"


@dataclass(frozen=True)
class ShardingPlan:
    """A 1-D mesh over the replicas' devices and the shardings of a data-parallel step: the batch
    split over the mesh (``batch``), everything else on every device (``replicated``). Hashable: part
    of a compiled step's key.

    Example:
        >>> plan = plan_for(DataParallel(devices=1))
        >>> plan.replicated.spec, plan.batch.spec
        (P(), P('data',))
    """

    mesh: Mesh

    @functools.cached_property
    def count(self) -> int:
        """How many replicas (devices of the mesh)."""
        return int(self.mesh.devices.size)

    @functools.cached_property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @functools.cached_property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(AXIS))

    @functools.cached_property
    def multiprocess(self) -> bool:
        """The mesh spans devices of other processes (after ``jax.distributed.initialize()``)."""
        return any(d.process_index != jax.process_index() for d in self.mesh.devices.flat)

    @functools.cached_property
    def outputs(self) -> NamedSharding:
        """The sharding of a step's outputs (the logits of the global batch): split over the mesh in
        one process (``np.asarray`` gathers them); replicated across processes, so that every process
        holds the whole global batch's outputs (as the core needs) without a blocking gather."""
        return self.replicated if self.multiprocess else self.batch

    def jit_step(self, fn: Callable) -> Callable:
        """``jax.jit`` of a training step ``fn(trainable, mutable, const, opt_state, scale, flag, x, y,
        w, lr)`` (see ``train._train_step``) with ``x``, ``y``, ``w`` sharded and the rest replicated;
        it returns ``(trainable, mutable, opt_state, scale, flag, outputs)``, replicated but the
        outputs (:attr:`outputs`)."""
        rep, batch = self.replicated, self.batch
        return jax.jit(fn, in_shardings=(rep,) * 6 + (batch, batch, batch, rep),
                       out_shardings=(rep,) * 5 + (self.outputs,))

    def jit_init(self, fn: Callable) -> Callable:
        """``jax.jit`` of an optimizer state initialisation, its state replicated."""
        return jax.jit(fn, out_shardings=self.replicated)


def strategy_devices(strategy: DataParallel) -> list[jax.Device]:
    """The devices ``strategy`` runs on, in mesh order: every device JAX sees (every process's after
    ``jax.distributed.initialize()``), or the first ``strategy.devices`` local devices of every process.

    Raises:
        DistributedError: a strategy this backend cannot run, or more devices asked for than there are.

    Example:
        >>> [d.id for d in strategy_devices(DataParallel(devices=1))]
        [0]
    """
    if not isinstance(strategy, DataParallel):
        raise DistributedError(f"the jax backend cannot run {strategy!r}; use tl.distribute.DataParallel()")
    strategy.refuse_engine("jax", "jax.devices() (every process's after jax.distributed.initialize())")
    if strategy.devices is None:
        return list(jax.devices())
    k = strategy.devices
    local = jax.local_devices()
    if k > len(local):
        kind = local[0].platform
        hint = (f"; on CPU, {HOST_DEVICES_FLAG}={k} (set before JAX starts) gives JAX {k} host devices"
                if kind == "cpu" else "")
        raise DistributedError(f"DataParallel(devices={k}) asks for {k} devices, but JAX sees {len(local)} "
                               f"{kind} device(s) in this process{hint}")
    by_process: dict[int, list[jax.Device]] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    short = {p: len(ds) for p, ds in by_process.items() if len(ds) < k}
    if short:
        raise DistributedError(f"DataParallel(devices={k}) asks for {k} devices in every process, but processes "
                               f"{sorted(short)} have {sorted(set(short.values()))}")
    return [d for p in sorted(by_process) for d in by_process[p][:k]]


@functools.lru_cache(maxsize=16)
def _plan_of(devices: tuple[jax.Device, ...]) -> ShardingPlan:
    return ShardingPlan(Mesh(np.array(devices, dtype=object), (AXIS,)))


def plan_for(strategy: DataParallel) -> ShardingPlan:
    """The :class:`ShardingPlan` of ``strategy`` (the same object for the same devices)."""
    return _plan_of(tuple(strategy_devices(strategy)))


def replicas_of(strategy: DataParallel) -> Replicas:
    """``Replicas(devices used, this process's index)``, checked before training (see
    :func:`strategy_devices`).

    Example:
        >>> replicas_of(DataParallel(devices=1))
        Replicas(count=1, rank=0)
    """
    return Replicas(len(strategy_devices(strategy)), jax.process_index())


def _global_array(value: Any, sharding: NamedSharding) -> jax.Array:
    """``value`` (the same on every process) as a global array of ``sharding``, each process
    supplying its own devices' shards; RNG keys through their key data."""
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(value)
        return jax.random.wrap_key_data(_global_array(jax.random.key_data(value), sharding), impl=impl)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _place(tree: Any, sharding: NamedSharding, plan: ShardingPlan) -> Any:
    """Every array of ``tree`` (numpy or JAX, the same on every process) with ``sharding``; one
    transfer per array, none for one already placed so."""
    if not plan.multiprocess:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda v: v if getattr(v, "sharding", None) == sharding else _global_array(v, sharding), tree)


def replicate(tree: Any, plan: ShardingPlan) -> Any:
    """``tree``'s arrays on every device of ``plan``'s mesh.

    Example:
        >>> replicate([np.ones(3, np.float32)], plan_for(DataParallel(devices=1)))[0].sharding.spec
        P()
    """
    return _place(tree, plan.replicated, plan)


def shard_batch(tree: Any, plan: ShardingPlan) -> Any:
    """``tree``'s arrays (a batch: numpy, first axis the samples, divisible by ``plan.count``; None
    stays None) split over ``plan``'s mesh along their first axis."""
    return None if tree is None else _place(tree, plan.batch, plan)


def to_host(value: jax.Array) -> np.ndarray:
    """The whole of a sharded or replicated array in numpy, on every process."""
    if value.is_fully_addressable or value.is_fully_replicated:
        return np.asarray(value)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def local_copy(value: jax.Array) -> jax.Array:
    """A replicated array's copy on this process's first device of its mesh (no copy made: the
    shard itself); any other array as it is.

    Example:
        >>> a = replicate(np.arange(3.0), plan_for(DataParallel(devices=1)))
        >>> local_copy(a).devices() == {jax.local_devices()[0]}
        True
    """
    if isinstance(value, jax.Array) and len(value.sharding.device_set) > 1 and value.is_fully_replicated:
        return value.addressable_shards[0].data
    return value


def replica_hashes(value: jax.Array) -> list[bytes]:
    """The bytes of each addressable device's copy of ``value`` (all equal for a replicated array whose
    replicas agree): to check that no replica drifted."""
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
    return [np.asarray(s.data).tobytes() for s in value.addressable_shards]


def _pad_rows(x: Inputs, pad: int) -> Inputs:
    """``x`` with its last sample repeated ``pad`` more times (an inference batch made divisible)."""
    return jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]), x)


class ReplicatedLeaves:
    """The leaves of a module replicated over a plan's mesh, copied once for as long as the module's
    leaves are the same arrays (feature caching replicates the frozen part once per fit, not per chunk)."""

    def __init__(self, plan: ShardingPlan):
        self.plan = plan
        self._source: list | None = None
        self._copies: list | None = None

    def of(self, leaves: list) -> list:
        if self._source is None or len(leaves) != len(self._source) or any(
                a is not b for a, b in zip(leaves, self._source)):
            self._source, self._copies = list(leaves), replicate(list(leaves), self.plan)
        return self._copies


def sharded_features(module: nnx.Module, x: Inputs, stop: str | None, replicated: ReplicatedLeaves) -> np.ndarray:
    """The inference-mode forward pass of ``module`` up to the top-level layer ``stop`` (see
    ``train._infer``) on ``x``, split over ``replicated.plan``'s mesh (each device computes its shard;
    a batch that does not split evenly is padded with its last sample, and the padding dropped).
    The whole output, in numpy, on every process."""
    check_call(module, x)
    plan = replicated.plan
    x = to_device(x)
    n = num_samples(x)
    pad = -n % plan.count
    if pad:
        x = _pad_rows(x, pad)
    leaves, treedef = jax.tree.flatten(module)
    out = _infer_leaves(replicated.of(leaves), shard_batch(x, plan), treedef=treedef, stop=stop)
    return to_host(out)[:n]


class DataParallelTrainer(JaxTrainer):
    """:class:`train.JaxTrainer` on a data-parallel step (:attr:`plan`): the module's values and the
    optimizer state replicated once per run, each batch split over the mesh, the outputs of the global
    batch returned. :meth:`finish` writes each replicated value's local copy back to the module (the
    model lives on one device between fits, as after a single-device fit); the trainer keeps the
    replicated arrays (``trainable``, ``mutable``, ``opt_state``) for the next steps.

    Example:
        >>> spec = TrainSpec(tl.optim.SGD(lr=0.1), strategy=tl.distribute.DataParallel())   # doctest: +SKIP
        >>> trainer = DataParallelTrainer(model, spec, model._partition, model._prepared)    # doctest: +SKIP
    """

    def __init__(self, model: JaxModel, spec: TrainSpec, part: Partition, cache: dict):
        plan = plan_for(spec.strategy)
        super().__init__(model, spec, part, cache, plan=plan)
        self.plan: ShardingPlan = plan
        self._placed = False

    def _read_module(self) -> None:
        super()._read_module()
        self.trainable, self.mutable, self.const = replicate((self.trainable, self.mutable, self.const), self.plan)

    def _clear_flag(self) -> None:
        super()._clear_flag()
        self._placed = False  # a new flag (and, after reset/resume, optimizer state) to replicate

    def import_state(self, state: dict) -> None:
        super().import_state(state)
        self._placed = False

    def _place_state(self) -> None:
        """Replicate the optimizer state, loss scale and guard flag made since the last step (zero
        state, imported state, a new flag); the step's own outputs are replicated already."""
        if not self._placed:
            self.opt_state, self.loss_scale, self.flag = replicate((self.opt_state, self.loss_scale, self.flag),
                                                                   self.plan)
            self._placed = True

    def _dispatch(self, x: Inputs, y: np.ndarray, w: np.ndarray | None, lr: np.float32) -> jax.Array:
        self._place_state()
        lr = replicate(np.float32(lr), self.plan) if self.plan.multiprocess else lr
        return super()._dispatch(shard_batch(x, self.plan), shard_batch(y, self.plan), shard_batch(w, self.plan), lr)

    def collect(self, handle: jax.Array) -> np.ndarray:
        out = to_host(handle)
        self._check_flags(self._unread[:1])
        return out

    def step(self, x: Inputs, y: np.ndarray, w: np.ndarray | None = None, lr: float | None = None) -> np.ndarray:
        out = to_host(self.dispatch(x, y, w, lr))
        self._check_flags(self._unread)
        return out

    def _module_value(self, value: jax.Array) -> jax.Array:
        return local_copy(value)


def all_replicas_equal(arrays: Sequence[jax.Array]) -> bool:
    """Every addressable copy of every one of ``arrays`` holds the same bytes (see :func:`replica_hashes`)."""
    return all(len(set(replica_hashes(a))) == 1 for a in arrays)
