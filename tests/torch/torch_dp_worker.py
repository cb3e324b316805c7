"""One replica of tests/torch/test_torch_distributed.py's data-parallel runs, started by ``torchrun``:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/torch/torch_dp_worker.py OUT

Runs every scenario of :data:`SCENARIOS` with ``strategy=tl.distribute.DataParallel()`` and writes, per
rank, each model's state (``OUT/<scenario>_rank<r>.npz``) and ``OUT/rank<r>.json`` (History rows,
info, captured progress output, the errors raised for bad inputs). The test runs the same scenarios
in one process without a strategy (the functions below, imported) and compares.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

import tlcore as tl

N, BATCH = 48, 16  # 3 steps per epoch
#: conv1, bn1 and bn2 frozen (bn2 after the trainable conv2: a frozen BatchNorm inside the trained path)
FROZEN = tl.FreezePolicy.matching(r"^(conv1|bn1|bn2)\.")


def dataset(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3, 8, 8)).astype(np.float32), rng.integers(0, 3, n).astype(np.int64)


def model(freeze: tl.FreezePolicy) -> tl.Model:
    base = tl.get_backend("torch").reference_model(seed=0)
    return tl.finetune(base, cut=tl.LayerCut(at="pool"), head=tl.Head.linear(3), freeze=freeze)


def sgd(strategy, **fit) -> tuple[tl.Model, list[tl.History], dict]:
    """SGD with momentum, 3 steps (the state after them is returned too); then a second fit under
    another policy (the head only): a re-wrap."""
    ft, (x, y) = model(FROZEN), dataset()
    first = ft.fit(x, y, epochs=1, batch_size=BATCH, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9), seed=3,
                   strategy=strategy, **fit)
    after_first = ft.state()
    second = ft.fit(x, y, epochs=1, batch_size=BATCH, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9), seed=4,
                    freeze=tl.FreezePolicy.all(), cache_features=False, strategy=strategy)
    return ft, [first, second], after_first


def adamw(strategy) -> tuple[tl.Model, list[tl.History]]:
    """AdamW with weight decay and clipping (tight: every step clips), 3 steps, sample weights."""
    ft, (x, y) = model(FROZEN), dataset()
    w = np.linspace(0.2, 2.0, N).astype(np.float32)
    h = ft.fit(x, y, sample_weight=w, epochs=1, batch_size=BATCH, optimizer=tl.optim.AdamW(lr=1e-2, weight_decay=0.05),
               clip_grad_norm=0.05, seed=5, progress=False, strategy=strategy)
    return ft, [h]


def cached(strategy) -> tuple[tl.Model, list[tl.History]]:
    """Everything before the head frozen: the features are cached (computed shard by shard), 2 epochs."""
    ft, (x, y) = model(tl.FreezePolicy.all()), dataset()
    h = ft.fit(x, y, epochs=2, batch_size=BATCH, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9), seed=6,
               cache_features=True, progress=False, strategy=strategy)
    return ft, [h]


def bn_trains(strategy) -> tuple[tl.Model, list[tl.History]]:
    """bn1 and bn2 train: per-replica statistics, averaged over the replicas at the end of the epoch."""
    ft, (x, y) = model(tl.FreezePolicy.up_to("conv1", bn="train")), dataset()
    h = ft.fit(x, y, epochs=1, batch_size=BATCH, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9), seed=7,
               progress=False, strategy=strategy)
    return ft, [h]


def diverges(strategy) -> tuple[tl.Model, list[tl.History]]:
    """Sample 44 overflows: the third batch's loss is not finite on rank 1's shard only; every rank
    must refuse that step (the guard) and stop with the same report."""
    ft, (x, y) = model(FROZEN), dataset()
    x[44] = 3e38
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = ft.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9),
                   on_nonfinite="warn", progress=False, strategy=strategy)
    return ft, [h]


class Crash(Exception):
    """A simulated crash."""


class CrashAtFirstEpochEnd(tl.callbacks.Callback):
    """Crashes at the end of the first epoch (its last step checkpointed, the epoch's end not)."""

    def on_epoch_end(self, epoch, logs, model):
        raise Crash


def resumed(strategy, folder: Path | None = None) -> tuple[tl.Model, list[tl.History]]:
    """AdamW, 2 epochs of 3 shuffled steps. Without a strategy: the uninterrupted run. With one:
    checkpointed every 3 steps into ``folder`` (rank 0 writes), crashed at the first epoch's end, then
    ``tl.resume(folder)`` on every rank and the same fit again, which goes on from step 3."""
    x, y = dataset()
    kw = dict(epochs=2, batch_size=BATCH, optimizer=tl.optim.AdamW(lr=1e-2, weight_decay=0.05), seed=8,
              progress=False, strategy=strategy)
    if strategy is None:
        ft = model(FROZEN)
        return ft, [ft.fit(x, y, **kw)]
    import torch.distributed as dist

    try:
        model(FROZEN).fit(x, y, checkpoint_dir=folder, checkpoint_every=3, callbacks=[CrashAtFirstEpochEnd()], **kw)
    except Crash:
        pass
    dist.barrier()  # rank 0 has written the state every rank reads
    ft = tl.resume(folder, model=tl.get_backend("torch").reference_model(seed=1).native)  # (its weights: the saved)
    return ft, [ft.fit(x, y, checkpoint_dir=folder, **kw)]


def rows(h: tl.History) -> dict:
    return {"history": h.history, "info": {k: h.info[k] for k in ("steps", "cache_features", "checkpoint_writes",
                                                                  "diverged") if k in h.info}}


def errors(strategy_type) -> dict:
    """The bad inputs, each raised before training: their error class and message."""
    ft, (x, y) = model(FROZEN), dataset()
    before = ft.state()
    found = {}
    for name, call in {"odd_batch": lambda: ft.fit(x, y, batch_size=15, strategy=strategy_type()),
                       "devices_3": lambda: ft.fit(x, y, batch_size=BATCH, strategy=strategy_type(devices=3))}.items():
        try:
            call()
            found[name] = None
        except Exception as e:  # noqa: BLE001 - recorded for the test to check
            found[name] = [type(e).__name__, str(e)]
    found["unchanged"] = all(np.array_equal(before[k], v) for k, v in ft.state().items())
    # rank 1 builds the network from another seed: its frozen conv1 differs from rank 0's
    import torch.distributed as dist

    base = tl.get_backend("torch").reference_model(seed=dist.get_rank())
    odd = tl.finetune(base, cut=tl.LayerCut(at="pool"), head=tl.Head.linear(3), freeze=FROZEN)
    before = odd.state()
    try:
        odd.fit(x, y, batch_size=BATCH, strategy=strategy_type())
        found["frozen_differ"] = None
    except Exception as e:  # noqa: BLE001 - recorded for the test to check
        found["frozen_differ"] = [type(e).__name__, str(e)]
    found["frozen_differ_unchanged"] = all(np.array_equal(before[k], v) for k, v in odd.state().items())
    return found


def main(out: str) -> None:
    import torch.distributed as dist

    out_dir = Path(out)
    dp = tl.distribute.DataParallel()
    report: dict = {}
    stderr = io.StringIO()
    # the first fit initialises the process group from torchrun's variables
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stderr):
        ft, hists, after_first = sgd(dp, progress="epoch", checkpoint_dir=out_dir / f"ckpt{os.environ['RANK']}")
    rank = dist.get_rank()
    report["progress"] = stderr.getvalue()
    report["world"] = dist.get_world_size()
    np.savez(out_dir / f"sgd_rank{rank}.npz", **after_first)
    np.savez(out_dir / f"sgd2_rank{rank}.npz", **ft.state())
    report["sgd"] = [rows(h) for h in hists]
    for name, run in {"adamw": adamw, "bn_trains": bn_trains, "diverges": diverges}.items():
        ft, hists = run(dp)
        np.savez(out_dir / f"{name}_rank{rank}.npz", **ft.state())
        report[name] = [rows(h) for h in hists]
    ft_c, (x, _) = model(tl.FreezePolicy.all()), dataset()
    computed = []
    local = ft_c._local_features
    ft_c._local_features = lambda xb: computed.append(len(xb)) or local(xb)  # counts the rows this rank computes
    ft_c.fit(x, dataset()[1], epochs=2, batch_size=BATCH, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9), seed=6,
             cache_features=True, progress=False, strategy=dp)
    report["cached_rows"] = list(computed)
    if rank == 0:  # outside a fit, one rank alone: computed here, whole (a collective would hang)
        report["features_outside_fit"] = [ft_c.features(x).shape[0], computed[len(report["cached_rows"]):]]
    ft, hists = resumed(dp, out_dir / "resumed")
    np.savez(out_dir / f"resumed_rank{rank}.npz", **ft.state())
    report["resumed"] = [rows(h) for h in hists]
    ft, hists = cached(dp)
    np.savez(out_dir / f"cached_rank{rank}.npz", **ft.state())
    report["cached"] = [rows(h) for h in hists]
    report["errors"] = errors(tl.distribute.DataParallel)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
