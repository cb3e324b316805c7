"""The transfer-learning story on real data: digits 0-4 -> digits 5-9, on any backend.

A ``small_cnn`` pretrained on digits 0-4 (shipped weights) is cut before its classifier, frozen, given a
new head and fine-tuned on a few labelled images per class of digits 5-9; it is compared with full
fine-tuning and with the same architecture trained from scratch on the same labels.

Example:
    >>> from tlcore.demo import run_demo
    >>> report = run_demo(["torch"], shots=10, epochs=30, seed=0, out=None, curve=False)   # doctest: +SKIP
    >>> report["results"][0]["strategy"]                                                   # doctest: +SKIP
    'frozen fine-tune'
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import tlcore as tl

from .datasets import digits, few_shot

STRATEGIES = ("frozen fine-tune", "full fine-tune", "from scratch")
CURVE_SHOTS = (1, 5, 10, 20)
SOURCE, TARGET = tuple(range(5)), tuple(range(5, 10))


def build(strategy: str, backend: str, seed: int) -> tl.Model:
    """The model a strategy trains: pretrained and cut (frozen or not), or a fresh network."""
    if strategy == "from scratch":
        _, config, _ = tl.zoo.PRETRAINED["small_cnn"]["digits04"]
        base = tl.zoo.create("small_cnn", backend=backend, seed=seed + 1000, **config)
    else:
        base = tl.zoo.create("small_cnn", backend=backend, pretrained="digits04")
    freeze = tl.FreezePolicy.all() if strategy == "frozen fine-tune" else tl.FreezePolicy.none()
    return tl.finetune(base, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(num_classes=5),
                       freeze=freeze, seed=seed)


def run_one(strategy: str, backend: str, data, shots: int, epochs: int, seed: int,
            progress: bool = False) -> dict[str, Any]:
    """Train one strategy on ``shots`` images per class; test accuracy, counts, time, freeze check."""
    (x, y), (xt, yt) = data
    xs, ys = few_shot(x, y, shots, seed=seed)
    t0 = time.perf_counter()
    model = build(strategy, backend, seed)
    snap = tl.snapshot(model)
    lr = 1e-2 if strategy == "frozen fine-tune" else 3e-3
    hist = model.fit(xs, ys, epochs=epochs, batch_size=16, optimizer=tl.optim.Adam(lr=lr), seed=seed,
                     progress=progress)
    frozen_checked = tl.assert_frozen(snap, model)  # raises FrozenWeightsChanged if anything moved
    trainable, total = model.count_params()
    return {"backend": backend, "strategy": strategy, "shots": shots, "seed": seed, "epochs": epochs,
            "test_accuracy": model.evaluate(xt, yt)["accuracy"], "trainable_params": trainable,
            "total_params": total, "frozen_tensors_checked": len(frozen_checked), "frozen_check": "passed",
            "cache_features": hist.info.get("cache_features"), "seconds": time.perf_counter() - t0}


def run_demo(backends: list[str], shots: int = 10, epochs: int = 30, seed: int = 0, out: str | Path | None = "demo-out",
             curve: bool = True, echo=print) -> dict[str, Any]:
    """Run the demo on ``backends``; write ``report.json`` and ``accuracy_vs_shots.png`` to ``out``."""
    data = digits(classes=TARGET, seed=seed)
    few_shot(*data[0], shots, seed=seed, class_names=TARGET)  # refuse impossible shot counts before training
    results, curve_rows = [], []
    for backend in backends:
        pretrained = tl.zoo.create("small_cnn", backend=backend, pretrained="digits04")
        echo(f"\n== {backend}: small_cnn pretrained on digits 0-4 ==")
        echo(str(pretrained.summary()))
        src = digits(classes=SOURCE, seed=0)[1]
        echo(f"source task (digits 0-4) test accuracy: {pretrained.evaluate(*src)['accuracy']:.3f}")
        for strategy in STRATEGIES:
            row = run_one(strategy, backend, data, shots, epochs, seed, progress=sys.stderr.isatty())  # bars on a terminal
            results.append(row)
            if strategy == "frozen fine-tune":
                echo(f"frozen check: {row['frozen_tensors_checked']} frozen tensors bit-identical after training")
        if curve:
            for n in CURVE_SHOTS:
                for strategy in STRATEGIES:
                    same = [r for r in results if (r["backend"], r["strategy"], r["shots"]) == (backend, strategy, n)]
                    curve_rows.append(same[0] if same else run_one(strategy, backend, data, n, epochs, seed))
    report = {"task": "digits 0-4 -> digits 5-9 (scikit-learn, 8x8)", "shots": shots, "epochs": epochs,
              "seed": seed, "test_images": int(len(data[1][1])), "results": results, "curve": curve_rows,
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "versions": {b: tl.get_backend(b).versions() for b in backends}}}
    echo("\n" + table(results))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        if curve_rows:
            plot_curve(curve_rows, out / "accuracy_vs_shots.png")
        echo(f"\nwrote {out / 'report.json'}" + (f" and {out / 'accuracy_vs_shots.png'}" if curve_rows else ""))
    return report


def table(rows: list[dict[str, Any]]) -> str:
    """A readable table: backend, strategy, test accuracy, trainable parameters, wall time."""
    head = ("backend", "strategy", "shots", "test acc", "trainable params", "time (s)")
    cells = [head] + [(r["backend"], r["strategy"], str(r["shots"]), f"{r['test_accuracy']:.3f}",
                       f"{r['trainable_params']:,}", f"{r['seconds']:.1f}") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def plot_curve(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against shots per class, one panel per backend, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4), sharey=True, squeeze=False)
    for ax, backend in zip(axes[0], backends):
        for strategy, marker in zip(STRATEGIES, "osd"):
            pts = sorted((r["shots"], r["test_accuracy"]) for r in rows
                         if r["backend"] == backend and r["strategy"] == strategy)
            ax.plot(*zip(*pts), marker=marker, label=strategy)
        ax.set(title=f"{backend}", xlabel="labelled images per class (digits 5-9)", xscale="log",
               xticks=list(CURVE_SHOTS), xticklabels=[str(s) for s in CURVE_SHOTS], ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(loc="lower right")
    fig.suptitle("Transfer learning: small_cnn pretrained on digits 0-4, adapted to digits 5-9")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
