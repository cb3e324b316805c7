r"""LoRA fine-tuning against each framework's own LoRA: ms per training step and optimizer-state bytes
of tlcore's ``Adapter.lora`` vs a hand-written loop, and of a full and a head-only fine-tune (issue #18).

    python -m benchmarks.lora                       # every installed backend, the zoo's default vit_tiny
    python -m benchmarks.lora --backends torch --repeats 3 --steps 4
    python -m benchmarks.lora --quick               # a tiny run (2 blocks, 1 repeat, 2 steps): checks it runs

Workload: ``tl.zoo.create("vit_tiny", backend=b)`` in its default config (dim 192, depth 12, heads 3,
32x32x3 images, patch 4), cut before ``fc`` (``LayerCut(drop_last=1)``) with a new ``Head.linear(5)``;
batch 32 of random float32 images and labels in 0..4; AdamW (lr 1e-3, weight decay 0.01, betas
0.9/0.999, eps 1e-8), no clipping, no shuffling, cross-entropy on logits. Modes:

* ``lora``: ``Adapter.lora(rank=8, alpha=16, targets=r"attn\.(qkv|proj)|mlp\.fc\d")``: the base is
  frozen (biases too), the adapters and the head train;
* ``full``: ``FreezePolicy.none()``, everything trains;
* ``frozen_head``: ``FreezePolicy.all()``, only the head trains; ``cache_features=False``, so that it is
  a per-step comparison (with the cache tlcore would run the base once per epoch, not per step).

tlcore runs ``fit(x, y, epochs=1, batch_size=32, ...)``; the native side is a plain loop over the same
batches, on the same network as tlcore builds without an adapter (``tl.finetune(base, cut, head,
freeze=FreezePolicy.none()).native``: the zoo's own module with the new head), with the framework's own
LoRA for ``lora``:

* torch: Hugging Face PEFT, ``get_peft_model(net, LoraConfig(r=8, lora_alpha=16, target_modules=["qkv",
  "proj", "fc1", "fc2"], modules_to_save=["head"]))``, eager ``torch.optim.AdamW`` (foreach) over the
  parameters that require grad; full / frozen_head: ``requires_grad`` set by hand;
* keras: ``Dense.enable_lora(8, lora_alpha=16)`` on every block's ``qkv``, ``proj``, ``fc1``, ``fc2``,
  a ``tf.function`` step (``GradientTape``, ``optimizer.apply``: the faster of Keras' paths in
  ``benchmarks/keras_step.py``) and ``keras.optimizers.AdamW`` over the adapters' ``lora_kernel_a`` /
  ``lora_kernel_b`` and the head (every other variable ``trainable=False``). Keras' LoRA adds
  ``scale * A @ B`` to the kernel on every call (it merges, where PEFT computes ``x @ A.T @ B.T``
  beside the layer), and Keras' Adam adds ``epsilon`` before the bias correction (as
  ``benchmarks/native/keras_loop.py`` notes): the same training up to those roundings;
* jax: Flax NNX's ``nnx.LoRA`` (``nnx.LoRAParam``) next to each target ``CanonicalLinear``, the output
  ``base(x) + (alpha / rank) * lora(x)`` (``nnx.LoRA`` has no alpha of its own), a pure step under
  ``jax.jit`` on ``nnx.split`` state as ``benchmarks/native/jax_loop.py``, ``optax.adamw`` over the
  ``nnx.LoRAParam``\s and the head's ``nnx.Param``\s (or the params that train).

The adapters' A starts uniform in +-1/sqrt(in) on every side (PEFT's default; Keras' and NNX's own
default is He-uniform), B at zero, so both sides start from the same outputs: ``first_loss`` (the first
batch's loss, before any update) should agree per row; the head's initial weights are the same on both
sides (the same ``seed``).

Timing as ``benchmarks/worker.py``: each side first runs one batch (compiling; ``first_step_ms``) and
one untimed warm-up epoch; then each repeat times an epoch of ``--steps`` batches of every mode, tlcore
and native back to back in alternating order, garbage collected first and the collector off
(``worker.timed``); ms/step is the median over repeats; the ratio tlcore/native is the median of the
per-repeat ratios (``report.ratio``). Optimizer state: tlcore's ``History.info["optimizer_state_bytes"]``;
native: the sum of ``torch.optim`` state tensors' ``nbytes`` / of the Optax state's leaves' ``nbytes``
/ of the Keras optimizer's ``variables`` (which include its ``iterations`` and ``learning_rate``).
Each backend runs in its own process. Writes ``lora.json`` and ``lora.md`` under ``--out``. A side
that cannot be built or run is reported as such (``native_error`` / ``tlcore_error``), not measured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("lora", "full", "frozen_head")
RANK, ALPHA = 8, 16
TARGETS = r"attn\.(qkv|proj)|mlp\.fc\d"
TARGET_LAYERS = ("qkv", "proj", "fc1", "fc2")  # what TARGETS selects in every block, by layer name
CLASSES, BATCH = 5, 32
LR, WEIGHT_DECAY, BETAS, EPS = 1e-3, 0.01, (0.9, 0.999), 1e-8
#: --quick: a 2-block vit_tiny (everything else as the default config)
QUICK_CONFIG = {"depth": 2}


# ---------------------------------------------------------------------------------------------------
# the models


def base(backend: str, config: dict):
    import tlcore as tl

    return tl.zoo.create("vit_tiny", backend=backend, seed=0, **config)


def tlcore_model(backend: str, mode: str, config: dict):
    import tlcore as tl

    kw: dict[str, Any] = dict(cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(CLASSES), seed=0)
    if mode == "lora":
        kw["adapter"] = tl.Adapter.lora(rank=RANK, alpha=ALPHA, targets=TARGETS)
    else:
        kw["freeze"] = tl.FreezePolicy.none() if mode == "full" else tl.FreezePolicy.all()
    return tl.finetune(base(backend, config), **kw)


def plain_model(backend: str, config: dict):
    """The network the native side trains: the zoo's vit_tiny cut before ``fc`` with the same new head
    as tlcore's (same seed), nothing frozen, no adapter; the loops freeze and adapt it themselves."""
    import tlcore as tl

    return tl.finetune(base(backend, config), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(CLASSES),
                       freeze=tl.FreezePolicy.none(), seed=0)


def fit_kwargs() -> dict:
    import tlcore as tl

    return dict(epochs=1, batch_size=BATCH, optimizer=tl.optim.AdamW(lr=LR, betas=BETAS, eps=EPS,
                                                                      weight_decay=WEIGHT_DECAY),
                shuffle=False, progress=False, cache_features=False, clip_grad_norm=None)


# ---------------------------------------------------------------------------------------------------
# the hand-written loops, one per framework: train_epoch(x, y, batch) -> last loss,
# optimizer_state_bytes(), trainable_params; `impl` says what they use


class TorchNative:
    def __init__(self, plain, mode: str):
        import torch

        net, head = plain.native, plain.head
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            self.impl = "PEFT LoRA + torch.optim.AdamW"
            net = get_peft_model(net, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGET_LAYERS),
                                                 modules_to_save=[head]))
        else:
            self.impl = "torch.optim.AdamW"
            for name, p in net.named_parameters():
                p.requires_grad_(mode == "full" or name.startswith(head + "."))
        self.net = net
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                     foreach=True)

    def train_epoch(self, x: np.ndarray, y: np.ndarray, batch: int) -> float:
        import torch
        from torch.nn import functional as F

        self.net.train()
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(x[i:i + batch]).permute(0, 3, 1, 2)  # NHWC -> the module's NCHW
            loss = F.cross_entropy(self.net(xb), torch.from_numpy(y[i:i + batch]))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return float(loss.detach())

    def optimizer_state_bytes(self) -> int:
        import torch

        return sum(v.nbytes for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v))


class KerasNative:
    def __init__(self, plain, mode: str):
        import keras
        import tensorflow as tf

        net = plain.native
        head = net.get_layer(plain.head)
        if mode == "lora":
            self.impl = "keras Dense.enable_lora + keras AdamW, tf.function step"
            variables = []
            for block in net.get_layer("blocks").layers:
                for dense in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                    dense.enable_lora(RANK, lora_alpha=ALPHA,
                                      a_initializer=keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"))
                    variables += [dense.lora_kernel_a, dense.lora_kernel_b]
            variables += list(head.trainable_variables)
        else:
            self.impl = "keras AdamW, tf.function step"
            for layer in net.layers:
                layer.trainable = mode == "full" or layer is head
            variables = list(net.trainable_variables)
        trained = {id(v) for v in variables}
        for v in net.weights:  # the rest frozen (the Dense biases too, as PEFT's and tlcore's LoRA)
            v.trainable = id(v) in trained
        self.net, self.variables = net, variables
        self.trainable_params = int(sum(np.prod(v.shape) for v in variables))
        self.opt = keras.optimizers.AdamW(LR, weight_decay=WEIGHT_DECAY, beta_1=BETAS[0], beta_2=BETAS[1],
                                          epsilon=EPS)
        self.opt.build(variables)
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        spec = tf.TensorSpec((None, *net.inputs[0].shape[1:]), tf.float32)
        self._step = tf.function(self._train_step, input_signature=[spec, tf.TensorSpec((None,), tf.int64)])

    def _train_step(self, x, y):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = self.loss(y, self.net(x, training=True))
        self.opt.apply(tape.gradient(loss, self.variables), self.variables)
        return loss

    def train_epoch(self, x: np.ndarray, y: np.ndarray, batch: int) -> float:
        for i in range(0, len(x), batch):
            loss = self._step(x[i:i + batch], y[i:i + batch])
        return float(loss)

    def optimizer_state_bytes(self) -> int:
        return int(sum(np.prod(v.shape, dtype=np.int64) * np.dtype(v.dtype).itemsize for v in self.opt.variables))


class JaxNative:
    def __init__(self, plain, mode: str):
        import jax
        import optax
        from flax import nnx

        from benchmarks.native.jax_loop import functional_step

        class ScaledLoRA(nnx.Module):
            """A layer and an ``nnx.LoRA`` beside it: ``base(x) + scale * lora(x)``."""

            def __init__(self, base_layer, lora, scale: float):
                self.base_layer, self.lora, self.scale = base_layer, lora, scale

            def __call__(self, x):
                return self.base_layer(x) + self.scale * self.lora(x)

        net, head = plain.native, plain.head
        if mode == "lora":
            self.impl = "nnx.LoRA + optax.adamw, jax.jit step"
            rngs = nnx.Rngs(params=0)
            a_init = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
            for block in net.blocks.layers:
                for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")):
                    layer = getattr(parent, name)
                    lora = nnx.LoRA(layer.in_features, RANK, layer.out_features, a_initializer=a_init, rngs=rngs)
                    setattr(parent, name, ScaledLoRA(layer, lora, ALPHA / RANK))

            def trainable(path, value) -> bool:
                return isinstance(value, nnx.LoRAParam) or (isinstance(value, nnx.Param) and path[0] == head)
        else:
            self.impl = "optax.adamw, jax.jit step"

            def trainable(path, value) -> bool:
                return isinstance(value, nnx.Param) and (mode == "full" or path[0] == head)

        graphdef, self.params, self.rest = nnx.split(net, trainable, ...)
        self.trainable_params = int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(self.params)))
        self.tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
        self.opt_state = self.tx.init(self.params)
        self._step = jax.jit(functional_step(graphdef, self.tx, trainable))

    def train_epoch(self, x: np.ndarray, y: np.ndarray, batch: int) -> float:
        y = y.astype(np.int32)
        for i in range(0, len(x), batch):
            self.params, self.rest, self.opt_state, loss = self._step(self.params, self.rest, self.opt_state,
                                                                      x[i:i + batch], y[i:i + batch])
        return float(loss)

    def optimizer_state_bytes(self) -> int:
        import jax

        return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(self.opt_state)))


NATIVE = {"torch": TorchNative, "keras": KerasNative, "jax": JaxNative}


# ---------------------------------------------------------------------------------------------------
# one backend, in this process


def error_text(e: BaseException) -> str:
    """The exception in one line (TensorFlow's say "in user code:" first and the cause last)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]


def prepare(backend: str, mode: str, config: dict, x: np.ndarray, y: np.ndarray) -> dict:
    """tlcore's and the native side of ``mode``, each after its first (compiling) batch and a warm-up
    epoch: ``{"tlcore": Side | error str, "native": Side | error str, "facts": {...}}``."""
    from .worker import Side, timed

    out: dict[str, Any] = {"facts": {}}
    facts = out["facts"]
    try:
        ours = tlcore_model(backend, mode, config)
        kw, hist = fit_kwargs(), {}
        first = 1000 * timed(lambda: hist.update(h=ours.fit(x[:BATCH], y[:BATCH], **kw)))
        facts["tlcore_first_loss"] = hist["h"]["loss"][0]
        ours.fit(x, y, **kw)  # warm-up
        facts["tlcore_trainable_params"] = ours.count_params()[0]
        out["tlcore"] = Side(lambda: hist.update(h=ours.fit(x, y, **kw)), first,
                             lambda: hist["h"].info["optimizer_state_bytes"])
    except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
        traceback.print_exc()
        out["tlcore"] = error_text(e)
    try:
        theirs = NATIVE[backend](plain_model(backend, config), mode)
        loss = {}
        first = 1000 * timed(lambda: loss.update(v=theirs.train_epoch(x[:BATCH], y[:BATCH], BATCH)))
        facts["native_first_loss"] = loss["v"]
        theirs.train_epoch(x, y, BATCH)  # warm-up
        facts["native_trainable_params"] = theirs.trainable_params
        facts["native_impl"] = theirs.impl
        out["native"] = Side(lambda: theirs.train_epoch(x, y, BATCH), first, theirs.optimizer_state_bytes)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        out["native"] = error_text(e)
    return out


def measure(backend: str, config: dict, repeats: int, steps: int) -> list[dict]:
    from .report import ratio
    from .worker import Side, summary, timed

    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * steps, config["image_size"], config["image_size"], 3)).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCH * steps).astype(np.int64)
    sides = {mode: prepare(backend, mode, config, x, y) for mode in MODES}
    for r in range(repeats):
        for mode in MODES:
            for impl in ("tlcore", "native") if r % 2 == 0 else ("native", "tlcore"):
                side = sides[mode][impl]
                if isinstance(side, Side):
                    side.seconds.append(timed(side.run))
    rows = []
    for mode in MODES:
        row: dict[str, Any] = {"backend": backend, "mode": mode, "batch": BATCH, "steps": steps, "repeats": repeats,
                               **sides[mode]["facts"]}
        stats = {}
        for impl in ("tlcore", "native"):
            side = sides[mode][impl]
            if isinstance(side, str):
                row[f"{impl}_error"] = side
                continue
            stats[impl] = summary(side.seconds, steps)
            row[f"{impl}_ms"] = stats[impl]["median_ms"]
            row[f"{impl}_runs_ms"] = stats[impl]["runs_ms"]
            row[f"{impl}_first_step_ms"] = side.first_step_ms
            row[f"{impl}_optimizer_state_bytes"] = int(side.state_bytes())
        if len(stats) == 2:
            row["ratio"] = ratio(stats["tlcore"], stats["native"])
        rows.append(row)
    return rows


def worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora --worker")
    p.add_argument("--backend", required=True)
    p.add_argument("--config", required=True, help="vit_tiny config, JSON")
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    args = p.parse_args(argv)
    import tlcore as tl
    from tlcore.zoo.archs import config_for

    backend = tl.get_backend(args.backend)  # Keras: picks TensorFlow before Keras is imported
    config = config_for("vit_tiny", json.loads(args.config))
    rows = measure(args.backend, config, args.repeats, args.steps)
    versions = dict(backend.versions())
    if args.backend == "torch":
        import peft

        versions["peft"] = peft.__version__
    print(json.dumps({"backend": args.backend, "versions": versions, "config": config, "rows": rows}))


# ---------------------------------------------------------------------------------------------------
# the report


def cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get(key) is not None else "n/a"


def markdown(report: dict) -> str:
    cfg = report.get("config") or {}
    lines = [f"LoRA vs full vs head-only fine-tuning of vit_tiny (dim {cfg.get('dim')}, depth {cfg.get('depth')}, "
             f"{cfg.get('image_size')}x{cfg.get('image_size')} images, patch {cfg.get('patch_size')}), batch {BATCH}, "
             f"{CLASSES} classes, AdamW lr {LR:g} wd {WEIGHT_DECAY:g}; LoRA rank {RANK} alpha {ALPHA} on "
             "attn.qkv/proj and mlp.fc1/fc2. Median ms/step; ratio: median of per-repeat tlcore/native.", "",
             "| backend | mode | tlcore ms/step | native ms/step | tlcore/native | tlcore opt. state bytes | "
             "native opt. state bytes | trainable params | native |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for row in report["rows"]:
        params = cell(row, "tlcore_trainable_params", ",")
        if row.get("native_trainable_params") not in (None, row.get("tlcore_trainable_params")):
            params += f" (native {row['native_trainable_params']:,})"
        native = row.get("native_impl", "")
        for impl in ("tlcore", "native"):
            if f"{impl}_error" in row:
                notes.append(f"{row['backend']} {row['mode']} {impl}: not measured, {row[f'{impl}_error']}")
                if impl == "native":
                    native = "not measured (see below)"
        lines.append(f"| {row['backend']} | {row['mode']} | {cell(row, 'tlcore_ms', '.1f')} | "
                     f"{cell(row, 'native_ms', '.1f')} | {cell(row, 'ratio', '.2f')} | "
                     f"{cell(row, 'tlcore_optimizer_state_bytes', ',')} | "
                     f"{cell(row, 'native_optimizer_state_bytes', ',')} | "
                     f"{params} | {native} |")
    for backend, error in report.get("errors", {}).items():
        lines.append(f"| {backend} | all | n/a | n/a | n/a | n/a | n/a | n/a | worker failed (see below) |")
        notes.append(f"{backend}: the worker process failed: {error}")
    if notes:
        lines += ["", *(f"* {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return 0
    import tlcore as tl

    from .report import machine

    p = argparse.ArgumentParser(prog="python -m benchmarks.lora", description=__doc__.splitlines()[0])
    p.add_argument("--backends", default=",".join(tl.available_backends()))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=8, help="batches per timed epoch")
    p.add_argument("--depth", type=int, default=None, help="vit_tiny blocks (default: the zoo's, 12)")
    p.add_argument("--quick", action="store_true",
                   help="tiny run (2 blocks, 1 repeat, 2 steps) that only checks it runs")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    config = dict(QUICK_CONFIG) if args.quick else {}
    if args.depth is not None:
        config["depth"] = args.depth
    if args.quick:
        args.repeats, args.steps = 1, 2
    t0 = time.time()
    report: dict[str, Any] = {"machine": machine(), "settings": vars(args), "config": None, "backends": {},
                              "rows": [], "errors": {}}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for backend in args.backends.split(","):
        print(f"benchmarking LoRA on {backend} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "benchmarks.lora", "--worker", "--backend", backend, "--config",
               json.dumps(config), "--repeats", str(args.repeats), "--steps", str(args.steps)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            report["errors"][backend] = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        for line in done.stderr.splitlines():
            if "Error" in line and not line.startswith(" "):
                print(f"  {backend}: {line}", file=sys.stderr)
        report["config"] = result["config"]
        report["backends"][backend] = {"versions": result["versions"]}
        report["rows"] += result["rows"]
    report["seconds"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "lora.md").write_text(table)
    print(table)
    print(f"wrote {out / 'lora.json'} and lora.md in {report['seconds']:.0f} s", file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
