"""What does a tlcore JAX training step cost, and does a frozen backbone cost no more than a forward pass?

Workload: the benchmarks' small CNN (``workloads.WORKLOADS["cnn"]``: four 3x3 Conv-BN-ReLU blocks
32-64-128-256 without conv bias, 2x2 max pools between blocks, global average pool, linear head with
10 classes) built natively in Flax NNX as a ``tlcore_jax.NamedSequential`` with the zoo's layer
names, on 32x32x3 NHWC images, batch 64; cut before ``fc`` with a new ``Head.linear(10)``.
Optimizer as in ``workloads``: SGD, lr 0.01, momentum 0.9; clipping at global norm 1.0.

Modes, each through the primitive that ``fit``/``predict`` call per batch:

* ``full``: everything trains (``FreezePolicy.none()``), ``JaxTrainer.step``;
* ``frozen``: only the head trains (``FreezePolicy.all()``, frozen BatchNorm on running averages);
* ``frozen_clip``: the same with ``clip_grad_norm=1.0``;
* ``forward``: an inference forward pass of the whole model (``Model._forward``);
* ``naive_frozen_clip`` (for comparison, not tlcore): the common hand-written Optax recipe, the
  gradient of every parameter then ``optax.multi_transform`` with ``set_to_zero`` for the frozen
  ones, after ``clip_by_global_norm``, which keeps the frozen layers' backward pass alive.

Every step is synchronized (its loss read back), as a forward pass is (its output read back). A
repeat runs ``steps`` steps, and repeats of the modes are interleaved so that load from other
processes hits every mode alike; the JSON keeps the median, min and max ms/step over repeats and the
first call's time (tracing + XLA compilation). The frozen/forward ratios use medians.

Usage::

    .venv/bin/python benchmarks/jax_step.py            # writes benchmarks/results/jax_step.json
    .venv/bin/python benchmarks/jax_step.py --quick    # a few steps, only checks that it runs
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import tlcore as tl

BACKEND = tl.get_backend("jax")

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from tlcore_jax.layers import NamedSequential, Pool  # noqa: E402
from tlcore_jax.zoo import max_pool_2x2  # noqa: E402

from tlcore.optim import TrainSpec  # noqa: E402

from benchmarks.report import machine, write_json  # noqa: E402
from benchmarks.workloads import CLIP, LR  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "jax_step.json"
MODES = ("full", "frozen", "frozen_clip", "forward", "naive_frozen_clip")
BATCH, CLASSES = 64, 10
WIDTHS = (32, 64, 128, 256)


def small_cnn(seed: int = 0) -> NamedSequential:
    """The benchmarks' small CNN in NNX, with the zoo's layer names (conv0, bn0, relu0, mp0, ...)."""
    rngs = nnx.Rngs(params=seed)
    layers, cin = [], 3
    for i, width in enumerate(WIDTHS):
        if i:
            layers.append((f"mp{i - 1}", max_pool_2x2))
        layers += [(f"conv{i}", nnx.Conv(cin, width, (3, 3), padding="SAME", use_bias=False, rngs=rngs)),
                   (f"bn{i}", nnx.BatchNorm(width, momentum=0.9, rngs=rngs)), (f"relu{i}", nnx.relu)]
        cin = width
    layers += [("pool", Pool("avg")), ("fc", nnx.Linear(cin, CLASSES, rngs=rngs))]
    return NamedSequential(layers)


def finetuned(mode: str) -> tl.Model:
    freeze = tl.FreezePolicy.none() if mode == "full" else tl.FreezePolicy.all()
    return tl.finetune(tl.wrap(small_cnn(), input_shape=(32, 32, 3)), cut=tl.LayerCut(drop_last=1),
                       head=tl.Head.linear(CLASSES), freeze=freeze)


def batches(steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * steps, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=BATCH * steps).astype(np.int64)
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]


def naive_step(model: tl.Model):
    """The hand-written recipe that wastes the backward pass: grad of all, zero the frozen part."""
    graphdef, params, rest = nnx.split(model.native, nnx.Param, ...)
    head = model.head
    labels = jax.tree_util.tree_map_with_path(lambda p, _: "train" if p[0].key == head else "freeze", params)
    tx = optax.chain(optax.clip_by_global_norm(CLIP),
                     optax.multi_transform({"train": optax.sgd(LR, momentum=0.9), "freeze": optax.set_to_zero()},
                                           labels))
    state = {"params": params, "opt": tx.init(params)}

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            m = nnx.view(m, use_running_average=True)  # every BatchNorm frozen, like tlcore's
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def one(x: np.ndarray, y: np.ndarray) -> float:
        state["params"], state["opt"], loss = step(state["params"], state["opt"], x, y.astype(np.int32))
        return float(loss)

    return one


def runner(mode: str) -> tuple[Callable[[np.ndarray, np.ndarray], object], dict]:
    """A function running one batch in ``mode``, and facts about it."""
    model = finetuned("full" if mode == "full" else "frozen")
    if mode == "forward":
        return (lambda x, y: model._forward(x)), {}
    if mode == "naive_frozen_clip":
        return naive_step(model), {}
    trainer = model._make_trainer(TrainSpec(tl.optim.SGD(lr=LR, momentum=0.9), tl.losses.CrossEntropy(),
                                            CLIP if mode == "frozen_clip" else None, 0))
    facts = {"trainer": trainer}
    return (lambda x, y: trainer.step(x, y)), facts  # numpy outputs: the step has finished


def measure(repeats: int, steps: int) -> dict[str, dict]:
    """ms/step of every mode; repeats are interleaved across modes (mode A, B, C, A, B, C, ...) so
    that load from other processes affects every mode alike."""
    data = batches(steps)
    runners, results = {}, {}
    for mode in MODES:
        one, facts = runners[mode] = runner(mode)
        t0 = time.perf_counter()
        one(*data[0])
        results[mode] = {"first_call_s": time.perf_counter() - t0}
        for xb, yb in data:  # warm-up
            one(xb, yb)
    ms: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode, (one, _) in runners.items():
            t0 = time.perf_counter()
            for xb, yb in data:
                one(xb, yb)
            ms[mode].append(1e3 * (time.perf_counter() - t0) / steps)
    for mode, (_, facts) in runners.items():
        r = results[mode]
        r.update(median_ms=statistics.median(ms[mode]), min_ms=min(ms[mode]), max_ms=max(ms[mode]),
                 repeats=repeats, steps=steps)
        if "trainer" in facts:
            r.update(compilations=facts["trainer"].compilations,
                     optimizer_state_bytes=facts["trainer"].optimizer_state_bytes())
    return results


def table(results: dict, ratios: dict) -> str:
    lines = [f"{'mode':18s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'x forward':>10s} {'first call s':>13s}"]
    fwd = results["forward"]["median_ms"]
    for mode, r in results.items():
        lines.append(f"{mode:18s} {r['median_ms']:10.2f} {r['min_ms']:8.2f} {r['max_ms']:8.2f} "
                     f"{r['median_ms'] / fwd:10.2f} {r['first_call_s']:13.2f}")
    lines.append("frozen step / forward: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
                 + " (target <= 1.2x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per mode: checks that it runs")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats, steps = (1, 2) if args.quick else (args.repeats, args.steps)
    results = measure(repeats, steps)
    fwd = results["forward"]["median_ms"]
    ratios = {m: results[m]["median_ms"] / fwd for m in ("frozen", "frozen_clip")}
    report = {"workload": {"model": "small_cnn (4 Conv-BN-ReLU blocks 32-64-128-256, 2x2 max pools)",
                           "input": [32, 32, 3], "batch": BATCH, "optimizer": f"SGD(lr={LR}, momentum=0.9)",
                           "clip_grad_norm": CLIP},
              "machine": machine(BACKEND.versions()),
              "quick": args.quick, "results": results, "frozen_over_forward": ratios,
              "target_frozen_over_forward": 1.2}
    print(table(results, ratios))
    if not args.quick:
        write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
