"""Data parallel on Keras: ``fit(..., strategy=tl.distribute.DataParallel())`` runs the training step
under TensorFlow's ``tf.distribute.MirroredStrategy`` over the visible devices (the GPUs, else the
logical CPU devices), or under the strategy given as ``DataParallel(engine=...)``: a
``MultiWorkerMirroredStrategy`` for several hosts (made by the script at its start, from
``TF_CONFIG``, as TensorFlow requires), or a ``MirroredStrategy`` of one's own.

How. ``MirroredStrategy`` mirrors the variables created under its ``scope()``, but tlcore wraps models
the user already built. So the step is pure, as :class:`~tlcore_keras.train.SharedStepTrainer`'s:
:class:`MirroredTrainer` keeps on every replica's device its own copy of the trainable weights, the
other variables (BatchNorm statistics, frozen weights, seed states) and the optimizer slots, as plain
lists of tensors, one per replica; one traced step, called with its inputs flat (no per-step
matching of its many arguments), makes them per-replica values and runs ``strategy.run`` of a replica
step that calls the model with Keras' ``stateless_call`` on the replica's copies and its shard of the
global batch (replica ``i`` takes rows ``[i * n / k, (i + 1) * n / k)``), and returns the new copies.
The model's variables are read when a run starts or resumes and written back (from replica 0) by
:meth:`finish`.

Loss and gradients. Each replica differentiates ``sum_shard w * l / D`` with ``D = sum_global w * d``
(all-reduced, see ``tlcore.backend.Trainer.step``; the global batch size without weights), so the
all-reduced sum of the replicas' gradients is the gradient of the global batch's weighted mean, the
single-device step's up to the order of the sums. Regularisation losses of the layers count once
(each replica adds ``1 / k`` of them). Clipping, the non-finite guard (on the global loss and the
all-reduced gradients) and the update (the optimizer's :meth:`~tlcore_keras.train.TorchRuleOptimizer.rule`,
PyTorch's, the single-device trainers') then run on every replica on identical values, so the
replicas' copies stay identical (checked by the tests, per replica) without a broadcast.

State the forward pass writes. A frozen layer (BatchNorm in inference mode, frozen weights) writes
nothing: its tensors are never synchronised nor updated, and the step passes its input copies through
unchanged. A BatchNorm that trains normalises by its replica's shard (as ``MirroredStrategy`` does with
Keras' ``BatchNormalization``; ``BatchNormalization(synchronized=True)`` all-reduces the batch
statistics instead); each replica updates its moving statistics from its shard, and they are averaged
over the replicas when the trainer writes back (:meth:`MirroredTrainer.finish`, every epoch), as the
torch backend does: the averages are linear, so that is the mean per-step averaging (Keras'
``aggregation="mean"``) would give, with no collective per step. A random layer draws on replica
``i`` from its seed state with the seed XOR-ed with ``i * 0x9E3779B`` (replica 0 draws as one device
does), so shards get independent masks.

Several hosts. Each process holds its own replicas' copies; the trainable values start from replica
0's (an all-reduce in which the others add zeros, :func:`_from_first`), the outputs are all-gathered
so every process computes the same ``History``, the moving statistics are averaged by a collective,
and cached features are gathered from every host. Only the chief (``should_checkpoint``) is rank 0.

Precision: ``"float32"`` and ``"bfloat16"``; ``"float16"`` (Keras' dynamic loss scaling) raises
:class:`tlcore.DistributedError`.

Feature caching: :func:`features` computes every chunk's features with each replica on its shard.

Example:
    >>> hist = ft.fit(x, y, batch_size=64, strategy=tl.distribute.DataParallel())   # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from tlcore.backend import Trainer
from tlcore.distribute import DataParallel, Replicas, check_same_frozen
from tlcore.errors import DistributedError
from tlcore.optim import TrainSpec

from ._keras import call_flat, keras, tf
from .inputs import structure_key
from .train import (FLAG_OK, build_optimizer, clip_by_global_norm, dense, flag_name, guard_flag,
                    mixed_precision, param_rates, per_sample_loss, precision_errors, seed_rngs,
                    written_variables, _from_state, _to_state)

__all__ = ["visible_devices", "replicas", "strategy_for", "MirroredTrainer", "features"]

#: XOR-ed into a seed state's seed on replica ``i`` (times ``i``): independent masks per shard
RNG_SALT = 0x9E3779B


def visible_devices() -> list[str]:
    """The logical devices TensorFlow runs a ``MirroredStrategy`` on: the GPUs, else the CPUs."""
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def replicas(strategy: DataParallel) -> Replicas:
    """The replicas ``strategy`` runs on: ``devices`` of this host's (default: every visible device),
    or every replica of its ``engine``; ``rank`` 0 on the process that checkpoints (the chief).

    Raises:
        DistributedError: more devices asked for than TensorFlow sees; an engine that is not a
            mirrored strategy; a ``TF_CONFIG`` cluster of several tasks without an engine.
    """
    tasks = cluster_tasks()
    if strategy.engine is not None:
        engine = check_engine(strategy.engine)
        if tasks > 1 and not isinstance(engine, tf.distribute.MultiWorkerMirroredStrategy):
            raise DistributedError(
                f"TF_CONFIG names a cluster of {tasks} tasks, but DataParallel(engine={type(engine).__name__}) runs "
                "on this process's devices only (each process would train alone): pass a "
                "tf.distribute.MultiWorkerMirroredStrategy() made at the start of every process")
        ids = replica_ids(engine)
        return Replicas(engine.num_replicas_in_sync, 0 if engine.extended.should_checkpoint else max(ids[0], 1))
    if tasks > 1:
        raise DistributedError(
            f"TF_CONFIG names a cluster of {tasks} tasks, but DataParallel() runs on this process's devices only "
            "(each process would train alone): make tf.distribute.MultiWorkerMirroredStrategy() at the start of "
            "every process, before TensorFlow runs anything, and pass it: DataParallel(engine=strategy)")
    devices = visible_devices()
    count = len(devices) if strategy.devices is None else strategy.devices
    if count > len(devices):
        kind = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
        raise DistributedError(
            f"{strategy!r} asks for {count} devices, but TensorFlow sees {len(devices)} {kind} device(s) "
            f"({', '.join(devices)}); use DataParallel(devices={len(devices)}) or fewer, or make more visible: "
            "split a device into logical ones with tf.config.set_logical_device_configuration(...) before "
            "TensorFlow initialises (before anything runs on it), e.g. 2 logical CPU devices for a test")
    return Replicas(count, 0)


def check_engine(engine: Any) -> tf.distribute.Strategy:
    """``engine`` if tlcore can run on it (a ``MirroredStrategy`` or ``MultiWorkerMirroredStrategy``)."""
    if not isinstance(engine, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)):
        raise DistributedError(f"DataParallel(engine=...) on keras takes a tf.distribute.MirroredStrategy or "
                               f"MultiWorkerMirroredStrategy, got {type(engine).__name__}")
    return engine


def cluster_tasks() -> int:
    """How many chief and worker tasks ``TF_CONFIG`` names (0 without a readable one)."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster") or {}
        return sum(len(cluster.get(kind) or ()) for kind in ("chief", "worker"))
    except (ValueError, AttributeError, TypeError):
        return 0


_IDS: dict[int, tuple] = {}


def replica_ids(strategy: tf.distribute.Strategy) -> tuple[int, ...]:
    """The ids (``replica_id_in_sync_group``) of this process's replicas, in the order of
    ``strategy.extended.worker_devices``: ``0 .. k-1`` on one host; this worker's share of them under
    a ``MultiWorkerMirroredStrategy``."""
    if id(strategy) not in _IDS:
        ids = strategy.experimental_distribute_values_from_function(lambda ctx: ctx.replica_id_in_sync_group)
        _IDS[id(strategy)] = (strategy, tuple(int(i) for i in strategy.experimental_local_results(ids)))
    return _IDS[id(strategy)][1]


def spread(strategy: tf.distribute.Strategy) -> bool:
    """Whether some of ``strategy``'s replicas run in other processes (several hosts)."""
    return len(replica_ids(strategy)) < strategy.num_replicas_in_sync


_STRATEGIES: dict[tuple, Any] = {}

#: collective group keys of tlcore's strategies start here (and 1000 apart), see :func:`strategy_for`
KEY_BASE = 1 << 20


def strategy_for(strategy: DataParallel) -> tf.distribute.Strategy:
    """The ``engine`` of ``strategy``, else the ``MirroredStrategy`` over the first ``count`` visible
    devices (one per device set and process).

    Every ``MirroredStrategy`` numbers its collective operations (all-reduces) from the same keys, so
    two strategies on the same devices in one process, one of them the user's, would run collectives
    under the same keys and fail ("Shape mismatch in the collective instance"). tlcore's strategies
    take their keys from :data:`KEY_BASE` on instead (``_collective_key_base``, TensorFlow's own
    setting for that, read when the strategy is made)."""
    if strategy.engine is not None:
        return check_engine(strategy.engine)
    devices = tuple(visible_devices()[:replicas(strategy).count])
    if devices not in _STRATEGIES:
        keyed = type("TlcoreMirroredStrategy", (tf.distribute.MirroredStrategy,),
                     {"_collective_key_base": KEY_BASE + 1000 * len(_STRATEGIES)})
        _STRATEGIES[devices] = keyed(devices=list(devices))
    return _STRATEGIES[devices]


def broadcast(strategy: tf.distribute.Strategy, structure: Any) -> list:
    """``structure`` (tensors, nested) copied to every replica's device: one copy per replica, in
    replica order (see :func:`per_replica`)."""
    copies = []
    for device in strategy.extended.worker_devices:
        with tf.device(device):
            copies.append(tf.nest.map_structure(tf.identity, structure))
    return copies


def shard(strategy: tf.distribute.Strategy, structure: Any) -> list:
    """This process's replicas' rows of the numpy batch ``structure`` (nested arrays) as tensors on
    their devices, in replica order: replica ``i`` (of ``k``, every host's) takes rows
    ``[i * n / k, (i + 1) * n / k)`` (``n`` divisible by ``k``)."""
    devices, k = strategy.extended.worker_devices, strategy.num_replicas_in_sync
    rows = []
    for i, device in zip(replica_ids(strategy), devices):
        with tf.device(device):
            rows.append(tf.nest.map_structure(
                lambda a: tf.convert_to_tensor(a[i * (len(a) // k):(i + 1) * (len(a) // k)]), structure))
    return rows


def per_replica(strategy: tf.distribute.Strategy, copies: list) -> Any:
    """The per-replica value (what ``strategy.run`` takes) of ``copies``, one structure per local
    replica as :func:`broadcast` and :func:`shard` make them. The state is kept between steps as such
    plain lists (flat inputs and outputs of the compiled step) and made per-replica inside it; across
    hosts each copy is placed on its device (a collective between hosts needs its inputs placed)."""
    ids, devices, placed = replica_ids(strategy), strategy.extended.worker_devices, spread(strategy)

    def value(ctx):
        i = ids.index(ctx.replica_id_in_sync_group)
        if not placed:
            return copies[i]
        with tf.device(devices[i]):
            return tf.nest.map_structure(tf.identity, copies[i])

    return strategy.experimental_distribute_values_from_function(value)


def local(strategy: tf.distribute.Strategy, structure: Any) -> list:
    """This process's replicas' values of the per-replica ``structure``, in replica order."""
    flat = [strategy.experimental_local_results(v) for v in tf.nest.flatten(structure)]
    return [tf.nest.pack_sequence_as(structure, [f[i] for f in flat]) for i in range(len(replica_ids(strategy)))]


def collective(strategy: tf.distribute.Strategy, fn: Callable) -> Callable[[list], list]:
    """A traced function of every local replica's copies (one structure per replica, as
    :func:`broadcast` makes them) that runs ``fn(replica context, copy)`` on each replica (every
    host's at once) and returns the new copies."""
    def run(copies):
        out = strategy.run(lambda v: fn(tf.distribute.get_replica_context(), v), args=(per_replica(strategy, copies),))
        return local(strategy, out)

    return tf.function(run, autograph=False)


def _mean(ctx, values: list) -> list:
    """The mean of ``values`` over the replicas."""
    return [t / ctx.num_replicas_in_sync for t in ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)]


#: the integer type of each float width, whose bits :func:`_fingerprints` sums
_BITS = {8: tf.int64, 4: tf.int32, 2: tf.int16}


def _fingerprints(ctx, values: list) -> Any:
    """Every replica's checksum of each of ``values``, gathered (``(k, n)`` int64): its bit patterns
    summed as integers (exact in any order, on any hardware; a bitcast copies nothing)."""
    mine = tf.stack([tf.cast(tf.reduce_sum(tf.bitcast(v, _BITS[v.dtype.size])), tf.int64) for v in values])
    return ctx.all_gather(mine[None], 0)


def _from_first(ctx, values: Any) -> Any:
    """Replica 0's ``values`` on every replica (an all-reduce in which the others add zeros: exact)."""
    first = tf.equal(ctx.replica_id_in_sync_group, 0)
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                          tf.nest.map_structure(lambda t: tf.where(first, t, tf.zeros_like(t)), values))


class MirroredTrainer(Trainer):
    """The data-parallel training step (see the module's docstring).

    Args:
        model: the native ``keras.Model`` (called with ``stateless_call``).
        tensors: the trainable tensors (``freeze.Tensor``), named for the optimizer state.
        frozen: ids of the variables that must never be written (frozen weights), even by a layer
            that trains.
        rng_vars: ``(key, seed state)`` of the random layers.
        spec: the training spec (``spec.strategy``: the ``DataParallel`` it runs).
        to_inputs: a numpy batch as the model is called.
        prefix: prepended to the tensor names to look up their rates.
    """

    def __init__(self, model: keras.Model, tensors: list, frozen: set, rng_vars: list, spec: TrainSpec,
                 to_inputs: Callable[[Any], Any] = lambda x: x, prefix: str = ""):
        if spec.precision == "float16":
            raise DistributedError("precision='float16' (Keras' dynamic loss scaling) does not run under "
                                   "DataParallel on the keras backend; use precision='bfloat16' or 'float32'")
        self.model, self.spec, self.rng_vars, self.to_inputs = model, spec, rng_vars, to_inputs
        self.strategy = strategy_for(spec.strategy)
        self.count = self.strategy.num_replicas_in_sync
        #: some replicas run on other hosts: the outputs are gathered, the trainable values start from replica 0's
        self.spread = spread(self.strategy)
        self._collectives: dict[str, Any] = {}
        self._trainable = list(model.trainable_variables)  # stateless_call's order
        self._non_trainable = list(model.non_trainable_variables)
        by_id = {id(t.variable): t for t in tensors}
        self.tensors = [by_id[id(v)] for v in self._trainable]
        index = {id(v): i for i, v in enumerate(self._non_trainable)}
        rng_ids = {id(v) for _, v in rng_vars}
        written = [v for v in written_variables(model, rng_vars, self._trainable) if id(v) in index]
        #: indices (in ``non_trainable_variables``) of the state averaged over the replicas by
        #: :meth:`finish` (a training BatchNorm's moving statistics) and of the random layers' seed states
        self.synced = [index[id(v)] for v in written if id(v) not in rng_ids and id(v) not in frozen]
        self.seeded = [index[id(v)] for v in written if id(v) in rng_ids]
        rates = param_rates(spec, [t.name for t in self.tensors], prefix)
        self.optimizer = build_optimizer(spec.optimizer, spec.clip_grad_norm, rates)  # its rule; holds no state
        self._lr = float(spec.optimizer.schedule.lr_at(0))
        self._fns: dict[tuple, Any] = {}
        self._traces = 0
        self._start(zero=True)

    # ---------------------------------------------------------------- state
    def _start(self, zero: bool) -> None:
        """Copy the model's values to every replica; with ``zero``, zero optimizer state too."""
        weights = [tf.convert_to_tensor(v) for v in self._trainable]
        states = [tf.convert_to_tensor(v) for v in self._non_trainable]
        #: per replica (in replica order): its copies of the trainable weights, the other variables
        #: and the optimizer slots
        self.weights, self.states = map(list, zip(*broadcast(self.strategy, (weights, states))))
        if self.spread:  # every host's replicas start from replica 0's trainable values (as DDP's broadcast)
            self._check_same_frozen()
            floats = self._float_synced()
            firsts = self._collective("first", _from_first, [(w, [st[i] for i in floats])
                                                             for w, st in zip(self.weights, self.states)])
            for r, (w, values) in enumerate(firsts):
                self.weights[r] = list(w)
                for i, v in zip(floats, values):
                    self.states[r][i] = v
        if zero:
            self.slots = broadcast(self.strategy, [{n: tf.zeros_like(w) for n in self.optimizer.slot_names()}
                                                   for w in weights])
            self.iteration = tf.constant(0, tf.int64)
            self.offsets = tf.zeros((len(weights),), tf.int64)
            self._same_steps = True
            self.group_lr = tf.constant(np.asarray(self.optimizer.multipliers) * self._lr, tf.float64)
        self.flag = tf.constant(FLAG_OK, tf.int32)
        self.nonfinite = None
        self.compilations = 0
        #: the copies differ from the model's variables (steps ran since finish wrote them; across hosts
        #: from the start: replica 0's values, which this host's model may not hold)
        self._unwritten = self.spread

    def reset(self, seed: int) -> None:
        seed_rngs(self.rng_vars, seed)
        self._start(zero=True)

    def resume(self) -> None:
        self._start(zero=False)

    def finish(self) -> None:
        """Write replica 0's weights and the state the step writes back to the model's variables; the
        synced state (a training BatchNorm's moving statistics, which each replica updates from its
        shard) is first averaged over the replicas, on every replica. Once per epoch rather than
        after every step: the moving averages are linear in the batch statistics, so the mean of the
        replicas' is the one per-step averaging would give (up to rounding), without a collective
        per step. Nothing to do when no step ran since the last call."""
        if not self._unwritten:
            return
        self._unwritten = False
        floats = self._float_synced()
        if floats:
            means = self._collective("mean", _mean, [[states[i] for i in floats] for states in self.states])
            for states, values in zip(self.states, means):
                for i, v in zip(floats, values):
                    states[i] = v
        weights, states = self.weights[0], self.states[0]
        for var, value in zip(self._trainable, weights):
            var.assign(value)
        for i in self.synced + self.seeded:
            self._non_trainable[i].assign(states[i])

    def _check_same_frozen(self) -> None:
        """Raise :class:`DistributedError`, on every host alike, when a floating-point value that does
        not train (a frozen weight, a frozen BatchNorm's statistics) differs between the hosts: only
        what trains starts from replica 0's, so every process must build the same model (checksums
        of :func:`_fingerprints`, gathered in one collective)."""
        fixed = set(self.synced) | set(self.seeded)
        frozen = [i for i, v in enumerate(self.states[0])
                  if i not in fixed and v.dtype.is_floating and v.dtype.size in _BITS]
        if frozen:
            every = self._collective("frozen", _fingerprints, [[st[i] for i in frozen] for st in self.states])[0]
            check_same_frozen(every.numpy(), [self._non_trainable[i].path for i in frozen], "hosts",
                              " (keras.utils.set_random_seed)")

    def _float_synced(self) -> list[int]:
        return [i for i in self.synced if self.states[0][i].dtype.is_floating] if self.count > 1 else []

    def _collective(self, name: str, fn: Callable, copies: list) -> list:
        """``fn(replica context, values)`` run on every replica on ``copies`` (see :func:`collective`),
        traced once per trainer as a concrete function (called once per fit or epoch, a polymorphic
        function would warn of retracing as new trainers trace it)."""
        if name not in self._collectives:
            self._collectives[name] = collective(self.strategy, fn).get_concrete_function(copies)
        return self._collectives[name](copies)

    def replica_values(self) -> list[dict[str, list[np.ndarray]]]:
        """This process's replicas' copies, in replica order: ``{"weights": [...], "states": [...], "slots":
        [{slot: array}]}`` (``model.trainable_variables``' and ``non_trainable_variables``' orders)."""
        out = []
        for weights, states, slots in zip(self.weights, self.states, self.slots):
            out.append({"weights": [w.numpy() for w in weights], "states": [s.numpy() for s in states],
                        "slots": [{n: v.numpy() for n, v in s.items()} for s in slots]})
        return out

    # ---------------------------------------------------------------- the step
    def _replica_step(self, x, y, w, weights, states, slots, lr, iteration, offsets, flag, same: bool):
        ctx = tf.distribute.get_replica_context()
        rid = ctx.replica_id_in_sync_group
        k = self.count
        states = list(states)
        salts = {}
        for i in self.seeded:  # replica i draws from its own seed (XOR, undone on the way out)
            s = states[i]
            salts[i] = tf.cast(tf.stack([rid * RNG_SALT, 0]), s.dtype)
            states[i] = tf.bitwise.bitwise_xor(s, salts[i])
        with tf.GradientTape() as tape:
            tape.watch(weights)
            out, new_states, extra = self.model.stateless_call(weights, states, x, training=True, return_losses=True)
            out = tf.cast(out, tf.float32)
            per, d = per_sample_loss(out, y, self.spec.loss)
            if w is None and d is None:  # the global batch size: the shards are equal, no collective
                num, den = tf.reduce_sum(per), tf.cast(tf.shape(per)[0] * k, tf.float32)
            else:
                w = tf.ones_like(per) if w is None else tf.cast(w, tf.float32)
                num = tf.reduce_sum(w * per)
                den = tf.stop_gradient(tf.reduce_sum(w if d is None else w * d))
                den = ctx.all_reduce(tf.distribute.ReduceOp.SUM, den)
            objective = num / den
            if extra:
                objective = objective + tf.add_n([tf.cast(e, tf.float32) for e in extra]) / k
        grads = dense(tape.gradient(objective, weights))
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, weights)]
        grads, loss = ctx.all_reduce(tf.distribute.ReduceOp.SUM, (grads, objective))
        if self.spread:  # every host's outputs, for the same History everywhere
            out = ctx.all_gather(out, 0)
        if flag is not None:
            flag = guard_flag(flag, loss, grads)
        if self.spec.clip_grad_norm is not None:
            grads = clip_by_global_norm(grads, self.spec.clip_grad_norm)
        group, rates = self.optimizer.rates_of(lr, iteration, offsets, same)
        updated = [self.optimizer.rule(v, g, s, r) for v, g, s, r in zip(weights, grads, slots, rates)]
        new_weights, new_slots = [u[0] for u in updated], [u[1] for u in updated]
        kept = list(states)  # frozen and untouched state: the input copies themselves
        for i in self.synced:  # each replica's own, averaged by finish()
            kept[i] = new_states[i]
        for i in self.seeded:
            kept[i] = tf.bitwise.bitwise_xor(new_states[i], salts[i])
            states[i] = tf.bitwise.bitwise_xor(states[i], salts[i])
        new = (new_weights, kept, new_slots, iteration + 1)
        if flag is not None:  # refused: every value as it was (a cond forwards one side's tensors, no copies)
            old = (list(weights), states, list(slots), iteration)
            new = tf.cond(tf.equal(flag, FLAG_OK), lambda: new, lambda: old)
        return (out, *new, group, tf.constant(FLAG_OK, tf.int32) if flag is None else flag)

    def _function(self, x: Any, y: np.ndarray, weighted: bool, args: tuple):
        """The concrete step for this batch structure and size, traced on ``args`` (the step's
        arguments) the first time. It is called with its inputs flat (``call_flat``): the polymorphic
        function's dispatch would match every replica's copy of every tensor on each step."""
        same = self._same_steps or not self.optimizer.uses_step
        key = (structure_key(x), y.shape, y.dtype.str, weighted, same)
        fn = self._fns.get(key)
        if fn is None:
            guard, strategy = self.spec.guard, self.strategy

            def run(x, y, w, weights, states, slots, lr, iteration, offsets, flag):
                self._traces += 1
                step = lambda x, y, w, weights, states, slots: self._replica_step(  # noqa: E731
                    x, y, w, weights, states, slots, lr, iteration, offsets, flag if guard else None, same)
                args = tuple(None if v is None else per_replica(strategy, v) for v in (x, y, w, weights, states, slots))
                out, weights, states, slots, iteration, group, flag = strategy.run(step, args=args)
                copies = local(strategy, (weights, states, slots))
                first = lambda v: strategy.experimental_local_results(v)[0]  # noqa: E731
                # (identical on every replica: computed from all-reduced values; out gathered when spread)
                out = first(out) if self.spread else tf.concat(strategy.experimental_local_results(out), 0)
                return (out, *map(list, zip(*copies)), first(iteration), first(group), first(flag))

            fn = self._fns[key] = tf.function(run, autograph=False).get_concrete_function(*args)
        return fn

    def step(self, x: Any, y: np.ndarray, w: np.ndarray | None = None, lr: float | None = None) -> np.ndarray:
        if lr is None:
            lr = self._lr
        else:
            self._lr = lr
        x = self.to_inputs(x)
        xs, ys = shard(self.strategy, x), shard(self.strategy, y)
        ws = None if w is None else shard(self.strategy, w)
        args = (xs, ys, ws, self.weights, self.states, self.slots, tf.constant(lr, tf.float32), self.iteration,
                self.offsets, self.flag)
        before = self._traces
        with precision_errors(self.spec.precision), mixed_precision(self.model, self.spec.precision):
            fn = self._function(x, y, w is not None, args)
            flat = [t for t in tf.nest.flatten(args) if t is not None]
            out, weights, states, slots, iteration, group, flag = call_flat(fn, flat, args)
        self.compilations += self._traces - before
        self.weights, self.states, self.slots, self._unwritten = weights, states, slots, True
        self.iteration, self.group_lr = iteration, group
        if self.spec.guard:
            self.flag = flag
            if self.nonfinite is None:
                self.nonfinite = flag_name(int(flag), [t.name for t in self.tensors])
        return out.numpy()

    # ---------------------------------------------------------------- optimizer state
    def export_state(self) -> dict:
        done = int(self.iteration.numpy())
        offsets = self.offsets.numpy()
        slots0 = self.slots[0]
        slots: dict[str, dict] = {}
        steps: dict[str, int] = {}
        for i, t in enumerate(self.tensors):
            steps[t.name] = done + int(offsets[i])
            slots[t.name] = {} if steps[t.name] == 0 else {
                name: _to_state(value.numpy(), t.perm) for name, value in slots0[i].items()}
        return {"slots": slots, "steps": steps}

    def import_state(self, state: dict) -> None:
        steps = np.array([int(state.get("steps", {}).get(t.name, 0)) for t in self.tensors], np.int64)
        done = int(steps.min())
        slots = []
        for t, v in zip(self.tensors, self._trainable):
            given = state.get("slots", {}).get(t.name) or {}
            slots.append({name: tf.zeros(v.shape, v.dtype) if given.get(name) is None else
                          tf.constant(_from_state(given[name], t.perm, tuple(v.shape), f"{t.name}/{name}"), v.dtype)
                          for name in self.optimizer.slot_names()})
        self.slots = broadcast(self.strategy, slots)
        self.iteration, self.offsets = tf.constant(done, tf.int64), tf.constant(steps - done)
        self._same_steps = not (steps - done).any()

    def applied_lr(self) -> dict[str, float]:
        group = self.group_lr.numpy()
        return {t.name: float(group[g]) for t, g in zip(self.tensors, self.optimizer.group_of)}

    def optimizer_state_bytes(self) -> int:
        """One replica's optimizer state (every replica holds a copy)."""
        weights = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in self._trainable)
        slots = weights * len(self.optimizer.slot_names())
        return slots + 8 + 4 + 8 * len(self._trainable)


#: ``features``' distributed runs per (strategy, feature function), least recently used dropped first
_FEATURE_RUNS: dict[tuple, Any] = {}


def features(strategy: tf.distribute.Strategy, fn, variables: list, chunks: list) -> np.ndarray:
    """``fn(batch, values)`` (a feature function, see ``KerasModel._feature_function``) on every batch
    of ``chunks`` (model inputs), each split over the replicas (padded with its last row to a
    multiple of the replica count, the padding dropped after)."""
    k, gather = strategy.num_replicas_in_sync, spread(strategy)
    values = broadcast(strategy, [tf.convert_to_tensor(v) for v in variables])  # read once for all chunks
    run = _FEATURE_RUNS.pop((strategy, fn), None)
    if run is None:
        def shard_features(batch, values):  # every host's rows when spread
            out = fn(batch, values)
            return tf.distribute.get_replica_context().all_gather(out, 0) if gather else out

        def split(batch, values):
            out = strategy.run(shard_features, args=(per_replica(strategy, batch), per_replica(strategy, values)))
            out = strategy.experimental_local_results(out)
            return out[0] if gather else tf.concat(out, 0)
        run = tf.function(split, autograph=False)
    _FEATURE_RUNS[strategy, fn] = run  # most recently used last
    while len(_FEATURE_RUNS) > 16:
        _FEATURE_RUNS.pop(next(iter(_FEATURE_RUNS)))
    out = []
    for batch in chunks:
        n = len(tf.nest.flatten(batch)[0])
        pad = -n % k
        if pad:
            batch = tf.nest.map_structure(lambda a: np.concatenate([a, np.repeat(a[-1:], pad, 0)]), batch)
        out.append(run(shard(strategy, batch), values).numpy()[:n])
    return np.concatenate(out)
