"""Data parallel on PyTorch: ``fit(strategy=tl.distribute.DataParallel())`` against a hand-written
``DistributedDataParallel`` loop, with 1 and 2 gloo processes started by ``torchrun`` (this module
starts them).

Workload: the zoo's ``small_cnn`` (the ``cnn`` workload, 32x32x3 images) cut before its classifier, a
new linear head of 10 classes, the first two blocks frozen (their BatchNorm in inference mode), SGD
with momentum, global batch 64 split over the replicas. The hand-written loop wraps the same network
in DDP (frozen parameters left out by ``requires_grad``), reads its shard of every global batch, and
steps ``torch.optim.SGD``. Each replica runs one thread (a shared machine's cores oversubscribed by
two threads per process slow both loops down erratically), so 2 replicas use 2 cores.

    python -m benchmarks.dp_torch                   # 7 repeats of 8 steps, JSON rows on stdout
    python -m benchmarks.dp_torch --repeats 1 --steps 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GLOBAL_BATCH = 64
FROZEN_UP_TO = "mp2"


def build(seed: int = 0):
    """The fine-tuning model (tlcore) for the workload."""
    import tlcore as tl

    from .workloads import base_model

    return tl.finetune(base_model("cnn", "torch", seed=seed), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(10),
                       freeze=tl.FreezePolicy.up_to(FROZEN_UP_TO))


def dataset(steps: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n = GLOBAL_BATCH * steps
    return rng.normal(size=(n, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


class NativeDDP:
    """The loop a user writes by hand: DDP over the network (frozen parameters have
    ``requires_grad=False`` and stay out of its buckets, frozen BatchNorm in eval mode), this rank's
    shard of every global batch, ``torch.optim.SGD`` with momentum."""

    def __init__(self, ft, lr: float = 0.01):
        import torch
        import torch.distributed as dist
        from torch import nn

        self.torch, self.world, self.rank = torch, dist.get_world_size(), dist.get_rank()
        self.net = ft.native
        self.frozen_bn = [m for name, m in self.net.named_modules() if isinstance(m, nn.BatchNorm2d)
                          and not any(p.requires_grad for p in m.parameters())]
        self.ddp = nn.parallel.DistributedDataParallel(self.net)
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True)

    def epoch(self, x: np.ndarray, y: np.ndarray) -> float:
        torch = self.torch
        F = torch.nn.functional
        self.net.train()
        for m in self.frozen_bn:
            m.eval()
        size = GLOBAL_BATCH // self.world
        for i in range(0, len(x), GLOBAL_BATCH):
            lo = i + self.rank * size
            xb = torch.from_numpy(x[lo:lo + size]).permute(0, 3, 1, 2)
            loss = F.cross_entropy(self.ddp(xb), torch.from_numpy(y[lo:lo + size]))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return float(loss.detach())


def worker(repeats: int, steps: int, out: str) -> None:
    """One replica (under torchrun): median ms per step of tlcore's fit and of the native loop."""
    import torch
    import torch.distributed as dist

    import tlcore as tl

    threads = 1
    torch.set_num_threads(threads)
    dist.init_process_group("gloo")
    x, y = dataset(steps)
    ft, nat = build(), NativeDDP(build())
    opt = tl.optim.SGD(lr=0.01, momentum=0.9)
    fit = dict(epochs=1, batch_size=GLOBAL_BATCH, optimizer=opt, shuffle=False, progress=False, cache_features=False,
               strategy=tl.distribute.DataParallel())
    ft.fit(x[:GLOBAL_BATCH * 2], y[:GLOBAL_BATCH * 2], **fit)  # warm-up: the trainer and its DDP wrapper
    nat.epoch(x[:GLOBAL_BATCH * 2], y[:GLOBAL_BATCH * 2])
    times: dict[str, list[float]] = {"tlcore": [], "native": []}
    for _ in range(repeats):
        for name, run in (("tlcore", lambda: ft.fit(x, y, **fit)), ("native", lambda: nat.epoch(x, y))):
            dist.barrier()
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) * 1000 / steps)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({k: statistics.median(v) for k, v in times.items()} | {"threads": threads}))
    dist.barrier()
    dist.destroy_process_group()


def measure(repeats: int = 7, steps: int = 8) -> list[dict]:
    """Rows for 1 and 2 replicas: ``{"backend": "torch", "replicas", "engine", "tlcore_ms",
    "native_ms", "ratio", ...}`` (ms per optimizer step of a global batch of 64, medians)."""
    rows = []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    for replicas in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "times.json"
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                   str(replicas), "-m", "benchmarks.dp_torch", "--worker", "--repeats", str(repeats),
                                   "--steps", str(steps), "--out", str(out)],
                                  capture_output=True, text=True, env=env, cwd=root, timeout=1800)
            row = {"backend": "torch", "replicas": replicas, "engine": "DDP, gloo processes (torchrun)",
                   "global_batch": GLOBAL_BATCH, "steps": steps, "repeats": repeats}
            if proc.returncode != 0 or not out.exists():
                rows.append(row | {"error": (proc.stderr or proc.stdout)[-500:]})
                continue
            t = json.loads(out.read_text())
            rows.append(row | {"threads_per_replica": t["threads"], "tlcore_ms": t["tlcore"], "native_ms": t["native"],
                               "ratio": t["tlcore"] / t["native"]})
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.dp_torch", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.repeats, args.steps, args.out)
    else:
        print(json.dumps(measure(args.repeats, args.steps)))
