"""The benchmark workloads: the same zoo networks, data and modes on every backend."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import tlcore as tl
from tlcore.testing import example_shape

MODES = ("full", "frozen", "frozen_clip", "forward")
CLIP = 1.0
LR = 0.01


@dataclass(frozen=True)
class Workload:
    arch: str
    config: dict
    batch: int = 64


WORKLOADS = {
    # four 3x3 Conv-BN-ReLU blocks 32-64-128-256 (2x2 max pools between), global average pool, linear
    "cnn": Workload("small_cnn", dict(in_channels=3, input_size=32, widths=(32, 64, 128, 256), num_classes=10)),
    "resnet18": Workload("resnet18", dict(in_channels=3, input_size=32, width=16, num_classes=10)),
    "vit_tiny": Workload("vit_tiny", dict(in_channels=3, image_size=32, patch_size=4, dim=96, depth=4, heads=3,
                                          num_classes=10)),
}


def policy_for(mode: str) -> tl.FreezePolicy:
    return tl.FreezePolicy.none() if mode == "full" else tl.FreezePolicy.all()


def build(workload: str, backend: str, mode: str, seed: int = 0) -> tl.Model:
    """The zoo network cut before its classifier with a new linear head, frozen as ``mode`` says."""
    w = WORKLOADS[workload]
    base = tl.zoo.create(w.arch, backend=backend, seed=seed, **w.config)
    return tl.finetune(base, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(10), freeze=policy_for(mode), seed=seed)


def data(model: tl.Model, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *example_shape(model))).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)
