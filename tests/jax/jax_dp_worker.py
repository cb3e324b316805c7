"""Data-parallel runs for tests/jax/test_jax_distributed.py, in a process of its own: JAX's device
count is fixed when it starts, so the forced host devices (``XLA_FLAGS``) or the
``jax.distributed.initialize()`` must come before anything imports it.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/jax/jax_dp_worker.py devices OUT
    python tests/jax/jax_dp_worker.py process RANK PORT OUT      # one of 2 processes, 1 CPU device each

Writes what it measured to OUT (JSON); the test asserts on it.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
from typing import Any

import numpy as np

if sys.argv[1:2] == ["process"]:  # before tlcore's backend imports JAX's devices
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[3]}", num_processes=2,
                               process_id=int(sys.argv[2]), initialization_timeout=60)

import jax  # noqa: E402

import tlcore as tl  # noqa: E402
from tlcore.testing import sample_data  # noqa: E402
from tlcore_jax import distributed, train  # noqa: E402
from tlcore_jax.train import infer_batches  # noqa: E402

SGD = tl.optim.SGD(lr=0.1, momentum=0.9)
ADAMW = tl.optim.AdamW(lr=1e-2, weight_decay=0.05)
CLIP = 0.05  # small enough that every step clips
#: conv1, bn1 and bn2 frozen (bn2 after the trainable conv2, on its moving statistics)
FROZEN_BN = tl.FreezePolicy.matching(r"^(conv1|bn)")
#: conv1 and bn1 frozen; conv2 and BatchNorm bn2 trainable
TRAINABLE_BN = tl.FreezePolicy.up_to("bn1")


def make(freeze: tl.FreezePolicy, cut: tl.LayerCut | None = None, seed: int = 0) -> tl.Model:
    """The reference model (conv1 bn1 relu1 conv2 bn2 relu2 pool dropout fc) with a linear head for 3
    classes in place of fc."""
    base = tl.get_backend("jax").reference_model(seed=seed)
    return tl.finetune(base, cut=cut or tl.LayerCut(drop_last=1), head=tl.Head.linear(3), freeze=freeze, seed=0)


def fit(ft: tl.Model, x: np.ndarray, y: np.ndarray, strategy: Any = None, **kw: Any) -> tl.History:
    """3 steps of the global batch 16 (48 samples), shuffled by the run's seed."""
    kw.setdefault("optimizer", SGD)
    kw.setdefault("cache_features", False)
    return ft.fit(x, y, epochs=1, batch_size=kw.pop("batch_size", 16), progress=False, strategy=strategy, **kw)


def rel_diff(a: dict, b: dict, names: list[str]) -> float:
    """The largest ``max|a - b| / max|b|`` over the tensors ``names``."""
    return max(float(np.max(np.abs(a[n].astype(np.float64) - b[n])) / max(np.max(np.abs(b[n])), 1e-12))
               for n in names)


def frozen_names(ft: tl.Model) -> list[str]:
    kinds = {t.name: t.kind for t in ft.tensors}
    return [n for n, trains in ft.trainable_mask().items() if not trains and kinds[n] != "rng"]


def trainable_names(ft: tl.Model) -> list[str]:
    return [n for n, trains in ft.trainable_mask().items() if trains]


def bit_identical(a: dict, b: dict, names: list[str]) -> bool:
    return all(a[n].dtype == b[n].dtype and a[n].tobytes() == b[n].tobytes() for n in names)


def the_trainer(ft: tl.Model) -> Any:
    (trainer,) = [t for t in ft._trainers.values() if t.started]
    return trainer


def replicas_report(ft: tl.Model, start: dict) -> dict:
    """Where the trainer's arrays live and whether every device's copy agrees; the frozen (constant)
    tensors' copies compared with their values before training, on every device."""
    trainer = the_trainer(ft)
    arrays = [*trainer.trainable, *trainer.mutable, *trainer.const, *jax.tree.leaves(trainer.opt_state)]
    name_of = {p: n for n, p in ft.layout.path_of.items()}
    const_paths = trainer.split.paths[len(trainer.split.trainable) + len(trainer.split.mutable):]
    const_same = all(h == start[name_of[p]].tobytes()
                     for p, v in zip(const_paths, trainer.const) if name_of[p] in start
                     for h in distributed.replica_hashes(v))
    return {"type": type(trainer).__name__,
            "devices": sorted({len(a.sharding.device_set) for a in arrays}),
            "replicated": all(a.sharding.is_fully_replicated for a in arrays),
            "equal": distributed.all_replicas_equal(arrays),
            "const_count": len(trainer.const), "const_equal_start": const_same}


def allreduced_shapes(ft: tl.Model, x: np.ndarray, y: np.ndarray) -> dict:
    """The shapes the compiled data-parallel step of ``ft``'s last fit all-reduces (from its optimized
    HLO, for a global batch of 16), and those of the trainable parameters."""
    trainer = the_trainer(ft)
    text = trainer.compiled_text(x[:16], y[:16])
    shapes = []
    for line in text.splitlines():
        m = re.search(r"= (.*?) all-reduce(?:-start)?\(", line)
        if m:
            shapes += [tuple(int(d) for d in s.split(",") if d) for s in re.findall(r"f32\[([\d,]*)\]", m.group(1))]
    params = [tuple(v.shape) for v in trainer.trainable]
    return {"allreduced": sorted(s for s in shapes if s), "scalars": sum(1 for s in shapes if not s),
            "trainable": sorted(params), "shard_input": "f32[8,8,8,3]" in text, "whole_input": "f32[16,8,8,3]" in text}


def devices_mode() -> dict:
    dp = tl.distribute.DataParallel()
    out: dict[str, Any] = {"device_count": jax.device_count()}
    hlo: dict[str, dict] = {}
    ref = make(tl.FreezePolicy.up_to("bn1"))
    x, y = sample_data(ref, n=48)

    # trainable conv2 and head, frozen conv1 and both BatchNorm layers (bn2 after a trainable conv), a
    # dropout before the head; and (sgd_bn) BatchNorm bn2 trainable too
    for label, opt, clip, policy in (("sgd", SGD, None, FROZEN_BN), ("adamw", ADAMW, CLIP, FROZEN_BN),
                                     ("sgd_bn", SGD, None, TRAINABLE_BN)):
        one = make(policy)
        start = one.state()
        h1 = fit(one, x, y, optimizer=opt, clip_grad_norm=clip)
        par = make(policy)
        h2 = fit(par, x, y, dp, optimizer=opt, clip_grad_norm=clip)
        other_order = make(policy)
        fit(other_order, x, y, optimizer=opt, clip_grad_norm=clip, seed=1)
        a, b, c = par.state(), one.state(), other_order.state()
        # conv2.bias feeds a BatchNorm that normalises with batch statistics (sgd_bn): its gradient is
        # 0 up to rounding, so its value is rounding noise, compared by the statistics it shifts
        trainable = [n for n in trainable_names(par) if not (policy is TRAINABLE_BN and n == "conv2.bias")]
        frozen = frozen_names(par)
        again = fit(par, x, y, dp, optimizer=opt, clip_grad_norm=clip)
        fresh = fit(make(policy, seed=7), x, y, dp, optimizer=opt, clip_grad_norm=clip)
        hlo[label] = allreduced_shapes(par, x, y)
        out[label] = {
            "trainable": trainable, "frozen": frozen,
            "rel_diff": rel_diff(a, b, trainable),
            "control_other_order": rel_diff(c, b, trainable),
            "moved": max(float(np.max(np.abs(a[n] - start[n]))) for n in trainable if a[n].dtype.kind == "f"),
            "frozen_identical": bit_identical(a, start, frozen),
            "rng_identical": bit_identical(a, b, [n for n in a if n.startswith("dropout.")]),
            "loss": [h1["loss"][0], h2["loss"][0]],
            "one_device_state": floats(b),
            "compilations": [h2.info["compilations"], again.info["compilations"], fresh.info["compilations"]],
            "replicas": replicas_report(par, start),
            "module_devices": sorted({len(v.get_value().sharding.device_set) for v in par._variables().values()}),
        }

    # a stream of batches (dispatched and collected one by one, not the in-memory epoch)
    streamed = {}
    for label, strategy in (("one", None), ("dp", dp)):
        ft = make(FROZEN_BN)
        hist = ft.fit(lambda: ((x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)), epochs=2, batch_size=16,
                      optimizer=SGD, progress=False, cache_features=False, strategy=strategy)
        streamed[label] = (ft.state(), hist["loss"])
    odd = make(FROZEN_BN)
    try:
        odd.fit(lambda: iter([(x[:16], y[:16]), (x[16:31], y[16:31])]), batch_size=16, optimizer=SGD,
                progress=False, cache_features=False, strategy=dp)
        odd_error = None
    except tl.TlcoreError as e:
        odd_error = [type(e).__name__, str(e)]
    out["stream"] = {"rel_diff": rel_diff(streamed["dp"][0], streamed["one"][0], trainable_names(odd)),
                     "loss": [streamed["one"][1], streamed["dp"][1]], "odd_batch": odd_error}

    # one device of two: exactly the single-device path
    single, one_of_two = make(FROZEN_BN), make(FROZEN_BN)
    fit(single, x, y, optimizer=ADAMW, clip_grad_norm=CLIP)
    fit(one_of_two, x, y, tl.distribute.DataParallel(devices=1), optimizer=ADAMW, clip_grad_norm=CLIP)
    out["devices1"] = {"identical": bit_identical(single.state(), one_of_two.state(), list(single.state())),
                       "type": type(the_trainer(one_of_two)).__name__}

    # feature caching: everything before the head frozen, no dropout (cut at the pool)
    cached = {}
    for label, strategy in (("one", None), ("dp", dp)):
        ft = make(tl.FreezePolicy.all(), cut=tl.LayerCut(at="pool"))
        h = fit(ft, x, y, strategy, cache_features=True, optimizer=ADAMW, clip_grad_norm=CLIP)
        cached[label] = (ft.state(), h.info["cache_features"], trainable_names(ft))
    feats = make(tl.FreezePolicy.all(), cut=tl.LayerCut(at="pool"))
    feats._ensure_head(x)
    plan = distributed.plan_for(dp)
    odd = x[:15]
    sharded = distributed.sharded_features(feats.native, odd, feats.head, distributed.ReplicatedLeaves(plan))
    whole = infer_batches(feats.native, odd, 15, stop=feats.head)
    leaves, treedef = jax.tree.flatten(feats.native)
    text = train._infer_leaves.lower(distributed.replicate(leaves, plan), distributed.shard_batch(x[:16], plan),
                                     treedef=treedef, stop=feats.head).compile().as_text()
    out["cached"] = {"rel_diff": rel_diff(cached["dp"][0], cached["one"][0], cached["dp"][2]),
                     "one_device_state": floats(cached["one"][0]),
                     "used": [cached["one"][1], cached["dp"][1]],
                     "features_diff": float(np.max(np.abs(sharded - whole))), "features_shape": list(sharded.shape),
                     "shard_input": "f32[8,8,8,3]" in text, "whole_input": "f32[16,8,8,3]" in text}

    # frozen BatchNorm: the step all-reduces the trainable gradients (and scalars) only
    out["hlo_frozen_bn"], out["hlo_trainable_bn"] = hlo["sgd"], hlo["sgd_bn"]

    # refused before training: nothing changes
    errors = {}
    ft = make(FROZEN_BN)
    before = ft.state()
    for label, call in (("batch15", lambda: fit(ft, x, y, dp, batch_size=15)),
                        ("last_batch", lambda: fit(ft, x[:45], y[:45], dp)),
                        ("devices3", lambda: fit(ft, x, y, tl.distribute.DataParallel(devices=3)))):
        try:
            call()
            errors[label] = None
        except tl.TlcoreError as e:
            errors[label] = [type(e).__name__, str(e)]
    errors["unchanged"] = bit_identical(before, ft.state(), list(before))
    out["errors"] = errors
    return out


def process_mode() -> dict:
    """One of two processes, one CPU device each: :func:`devices_mode`'s ``adamw`` and cached runs
    over both processes; their states go to the test, which compares them with the single-device
    runs of :func:`devices_mode`."""
    dp = tl.distribute.DataParallel()
    par = make(FROZEN_BN)
    x, y = sample_data(par, n=48)
    h = fit(par, x, y, dp, optimizer=ADAMW, clip_grad_norm=CLIP)
    head = make(tl.FreezePolicy.all(), cut=tl.LayerCut(at="pool"))
    cached = fit(head, x, y, dp, cache_features=True, optimizer=ADAMW, clip_grad_norm=CLIP)
    a = par.state()
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "replicas": list(par._replicas(dp)), "trainable": trainable_names(par),
            "state": floats(a), "cached_state": floats(head.state()),
            "hash": hashlib.sha256(b"".join(a[n].tobytes() for n in sorted(a))).hexdigest(),
            "loss": h["loss"], "compilations": h.info["compilations"], "cached_used": cached.info["cache_features"]}


def floats(state: dict) -> dict:
    """The float tensors of ``state`` as nested lists (JSON)."""
    return {n: v.tolist() for n, v in state.items() if v.dtype.kind == "f"}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as cache:
        # XLA's compilation cache: inspecting a compiled step's HLO (an AOT compile) reuses the
        # fit's executable instead of compiling it again
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        result = devices_mode() if sys.argv[1] == "devices" else process_mode()
    with open(sys.argv[-1], "w") as f:
        json.dump(result, f)
