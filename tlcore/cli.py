"""The ``tlcore`` command: ``demo``, ``inspect`` and ``bench``.

Bad arguments print one ``tlcore <command>: error: ...`` line and exit 2, never a traceback.

Example:
    $ tlcore demo --backend all --shots 10 --out demo-out
    $ tlcore inspect demo-out/frozen-torch.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class UsageError(Exception):
    """A bad command-line argument: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage and exits; we want one clear line
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tlcore", description="Transfer learning with one API on PyTorch, Keras and JAX.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("demo", help="pretrained digits 0-4 -> fine-tuned digits 5-9, with evidence")
    d.add_argument("--backend", default="all", help="torch, keras, jax or all (default: all installed)")
    d.add_argument("--shots", type=int, default=10, help="labelled images per class of digits 5-9 (default 10)")
    d.add_argument("--epochs", type=int, default=30, help="epochs for every strategy (default 30)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="demo-out", help="folder for report.json and accuracy_vs_shots.png")
    d.add_argument("--no-curve", action="store_true", help="skip the accuracy-vs-shots runs and plot")
    i = sub.add_parser("inspect", help="print a saved model's architecture, layers and metadata")
    i.add_argument("path")
    b = sub.add_parser("bench", help="run the cross-framework benchmarks (from a source checkout)")
    b.add_argument("args", nargs=argparse.REMAINDER)
    return p


def resolve_backends(name: str) -> list[str]:
    import tlcore as tl
    from tlcore.registry import specs

    installed = tl.available_backends()
    if name == "all":
        if not installed:
            raise UsageError("no backend is installed; pip install 'tlcore[torch]' (or keras, jax)")
        return installed
    if name not in specs():
        raise UsageError(f"unknown backend {name!r}; choose from torch, keras, jax or all")
    if name not in installed:
        raise UsageError(f"backend {name!r} is not installed here (installed: {', '.join(installed) or 'none'}); "
                         f"pip install 'tlcore[{name}]'")
    return [name]


def check_writable(out: str) -> None:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".tlcore-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out!r} is not writable: {e.strerror or e}") from None


def cmd_demo(args) -> int:
    from tlcore.demo import run_demo

    if args.shots < 1:
        raise UsageError(f"--shots must be >= 1, got {args.shots}")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    backends = resolve_backends(args.backend)
    check_writable(args.out)
    run_demo(backends, shots=args.shots, epochs=args.epochs, seed=args.seed, out=args.out, curve=not args.no_curve)
    return 0


def cmd_inspect(args) -> int:
    """Print what a checkpoint holds; a bad file (missing, corrupted, foreign, or with metadata that
    ``tl.load`` would refuse) is one error line and exit status 2."""
    from tlcore.checkpoint import read
    from tlcore.errors import short_repr
    from tlcore.workflow import check_record

    tensors, meta = read(args.path)
    train = meta.get("train")
    if train is not None:  # a training state (fit(checkpoint_dir=...)): the model's tensors are under model/
        from tlcore.resumable import _train_record

        train = _train_record(meta, Path(args.path))
        tensors = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    record = check_record(meta, args.path, tensors)
    trainable = record["trainable"]
    sizes = {k: int(v.size) for k, v in tensors.items()}
    n_train = sum(s for k, s in sizes.items() if trainable.get(k))
    print(f"checkpoint   {args.path}")
    config = json.dumps(record["config"]) if record["arch"] else short_repr(record["config"], 200)
    print(f"architecture {record['arch'] or 'wrapped native model'}  config={config}")
    if record["pretrained"]:
        print(f"pretrained   {record['pretrained']}")
    for i, step in enumerate(record["steps"], 1):
        head = json.dumps(step["head"].to_dict()) if step["head"] else ("(own module)" if step["native_head"] else "")
        print(f"finetune #{i}  cut after {step['cut'] or '(nothing cut)'}; head {step['head_name'] or '-'} {head}")
    print(f"policy       {record['policy'].to_dict()}")
    print(f"saved from   {record['backend']} {json.dumps(record['versions'])}; input shape "
          f"{None if record['input_shape'] is None else list(record['input_shape'])}")
    print(f"tensors      {len(tensors)}: {sum(sizes.values()):,} values; trainable {n_train:,}, "
          f"frozen or non-trainable {sum(sizes.values()) - n_train:,}")
    print("layers       " + ", ".join(record["layers"]))
    if train is not None:
        print(f"training     state of a run: epoch {short_repr(train.get('epoch'))}, step "
              f"{short_repr(train.get('step'))}; continue it with tl.resume(<its folder>)")
    return 0


def cmd_bench(args) -> int:
    try:
        from benchmarks.__main__ import main as bench_main
    except ImportError:
        raise UsageError("the benchmarks live in the source checkout; run `tlcore bench` from its root") from None
    return bench_main(args.args)


def main(argv: list[str] | None = None) -> int:
    import tlcore as tl

    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else ""
    try:
        args = parser().parse_args(argv)
        return {"demo": cmd_demo, "inspect": cmd_inspect, "bench": cmd_bench}[args.command](args)
    except (UsageError, tl.TlcoreError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"tlcore{' ' + command if command in ('demo', 'inspect', 'bench') else ''}: error: {first}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
