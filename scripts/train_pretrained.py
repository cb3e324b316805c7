"""Reproduce the shipped ``small_cnn`` weights pretrained on digits 0-4 (``pretrained="digits04"``).

    .venv/bin/python scripts/train_pretrained.py [--epochs 40] [--out tlcore/weights/small_cnn-digits04.safetensors]

Trains the zoo's ``small_cnn`` (1 input channel, 8x8, widths 16-32-64, 5 classes) from seed 0 on the
training split (seed 0) of scikit-learn's digits 0-4 with the PyTorch backend, and saves a tlcore
checkpoint that loads on every backend.
"""
from __future__ import annotations

import argparse

import tlcore as tl
from tlcore.datasets import digits
from tlcore.zoo import PRETRAINED


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--backend", default="torch")
    p.add_argument("--out", default="tlcore/weights/small_cnn-digits04.safetensors")
    args = p.parse_args(argv)
    _, config, _ = PRETRAINED["small_cnn"]["digits04"]
    (x, y), (xt, yt) = digits(classes=range(5), seed=0)
    model = tl.zoo.create("small_cnn", backend=args.backend, seed=0, **config)
    model.fit(x, y, epochs=args.epochs, batch_size=32, optimizer=tl.optim.AdamW(lr=3e-3, weight_decay=1e-4),
              seed=0, progress=False)
    result = model.evaluate(xt, yt)
    model.save(args.out)
    print(f"saved {args.out}: test accuracy on digits 0-4 = {result['accuracy']:.4f} ({len(xt)} images)")
    return result


if __name__ == "__main__":
    main()
