"""Turning benchmark rows into ratios, a Markdown table and a PNG chart."""
from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path


def machine(versions: dict | None = None) -> dict:
    """Where a benchmark ran: platform, processor, CPU count, Python (and framework versions)."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), **(versions or {})}


def write_json(report: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def ratio(a: dict, b: dict) -> float:
    """Row ``a`` / row ``b``: the median of the ratios of their runs of the same repeat (timed close
    together, so a slow spell of the machine hits both), or of the medians when runs are not paired."""
    x, y = a.get("runs_ms", []), b.get("runs_ms", [])
    if x and len(x) == len(y):
        return statistics.median(p / q for p, q in zip(x, y))
    return a["median_ms"] / b["median_ms"]


def pairs(report: dict) -> list[dict]:
    """One record per (backend, workload, mode): tlcore and native medians and their ratio."""
    index = {(r["backend"], r["workload"], r["mode"], r["impl"]): r for r in report["rows"]}
    out = []
    for (b, w, m, impl), r in index.items():
        if impl != "tlcore":
            continue
        n = index[(b, w, m, "native")]
        out.append({"backend": b, "workload": w, "mode": m, "tlcore": r, "native": n, "ratio": ratio(r, n)})
    return out


def frozen_vs_forward(report: dict) -> dict:
    """(backend, workload, mode, impl) -> frozen (or frozen_clip) step / forward pass, paired by repeat."""
    index = {(r["backend"], r["workload"], r["mode"], r["impl"]): r for r in report["rows"]}
    return {(b, w, m, i): ratio(r, index[(b, w, "forward", i)])
            for (b, w, m, i), r in index.items() if m in ("frozen", "frozen_clip")}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}; "
             + "; ".join(f"{b}: {', '.join(f'{k} {v}' for k, v in d['versions'].items())}, peak RSS "
                         f"{d['peak_rss_mb']:.0f} MB" for b, d in report["backends"].items()),
             f"`import tlcore`: {report['import_tlcore_ms']:.1f} ms (median of 5 fresh interpreters)", "",
             "| backend | workload | mode | tlcore ms (min-max) | native ms (min-max) | tlcore/native (median of paired runs) | first step ms (tlcore / native) | optimizer state bytes (tlcore / native) |",
             "|---|---|---|---|---|---|---|---|"]
    for p in pairs(report):
        t, n = p["tlcore"], p["native"]
        unit = "ms run" if "e2e" in p["mode"] else "ms/step"
        first = (f"{t['first_step_ms']:.0f} / {n['first_step_ms']:.0f}" if "first_step_ms" in t else
                 f"new process: {t['fresh_process_ms']:.0f} / {n['fresh_process_ms']:.0f}" if "fresh_process_ms" in t
                 else "-")
        state = (f"{t['optimizer_state_bytes']:,} / {n['optimizer_state_bytes']:,}"
                 if "optimizer_state_bytes" in t else "-")
        mode = p["mode"] + (f" (cache: {t['cache_features']})" if "cache_features" in t else "")
        lines.append(f"| {p['backend']} | {p['workload']} | {mode} | {t['median_ms']:.2f} ({t['min_ms']:.2f}-{t['max_ms']:.2f}) "
                     f"| {n['median_ms']:.2f} ({n['min_ms']:.2f}-{n['max_ms']:.2f}) | **{p['ratio']:.3f}** | {first} | {state} |"
                     .replace("ms/step", unit))
    lines += ["", "Frozen-backbone step / inference forward pass (median of the ratios of the same repeat), tlcore "
              "(hand-written loop in brackets)", "",
              "| backend | workload | frozen step / forward | frozen+clip step / forward |", "|---|---|---|---|"]
    fv = frozen_vs_forward(report)
    for b, w in dict.fromkeys((b, w) for b, w, _, _ in fv):
        cells = [f"{fv[(b, w, m, 'tlcore')]:.2f}x ({fv[(b, w, m, 'native')]:.2f}x)" for m in ("frozen", "frozen_clip")]
        lines.append(f"| {b} | {w} | {' | '.join(cells)} |")
    index = {(p["backend"], p["workload"], p["mode"]): p for p in pairs(report)}
    streams = [p for p in pairs(report) if p["mode"] == "stream"]
    if streams:
        lines += ["", "Fine-tuning from a torch DataLoader with a random flip (nothing cached): tlcore/native per "
                  "step, and tlcore's step with the loader read ahead in a thread / its in-memory step", "",
                  "| backend | workload | tlcore/native | loader step / in-memory step | 10 epochs: tlcore / native ms |",
                  "|---|---|---|---|---|"]
        for p in streams:
            memory = index[(p["backend"], p["workload"], "stream_in_memory")]
            whole = next((q for q in pairs(report) if q["backend"] == p["backend"] and q["mode"].startswith("stream_e2e")),
                         None)
            total = f"{whole['tlcore']['median_ms']:.0f} / {whole['native']['median_ms']:.0f}" if whole else "-"
            lines.append(f"| {p['backend']} | {p['workload']} | {p['ratio']:.3f} | "
                         f"{ratio(p['tlcore'], memory['tlcore']):.3f} | {total} |")
    if report.get("recipe"):
        lines += ["", "Recipe (cosine + layer decay 0.75 + no_decay, AdamW, everything trainable), ms/step: tlcore's "
                  "recipe, tlcore with one plain AdamW rate, and a hand-written recipe loop (PyTorch param groups; "
                  "Optax multi_transform; one Keras AdamW per group in a GradientTape step); a "
                  "3-stage UnfreezeSchedule fit of two new models: seconds and compilations", "",
                  "| backend | workload | recipe ms | plain ms | recipe / plain | native recipe ms | recipe / native | "
                  "3 stages, 1st model: s (compilations) | 2nd model: s (compilations) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["recipe"]:
            rec, plain, native = r["recipe_ms"], r["plain_ms"], r.get("native_ms")
            first, second = r["staged"]
            lines.append(f"| {r['backend']} | {r['workload']} | {rec['median_ms']:.2f} | {plain['median_ms']:.2f} | "
                         f"{ratio(rec, plain):.3f} | {native['median_ms']:.2f} | {ratio(rec, native):.3f} | "
                         if native else
                         f"| {r['backend']} | {r['workload']} | {rec['median_ms']:.2f} | {plain['median_ms']:.2f} | "
                         f"{ratio(rec, plain):.3f} | - | - | ")
            lines[-1] += (f"{first['seconds']:.2f} ({first['compilations']}) | "
                          f"{second['seconds']:.2f} ({second['compilations']}) |")
    e2e = [p for p in pairs(report) if p["mode"].startswith("e2e") and "fresh_process_ms" in p["tlcore"]]
    if e2e:
        frozen = {(p["backend"], p["workload"]): p["native"]["median_ms"] for p in pairs(report) if p["mode"] == "frozen"}
        lines += ["", f"Frozen-backbone fine-tune ({e2e[0]['mode'].replace('_', ' ')}), speed-up of tlcore over the "
                  "hand-written loop: in a warm process (median of new models of a structure compiled before), "
                  "against the hand-written loop's steps alone (its median frozen step times the steps: no "
                  "set-up, no compiling), and as a script's only fine-tune (a new process: compiling included)", "",
                  "| backend | workload | warm process | vs native steps alone | new process |", "|---|---|---|---|---|"]
        for p in e2e:
            steps_alone = frozen[(p["backend"], p["workload"])] * p["native"]["steps"] / p["tlcore"]["median_ms"]
            fresh = p["native"]["fresh_process_ms"] / p["tlcore"]["fresh_process_ms"]
            lines.append(f"| {p['backend']} | {p['workload']} | {1 / p['ratio']:.1f}x | {steps_alone:.1f}x | {fresh:.1f}x |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Grouped bars of ms/step per backend and mode (tlcore solid, native hatched), one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [p for p in pairs(report) if "e2e" not in p["mode"]]
    workloads = list(dict.fromkeys(p["workload"] for p in rows))
    modes = list(dict.fromkeys(p["mode"] for p in rows))
    backends = list(dict.fromkeys(p["backend"] for p in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5), squeeze=False)
    width = 0.8 / (2 * len(backends))
    for ax, w in zip(axes[0], workloads):
        for i, b in enumerate(backends):
            for j, impl in enumerate(("tlcore", "native")):
                vals = [next((p[impl]["median_ms"] for p in rows if (p["backend"], p["workload"], p["mode"]) == (b, w, m)), 0)
                        for m in modes]
                pos = [k + (2 * i + j - len(backends) + 0.5) * width for k in range(len(modes))]
                ax.bar(pos, vals, width, label=f"{b} {impl}", color=f"C{i}", hatch="//" if impl == "native" else None,
                       alpha=0.9 if impl == "tlcore" else 0.5, edgecolor="black", linewidth=0.3)
        ax.set(title=w, xticks=range(len(modes)), xticklabels=modes, ylabel="ms per step (median)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"tlcore vs hand-written loops ({report['machine']['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
