"""Data-parallel fine-tuning, 1 vs 2 replicas on this machine: tlcore's ``fit(strategy=
tl.distribute.DataParallel())`` against a hand-written loop on the same engine (PyTorch DDP over 2
gloo processes, a sharded ``jax.jit`` over 2 forced host devices, a ``tf.distribute.MirroredStrategy``
over 2 logical CPU devices). Each backend's measurement lives in ``benchmarks/dp_<backend>.py``
(``measure(repeats, steps)``) and starts its own processes.

    python -m benchmarks.distributed                # every installed backend
    python -m benchmarks --distributed              # the same
    python -m benchmarks.distributed --backends jax --repeats 3

Writes ``benchmarks/results/distributed.json`` and ``distributed.md``. On 2 CPU cores, 2 replicas
share the cores the single replica had, so the point is tlcore against the hand-written loop on the
same engine, not a speed-up.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path


def markdown(rows: list[dict]) -> str:
    lines = ["Data parallel (global batch split over the replicas), ms per step: tlcore vs a hand-written loop on the "
             "same engine", "", "| backend | replicas | engine | tlcore ms | native ms | tlcore / native |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['backend']} | {r.get('replicas', '')} | | n/a | n/a | {r['error']} |")
            continue
        lines.append(f"| {r['backend']} | {r['replicas']} | {r.get('engine', '')} | {r['tlcore_ms']:.2f} | "
                     f"{r['native_ms']:.2f} | {r['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import tlcore as tl

    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.splitlines()[0])
    p.add_argument("--backends", default=",".join(tl.available_backends()))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="1 repeat of 2 steps: checks that it runs")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 1, 2
    t0, rows = time.time(), []
    for backend in args.backends.split(","):
        print(f"data parallel on {backend} ...", file=sys.stderr, flush=True)
        module = importlib.import_module(f"benchmarks.dp_{backend}")
        rows += module.measure(args.repeats, args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "distributed_quick" if args.quick else "distributed"
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "settings": vars(args), "seconds": time.time() - t0},
                                                 indent=2))
    table = markdown(rows)
    (out / f"{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
