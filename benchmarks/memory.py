"""Peak memory of a fit is bounded by the batch, not by the data set: one epoch over ``n`` images of
64x64x3 from a generator (float32, made a batch at a time) and from a ``np.memmap`` file (uint8,
scaled batch by batch with ``tl.data.scale``), for a small and a large ``n``, each in a new process
(peak RSS: ``ru_maxrss``).

    python -m benchmarks.memory                          # 500 vs 50,000 images on every backend
    python -m benchmarks.memory --sizes 500,5000 --backends torch

Writes ``benchmarks/results/memory.json`` and ``memory.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: one fit in a new process; prints its peak RSS in MiB and its seconds
FIT = """
import resource, sys, time, numpy as np, tlcore as tl
n, backend, source, path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
base = tl.zoo.create("small_cnn", backend=backend, widths=(4, 8), input_size=64, num_classes=3)
ft = tl.finetune(base, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(3))
labels = np.random.default_rng(1).integers(0, 3, n)
if source == "generator":
    def images():  # a batch at a time: the whole set is never in memory
        rng = np.random.default_rng(0)
        for i in range(0, n, 250):
            yield rng.normal(size=(min(250, n - i), 64, 64, 3)).astype(np.float32), labels[i:i + 250]
    args = (images,)
else:
    args = (tl.data.scale(np.memmap(path, dtype=np.uint8, mode="r", shape=(n, 64, 64, 3)), 1 / 255), labels)
t = time.perf_counter()
info = ft.fit(*args, epochs=1, batch_size=250, progress=False).info
print(info["cache_features"].split(":")[0].replace(" ", "_"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      time.perf_counter() - t)
"""


def measure(n: int, backend: str, source: str, folder: Path) -> dict:
    path = folder / f"images_{n}.u8"
    if source == "memmap" and not path.exists():
        mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, 64, 64, 3))
        rng = np.random.default_rng(0)
        for i in range(0, n, 1000):
            mm[i:i + 1000] = rng.integers(0, 256, size=mm[i:i + 1000].shape, dtype=np.uint8)
        mm.flush()
        del mm
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", FIT, str(n), backend, source, str(path)], capture_output=True,
                         text=True, env=env, check=True)
    cache, mb, seconds = out.stdout.split()[-3:]
    return {"backend": backend, "source": source, "images": n, "data_mb": n * 64 * 64 * 3 * (4 if source ==
            "generator" else 1) / 2 ** 20, "peak_rss_mb": float(mb), "seconds": float(seconds), "cache_features": cache}


def markdown(rows: list[dict], small: int, large: int) -> str:
    lines = [f"Peak RSS of one epoch over {small:,} vs {large:,} images of 64x64x3 (small_cnn, batch 250, new "
             "process each)", "", f"| backend | source | data of {large:,} MB | peak {small:,} MB | "
             f"peak {large:,} MB | ratio | s for {large:,} | feature cache |", "|---|---|---|---|---|---|---|---|"]
    for b, s in sorted({(r["backend"], r["source"]) for r in rows}):
        lo, hi = (next(r for r in rows if (r["backend"], r["source"], r["images"]) == (b, s, k)) for k in (small, large))
        lines.append(f"| {b} | {s} | {hi['data_mb']:.0f} | {lo['peak_rss_mb']:.0f} | {hi['peak_rss_mb']:.0f} | "
                     f"{hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f} | {hi['seconds']:.1f} | {hi['cache_features']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import tlcore as tl

    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    p.add_argument("--backends", default=",".join(tl.available_backends()))
    p.add_argument("--sizes", default="500,50000", help="small,large number of images")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    small, large = map(int, args.sizes.split(","))
    t0, rows = time.time(), []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            for source in ("generator", "memmap"):
                for n in (small, large):
                    rows.append(measure(n, backend, source, Path(tmp)))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"rows": rows, "seconds": time.time() - t0}, indent=2))
    table = markdown(rows, small, large)
    (out / "memory.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
