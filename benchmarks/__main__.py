"""Run the cross-framework benchmarks and write JSON, a Markdown table and a PNG chart.

    python -m benchmarks                 # all installed backends, cnn + resnet18 + vit_tiny (+ a small BERT on torch)
    python -m benchmarks --quick         # a tiny run for CI: checks that everything runs
    python -m benchmarks --distributed   # data parallel, 1 vs 2 replicas (benchmarks/distributed.py)
    tlcore bench --backends torch,jax

Every backend runs in its own process; tlcore and the hand-written loop are measured side by side,
interleaved, in the same process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .report import machine, markdown, plot


def import_time_ms(repeats: int = 5) -> float:
    """Median time of ``import tlcore`` alone, in a fresh interpreter each time."""
    code = "import time; t = time.perf_counter(); import tlcore; print(time.perf_counter() - t)"
    return 1000 * statistics.median(float(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                          text=True, check=True).stdout) for _ in range(repeats))


def fresh_run(args: argparse.Namespace, backend: str, workload: str, impl: str) -> float:
    """ms of one end-to-end fine-tune timed in a new worker process (so it includes compiling)."""
    cmd = [sys.executable, "-m", "benchmarks.worker", "--backend", backend, "--workloads", workload,
           "--steps", str(args.steps), "--epochs", str(args.epochs), "--fresh", impl]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
                      .splitlines()[-1])["fresh_process_ms"]


def main(argv: list[str] | None = None) -> int:
    import tlcore as tl

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--backends", default=",".join(tl.available_backends()))
    p.add_argument("--workloads", default="cnn,resnet18,vit_tiny,bert")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=8, help="batches per timed run")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the end-to-end frozen fine-tune")
    p.add_argument("--fresh-repeats", type=int, default=3, help="new processes per end-to-end fine-tune and side")
    p.add_argument("--quick", action="store_true", help="tiny run (cnn, 1 repeat, 2 steps) that only checks it runs")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--distributed", action="store_true",
                   help="only the data-parallel rows (1 vs 2 replicas; see benchmarks/distributed.py)")
    args = p.parse_args(argv)
    if args.distributed:
        from .distributed import main as distributed

        return distributed(["--backends", args.backends, "--repeats", str(args.repeats), "--steps", str(args.steps),
                            "--out", args.out] + (["--quick"] if args.quick else []))
    if args.quick:
        args.workloads, args.repeats, args.steps, args.epochs, args.fresh_repeats = "cnn", 1, 2, 2, 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report = {"machine": machine(),
              "settings": vars(args), "import_tlcore_ms": import_time_ms(), "backends": {}, "rows": []}
    for backend in args.backends.split(","):
        print(f"benchmarking {backend} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "benchmarks.worker", "--backend", backend, "--workloads", args.workloads,
               "--repeats", str(args.repeats), "--steps", str(args.steps), "--epochs", str(args.epochs)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        result = json.loads(done.stdout.strip().splitlines()[-1])
        streaming = subprocess.run(cmd[:6] + ["cnn", *cmd[7:], "--streaming"], capture_output=True, text=True)
        if streaming.returncode != 0:
            print(streaming.stderr[-3000:], file=sys.stderr)
            return streaming.returncode
        result["rows"] += json.loads(streaming.stdout.strip().splitlines()[-1])["rows"]
        recipe = subprocess.run(cmd[:6] + ["cnn", *cmd[7:], "--recipe"], capture_output=True, text=True)
        if recipe.returncode != 0:
            print(recipe.stderr[-3000:], file=sys.stderr)
            return recipe.returncode
        report.setdefault("recipe", []).append(json.loads(recipe.stdout.strip().splitlines()[-1])["recipe"])
        report["backends"][backend] = {"versions": result["versions"], "peak_rss_mb": result["peak_rss_mb"]}
        for row in result["rows"]:
            if row["mode"].startswith("e2e"):  # a user's script: one fine-tune in a new process
                row["fresh_process_ms"] = statistics.median(
                    fresh_run(args, backend, row["workload"], row["impl"]) for _ in range(args.fresh_repeats))
        report["rows"] += result["rows"]
    report["seconds"] = time.time() - t0
    name = "quick" if args.quick else "latest"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / f"{name}.md").write_text(table)
    plot(report, out / f"{name}.png")
    print(table)
    print(f"\nwrote {out / name}.json, .md and .png in {report['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
