"""One backend's measurements, in its own process (so peak memory is that backend's alone).

    python -m benchmarks.worker --backend torch --workloads cnn --repeats 5 --steps 8

Prints one JSON object on stdout's last line.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import tlcore as tl
from tlcore.data import take

from .workloads import CLIP, LR, WORKLOADS, augmented_loader, build, data


def timed(fn) -> float:
    """Seconds ``fn()`` takes, collected garbage first and the collector off meanwhile (as timeit
    does), so that neither side pays for the other's garbage."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()


def summary(seconds: list[float], per: int) -> dict:
    ms = [1000 * s / per for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "runs_ms": ms}


def fit_kwargs(mode: str, batch: int, epochs: int = 1, cache: bool | str = False) -> dict:
    return dict(epochs=epochs, batch_size=batch, optimizer=tl.optim.SGD(lr=LR, momentum=0.9), shuffle=False,
                progress=False, cache_features=cache, clip_grad_norm=CLIP if mode == "frozen_clip" else None)


@dataclass
class Side:
    """One implementation (tlcore or the hand-written loop) of one mode, ready to time."""

    run: Callable[[], Any]
    first_step_ms: float
    state_bytes: Callable[[], int] | None = None
    seconds: list[float] = field(default_factory=list)


def native_model(backend: str, workload: str, mode: str, ours: tl.Model) -> tl.Model:
    """The model the hand-written loop runs, next to tlcore's ``ours``: on torch ``ours`` itself (the
    same ``nn.Module``, its parameters in the same memory; two identical hand-written loops on two
    instances of the cnn differed by up to 5% here, persistently, from where their tensors lie), on
    Keras and JAX, whose steps write new buffers every step, a model of its own."""
    return ours if backend == "torch" else build(workload, backend, mode)


def prepare(backend: str, native_cls, workload: str, mode: str, x: np.ndarray, y: np.ndarray) -> dict[str, Side]:
    """tlcore and the hand-written loop for ``mode`` (on the model :func:`native_model` says), after
    one first (compiling) step."""
    batch = WORKLOADS[workload].batch
    ours = build(workload, backend, mode)
    theirs = native_cls(native_model(backend, workload, mode, ours), "frozen" if mode == "forward" else mode)
    first = take(x, slice(0, batch))
    if mode == "forward":
        first_ours = timed(lambda: ours.predict(first, batch_size=batch))
        first_theirs = timed(lambda: theirs.forward(first, batch))
        return {"tlcore": Side(lambda: ours.predict(x, batch_size=batch), 1000 * first_ours),
                "native": Side(lambda: theirs.forward(x, batch), 1000 * first_theirs)}
    kw = fit_kwargs(mode, batch)
    hist = {}
    first_ours = timed(lambda: hist.update(h=ours.fit(first, y[:batch], **kw)))
    first_theirs = timed(lambda: theirs.train_epoch(first, y[:batch], batch))
    return {"tlcore": Side(lambda: hist.update(h=ours.fit(x, y, **kw)), 1000 * first_ours,
                           lambda: hist["h"].info["optimizer_state_bytes"]),
            "native": Side(lambda: theirs.train_epoch(x, y, batch), 1000 * first_theirs,
                           theirs.optimizer_state_bytes)}


def measure_modes(backend: str, native_cls, workload: str, repeats: int, steps: int) -> list[dict]:
    """ms per step of every mode, tlcore and native. Each repeat runs every mode once, tlcore and
    native back to back in alternating order (ABBA), so a slow spell of the machine hits both sides
    of a pair and the modes of one repeat alike; ``runs_ms[i]`` of every row is from repeat ``i``."""
    batch, modes = WORKLOADS[workload].batch, WORKLOADS[workload].modes
    x, y = data(build(workload, backend, "forward"), batch * steps)
    sides = {mode: prepare(backend, native_cls, workload, mode, x, y) for mode in modes}
    for r in range(repeats):
        for mode in modes:
            for impl in ("tlcore", "native") if r % 2 == 0 else ("native", "tlcore"):
                sides[mode][impl].seconds.append(timed(sides[mode][impl].run))
    rows = []
    for mode in modes:
        for impl, side in sides[mode].items():
            row = {"backend": backend, "workload": workload, "mode": mode, "impl": impl, "batch": batch,
                   "steps": steps, **summary(side.seconds, steps), "first_step_ms": side.first_step_ms}
            if side.state_bytes is not None:
                row["optimizer_state_bytes"] = side.state_bytes()
            rows.append(row)
    return rows


def e2e_run(backend: str, native_cls, workload: str, impl: str, steps: int, epochs: int) -> tuple[float, dict]:
    """Seconds of one frozen-backbone fine-tune of ``epochs`` epochs on a new model, set-up included:
    tlcore's ``fit`` (feature caching on by default) or the hand-written loop; and tlcore's
    ``History.info``."""
    batch = WORKLOADS[workload].batch
    model = build(workload, backend, "frozen")
    x, y = data(model, batch * steps)
    if impl == "tlcore":
        info = {}
        seconds = timed(lambda: info.update(model.fit(x, y, **fit_kwargs("frozen", batch, epochs, "auto")).info))
        return seconds, info

    def native_fine_tune():  # its set-up (optimizer, compiled step) counts, as fit's does
        theirs = native_cls(model, "frozen")
        for _ in range(epochs):
            theirs.train_epoch(x, y, batch)

    return timed(native_fine_tune), {}


def measure_e2e(backend: str, native_cls, workload: str, repeats: int, steps: int, epochs: int) -> list[dict]:
    """:func:`e2e_run` repeated, tlcore and native interleaved, each repeat on new models. The first
    repeat compiles what later models of the same structure reuse (tlcore's Keras and JAX backends
    share compiled functions across models); ``--fresh`` runs measure a new process instead."""
    times, info = {"tlcore": [], "native": []}, {}
    for _ in range(repeats):
        for impl in times:
            seconds, run_info = e2e_run(backend, native_cls, workload, impl, steps, epochs)
            times[impl].append(seconds)
            info.update(run_info)
    return [{"backend": backend, "workload": workload, "mode": f"e2e_{epochs}_epochs", "impl": impl,
             "batch": WORKLOADS[workload].batch, "steps": steps * epochs, **summary(times[impl], 1),
             "cache_features": info["cache_features"] if impl == "tlcore" else "off"} for impl in times]


def measure_streaming(backend: str, native_cls, workload: str, repeats: int, steps: int, epochs: int) -> list[dict]:
    """A frozen-backbone fine-tune fed by a torch DataLoader with a random flip (so nothing can be
    cached): one epoch per run, tlcore's ``fit(loader)`` (reading ahead in a thread) against the
    hand-written loop iterating the same loader, paired by repeat; and tlcore's in-memory epoch on the
    same arrays (no augmentation, no caching), to see what loading costs once overlapped. Plus one
    ``epochs``-epoch fine-tune of each side."""
    batch = WORKLOADS[workload].batch
    x, y = data(build(workload, backend, "frozen"), batch * steps)
    ours = build(workload, backend, "frozen")
    theirs = native_cls(native_model(backend, workload, "frozen", ours), "frozen")
    kw = dict(epochs=1, optimizer=tl.optim.SGD(lr=LR, momentum=0.9), progress=False)
    runs = {"stream": {"tlcore": lambda: ours.fit(augmented_loader(x, y, batch), **kw),
                       "native": lambda: theirs.train_loader(augmented_loader(x, y, batch))},
            "stream_in_memory": {"tlcore": lambda: ours.fit(x, y, batch_size=batch, shuffle=False,
                                                            cache_features=False, **kw),
                                 "native": lambda: theirs.train_epoch(x, y, batch)}}
    for mode in runs.values():
        for run in mode.values():
            run()  # the first (compiling) run is not timed
    times = {(m, i): [] for m in runs for i in ("tlcore", "native")}
    for r in range(repeats):
        for mode in runs:
            for impl in ("tlcore", "native") if r % 2 == 0 else ("native", "tlcore"):
                times[mode, impl].append(timed(runs[mode][impl]))
    rows = [{"backend": backend, "workload": workload, "mode": mode, "impl": impl, "batch": batch, "steps": steps,
             **summary(seconds, steps)} for (mode, impl), seconds in times.items()]
    full = {"tlcore": lambda: build(workload, backend, "frozen").fit(augmented_loader(x, y, batch),
                                                                     **{**kw, "epochs": epochs}),
            "native": lambda: [native_cls(build(workload, backend, "frozen"), "frozen").train_loader(
                augmented_loader(x, y, batch)) for _ in range(epochs)]}
    for impl, run in full.items():
        rows.append({"backend": backend, "workload": workload, "mode": f"stream_e2e_{epochs}_epochs", "impl": impl,
                     "batch": batch, "steps": steps * epochs, **summary([timed(run)], 1)})
    return rows


def recipe_optimizer(model: tl.Model, total: int) -> tl.optim.OptimizerSpec:
    """Cosine with warmup, layer decay 0.75 over the model's blocks, AdamW without decay on 1-d tensors."""
    return tl.optim.AdamW(lr=tl.schedules.Cosine(peak_lr=LR, total_steps=total, warmup_steps=2), weight_decay=0.05,
                          lr_mult=tl.LayerDecay(0.75, tl.LayerGroups.auto(model)), no_decay="1d")


def measure_recipe(backend: str, workload: str, repeats: int, steps: int, native_recipe=None) -> dict:
    """A fine-tuning recipe's cost: ms/step of an epoch with everything trainable under cosine +
    layer decay + no_decay (AdamW), against the same epoch with one plain AdamW rate (the overhead of
    per-parameter rates and a rate per step) and, where written, a hand-written loop doing the recipe;
    and a 3-stage UnfreezeSchedule fit on two new models: its seconds and compilations (a process
    compiles each stage's step once: the second model compiles nothing)."""
    batch = WORKLOADS[workload].batch
    x, y = data(build(workload, backend, "full"), batch * steps)
    total = steps * (repeats + 2)
    recipe, plain = build(workload, backend, "full"), build(workload, backend, "full")
    kw = dict(epochs=1, batch_size=batch, shuffle=False, progress=False, cache_features=False)
    runs = {"recipe": lambda: recipe.fit(x, y, optimizer=recipe_optimizer(recipe, total), **kw),
            "plain": lambda: plain.fit(x, y, optimizer=tl.optim.AdamW(lr=LR, weight_decay=0.05), **kw)}
    if native_recipe is not None:
        theirs = native_recipe(native_model(backend, workload, "full", recipe), total)
        runs["native"] = lambda: theirs.train_epoch(x, y, batch)
    for run in runs.values():
        run()
    times = {k: [] for k in runs}
    for r in range(repeats):
        for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            times[k].append(timed(runs[k]))
    out = {"backend": backend, "workload": workload, **{f"{k}_ms": summary(v, steps) for k, v in times.items()}}
    plan = tl.UnfreezeSchedule([(0, tl.FreezePolicy.all()), (1, tl.FreezePolicy.up_to(-6)), (2, tl.FreezePolicy.none())])
    staged = []
    for _ in range(2):
        model = build(workload, backend, "frozen")
        info = {}
        seconds = timed(lambda: info.update(model.fit(x, y, optimizer=recipe_optimizer(model, 3 * steps), freeze=plan,
                                                      **{**kw, "epochs": 3, "cache_features": "auto"}).info))
        staged.append({"seconds": seconds, "compilations": info["compilations"], "cache_features": info["cache_features"]})
    out["staged"] = staged
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", required=True)
    p.add_argument("--workloads", default="cnn")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--streaming", action="store_true", help="only the DataLoader fine-tune (measure_streaming)")
    p.add_argument("--recipe", action="store_true", help="only the recipe fine-tune (measure_recipe)")
    p.add_argument("--fresh", choices=("tlcore", "native"),
                   help="only time one end-to-end run of this side, in this new process (with its compiling)")
    args = p.parse_args(argv)
    native_cls = importlib.import_module(f"benchmarks.native.{args.backend}_loop").Native
    tl.get_backend(args.backend)
    if args.fresh:
        seconds, _ = e2e_run(args.backend, native_cls, args.workloads, args.fresh, args.steps, args.epochs)
        out = {"fresh_process_ms": 1000 * seconds}
        print(json.dumps(out))
        return out
    if args.recipe:
        native_recipe = getattr(importlib.import_module(f"benchmarks.native.{args.backend}_loop"), "NativeRecipe", None)
        out = {"recipe": measure_recipe(args.backend, args.workloads.split(",")[0], args.repeats, args.steps,
                                        native_recipe)}
        print(json.dumps(out))
        return out
    rows = []
    if args.streaming:
        rows = measure_streaming(args.backend, native_cls, args.workloads.split(",")[0], args.repeats, args.steps,
                                 args.epochs)
    for workload in [] if args.streaming else args.workloads.split(","):
        if WORKLOADS[workload].backends is not None and args.backend not in WORKLOADS[workload].backends:
            continue
        rows += measure_modes(args.backend, native_cls, workload, args.repeats, args.steps)
        # fewer end-to-end repeats: each is 10 epochs on both sides, and its speed-up is far from 1
        rows += measure_e2e(args.backend, native_cls, workload, min(7, max(1, args.repeats // 2)), args.steps,
                            args.epochs)
    out = {"backend": args.backend, "versions": tl.get_backend(args.backend).versions(), "rows": rows,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
