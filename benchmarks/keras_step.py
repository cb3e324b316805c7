"""Which Keras training step is fastest here? ``fit`` vs ``train_on_batch`` vs a ``tf.function`` step,
with and without XLA, measured on the same model, data, optimizer and loss.

Workloads:

* ``reference``: the conformance suite's reference net (``conv1..relu2``, 8x8x3) with the suite's
  MLP head (8 hidden units, dropout 0.1, 3 classes), batch 16;
* ``small_cnn``: the cross-framework benchmark's ``cnn`` workload (``benchmarks/workloads.py``): the
  zoo's ``small_cnn``, four 3x3 Conv-BN-ReLU blocks 32-64-128-256 with 2x2 max pools between,
  global average pool, a new linear head with 10 classes, on 32x32x3 images, batch 64.

Each in two modes: ``full`` (everything trains) and ``frozen`` (only the head trains, frozen
BatchNorm in inference mode). Paths, each with tlcore's Adam (PyTorch's rule, see
``tlcore_keras/train.py``) and sparse categorical cross-entropy on logits:

* ``fit``: ``model.compile(..., jit_compile=False)`` then ``model.fit`` (one epoch = one repeat);
* ``fit_xla``: the same with ``jit_compile=True``;
* ``train_on_batch``: ``model.train_on_batch`` per batch, loss read back each step;
* ``tf_function``: a hand-written ``tf.function`` step (GradientTape, optimizer.apply), loss read back;
* ``tf_function_xla``: the same with ``jit_compile=True``;
* ``tlcore``: ``KerasTrainer.step``, the path ``fit`` uses, to check it costs what its kind costs.

A repeat runs ``steps`` training steps; ms/step is the repeat's time / steps; the JSON keeps the
median, min and max over repeats, and the first call's time (tracing/compilation).

Usage::

    .venv/bin/python -m benchmarks.keras_step            # writes benchmarks/results/keras_step.json
    .venv/bin/python -m benchmarks.keras_step --quick    # a few steps, only checks that it runs
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tlcore as tl  # noqa: E402
from benchmarks import workloads  # noqa: E402
from tlcore.testing import example_shape  # noqa: E402

BACKEND = tl.get_backend("keras")  # sets KERAS_BACKEND=tensorflow before Keras is imported

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from tlcore_keras.train import Adam  # noqa: E402

from tlcore.optim import TrainSpec  # noqa: E402

from benchmarks.report import machine, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "keras_step.json"
PATHS = ("fit", "fit_xla", "train_on_batch", "tf_function", "tf_function_xla", "tlcore")


def workload(name: str, mode: str) -> tuple[tl.Model, int, int]:
    """(tlcore model, batch size, number of classes) for a workload and freeze mode."""
    freeze = tl.FreezePolicy.all() if mode == "frozen" else tl.FreezePolicy.none()
    if name == "reference":
        return tl.finetune(BACKEND.reference_model(0), cut=tl.LayerCut(at="relu2"),
                           head=tl.Head.mlp(hidden=(8,), num_classes=3, dropout=0.1), freeze=freeze), 16, 3
    return workloads.build("cnn", "keras", mode), workloads.WORKLOADS["cnn"].batch, 10


def data(model: tl.Model, batch: int, classes: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, *example_shape(model))).astype(np.float32)
    return x, rng.integers(0, classes, size=batch * steps).astype(np.int64)


def prepare(path: str, name: str, mode: str, steps: int):
    """Build the workload for ``path`` and return ``(first_call_seconds, run_repeat)``."""
    model, batch, classes = workload(name, mode)
    native = model.native
    x, y = data(model, batch, classes, steps)
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
    spec = TrainSpec(tl.optim.Adam(lr=1e-3), tl.losses.CrossEntropy(), None, 0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    if path in ("fit", "fit_xla"):
        native.compile(optimizer=Adam(spec.optimizer), loss=loss, jit_compile=path == "fit_xla")

        def run_repeat():
            native.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)

        t0 = time.perf_counter()
        native.fit(x[:batch], y[:batch], batch_size=batch, epochs=1, verbose=0)
        first = time.perf_counter() - t0
    else:
        if path == "train_on_batch":
            native.compile(optimizer=Adam(spec.optimizer), loss=loss, jit_compile=False)

            def one(xb, yb):
                return float(native.train_on_batch(xb, yb))
        elif path == "tlcore":
            trainer = model._make_trainer(spec)

            def one(xb, yb):
                return trainer.step(xb, yb)  # numpy outputs: the step has finished
        else:
            variables = model.trainable_variables()
            opt = Adam(spec.optimizer)
            opt.build(variables)

            @tf.function(jit_compile=path == "tf_function_xla",
                         input_signature=[tf.TensorSpec((None, *x.shape[1:]), tf.float32),
                                          tf.TensorSpec((None,), tf.int64)])
            def train_step(xb, yb):
                with tf.GradientTape() as tape:
                    value = loss(yb, native(xb, training=True))
                opt.apply(tape.gradient(value, variables), variables)
                return value

            def one(xb, yb):
                return float(train_step(xb, yb))

        def run_repeat():
            for xb, yb in batches:
                one(xb, yb)

        t0 = time.perf_counter()
        one(*batches[0])
        first = time.perf_counter() - t0
    run_repeat()  # warm-up: lazy state must not count
    return first, run_repeat


def measure(name: str, mode: str, repeats: int, steps: int) -> dict:
    """Every path on one workload; repeats are interleaved across paths, so that a change in the
    machine's load hits every path alike. ms/step statistics and first-call seconds per path."""
    runs = {path: prepare(path, name, mode, steps) for path in PATHS}
    ms: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(repeats):
        for path, (_, run_repeat) in runs.items():
            t0 = time.perf_counter()
            run_repeat()
            ms[path].append(1e3 * (time.perf_counter() - t0) / steps)
    return {path: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "repeats": repeats,
                   "steps": steps, "first_call_s": runs[path][0]} for path, v in ms.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per path: checks that it runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    plan = {"reference": (7, 100), "small_cnn": (7, 10)}
    if args.quick:
        plan = {"reference": (1, 2), "small_cnn": (1, 1)}
    results = {}
    for name, (repeats, steps) in plan.items():
        for mode in ("full", "frozen"):
            results.setdefault(name, {})[mode] = measured = measure(name, mode, repeats, steps)
            for path, r in measured.items():
                print(f"{name:10s} {mode:6s} {path:16s} {r['median_ms']:8.2f} ms/step "
                      f"(min {r['min_ms']:.2f}, max {r['max_ms']:.2f}; first call {r['first_call_s']:.2f} s)",
                      flush=True)
    report = {"machine": machine(BACKEND.versions()),
              "quick": args.quick, "results": results}
    if not args.quick:
        write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
