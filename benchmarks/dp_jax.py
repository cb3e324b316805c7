"""Data parallel on JAX: what does a step of ``fit(..., strategy=tl.distribute.DataParallel())`` cost
on 1 and 2 devices, against the sharded-jit loop a user would write by hand?

Workload: the benchmarks' small CNN (``workloads.WORKLOADS["cnn"]``, the zoo's ``small_cnn``: four
3x3 Conv-BN-ReLU blocks 32-64-128-256, 32x32x3 NHWC images), cut before ``fc`` with a new
``Head.linear(10)``, everything trained (BatchNorm too: its statistics over the global batch), SGD
lr 0.01 momentum 0.9, global batch 64.

* ``tlcore``: ``fit`` on ``steps`` batches (one epoch, no shuffling, no feature caching): on 1
  replica the single-device path, on 2 the data-parallel one (batch split over a 1-D mesh,
  parameters and optimizer state replicated);
* ``native``: the hand-written loop of ``benchmarks/native/jax_loop.py`` over the same mesh: the
  module split once (``nnx.split``), ``optax.sgd(momentum=0.9)``, a ``jax.jit`` step with the batch
  sharded (``NamedSharding(mesh, P("data"))``) and parameters, BatchNorm statistics and optimizer
  state replicated, each batch ``jax.device_put`` onto the mesh, the loss read at the end.

Both run in one process that JAX starts with 2 host devices (``XLA_FLAGS=
--xla_force_host_platform_device_count=2``, a subprocess of :func:`measure`), so 1 and 2 replicas
share the same XLA CPU client. Each number is the median ms/step over ``repeats`` interleaved
repeats, after a warm-up that compiles. On CPU the host devices share the machine's cores, so 2
replicas are not expected to be faster than 1; the comparison that matters is tlcore against native.

Usage::

    .venv/bin/python -m benchmarks.dp_jax            # prints the rows as JSON
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from benchmarks.workloads import LR, WORKLOADS  # noqa: E402

BATCH = 64
DEVICES = 2


def measure(repeats: int = 3, steps: int = 20) -> list[dict]:
    """Rows ``{"backend": "jax", "replicas": 1 | 2, "tlcore_ms": ..., "native_ms": ..., "ratio": ...}``
    (ms per step, median over ``repeats``; ratio tlcore/native), measured in a subprocess with
    2 forced host devices."""
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.dp_jax", "--worker", str(repeats), str(steps)],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the data-parallel benchmark failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _data(steps: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.normal(size=(steps * BATCH, 32, 32, 3)).astype(np.float32),
            rng.integers(0, 10, steps * BATCH).astype(np.int64))


def _model():
    import tlcore as tl

    w = WORKLOADS["cnn"]
    base = tl.zoo.create(w.arch, backend="jax", seed=0, **w.config)
    return tl.finetune(base, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(10), freeze=tl.FreezePolicy.none())


class TlcoreRun:
    """``fit`` for one epoch of ``steps`` batches on ``replicas`` devices."""

    def __init__(self, replicas: int, x: np.ndarray, y: np.ndarray):
        import tlcore as tl

        self.tl, self.x, self.y = tl, x, y
        self.model = _model()
        self.strategy = tl.distribute.DataParallel(devices=replicas) if replicas > 1 else None

    def epoch(self) -> None:
        self.model.fit(self.x, self.y, epochs=1, batch_size=BATCH, optimizer=self.tl.optim.SGD(lr=LR, momentum=0.9),
                       shuffle=False, cache_features=False, progress=False, strategy=self.strategy)


class NativeRun:
    """The hand-written sharded-jit loop (see the module's docstring) on the first ``replicas`` devices."""

    def __init__(self, replicas: int, x: np.ndarray, y: np.ndarray):
        import jax
        import optax
        from flax import nnx
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.jax, self.x, self.y = jax, x, y.astype(np.int32)
        mesh = Mesh(np.array(jax.devices()[:replicas]), ("data",))
        rep, self.batch = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
        graphdef, params, rest = nnx.split(_model().native, nnx.Param, ...)
        tx = optax.sgd(LR, momentum=0.9)
        self.params, self.rest = jax.device_put((params, rest), rep)
        self.opt_state = jax.jit(tx.init, out_shardings=rep)(self.params)

        from benchmarks.native.jax_loop import functional_step

        self.step = jax.jit(functional_step(graphdef, tx), in_shardings=(rep, rep, rep, self.batch, self.batch),
                            out_shardings=(rep, rep, rep, rep))

    def epoch(self) -> None:
        put = self.jax.device_put
        for i in range(0, len(self.x), BATCH):
            self.params, self.rest, self.opt_state, loss = self.step(
                self.params, self.rest, self.opt_state, put(self.x[i:i + BATCH], self.batch),
                put(self.y[i:i + BATCH], self.batch))
        float(loss)


def _worker(repeats: int, steps: int) -> list[dict]:
    import jax

    assert jax.device_count() >= DEVICES, jax.devices()
    x, y = _data(steps)
    runs = {(replicas, impl): cls(replicas, x, y) for replicas in (1, DEVICES)
            for impl, cls in (("tlcore", TlcoreRun), ("native", NativeRun))}
    for run in runs.values():  # warm-up: compiles
        run.epoch()
    times: dict[tuple, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved, so that load from other processes hits every run alike
        for key, run in runs.items():
            t0 = time.perf_counter()
            run.epoch()
            times[key].append((time.perf_counter() - t0) * 1e3 / steps)
    rows = []
    for replicas in (1, DEVICES):
        ours, native = (statistics.median(times[(replicas, impl)]) for impl in ("tlcore", "native"))
        rows.append({"backend": "jax", "replicas": replicas, "engine": f"sharded jit over {replicas} host device(s)",
                     "global_batch": BATCH, "steps": steps,
                     "tlcore_ms": round(ours, 3), "native_ms": round(native, 3), "ratio": round(ours / native, 3),
                     "tlcore_min_ms": round(min(times[(replicas, "tlcore")]), 3),
                     "native_min_ms": round(min(times[(replicas, "native")]), 3)})
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(_worker(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        print(json.dumps(measure(repeats=3, steps=8)))
