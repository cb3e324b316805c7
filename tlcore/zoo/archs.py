"""The zoo's architectures: their options, defaults and input shapes (every backend builds them
natively with the same layer names and the same computation).

* ``mlp``: ``fc1, relu1, ..., fc`` on flat vectors of ``in_features``.
* ``small_cnn``: blocks ``conv{i}`` (3x3, stride 1, padding 1, no bias), ``bn{i}``, ``relu{i}``,
  then ``mp{i}`` (2x2 max pool) between blocks; ``pool`` (global average), ``fc``.
* ``resnet18``: torchvision's ResNet-18 topology and names (``conv1`` 7x7/2 pad 3, ``bn1``, ``relu``,
  ``maxpool`` 3x3/2 pad 1, ``layer1..4`` of two BasicBlocks, ``avgpool``, ``fc``), base ``width``
  (64 in torchvision) configurable.
* ``vit_tiny``: ``patch_embed`` (p x p conv, stride p, to tokens in row-major order), ``embed``
  (prepend ``cls_token``, add ``pos_embed``), ``blocks.{i}`` (pre-norm: ``norm1``, ``attn.qkv``,
  ``attn.proj``, ``norm2``, ``mlp.fc1``, exact GELU, ``mlp.fc2``), ``norm``, ``pool`` (class token),
  ``fc``. LayerNorm eps 1e-6; timm's ViT-Tiny is dim 192, depth 12, heads 3.

All BatchNorms use eps 1e-5 and momentum 0.1 (PyTorch's convention; Keras/Flax momentum 0.9).

Example:
    >>> config_for("small_cnn", {"in_channels": 1})["widths"]
    (16, 32, 64)
    >>> input_shape_for("small_cnn", config_for("small_cnn", {})), input_shape_for("vit_tiny", config_for("vit_tiny", {}))
    ((None, None, 3), (32, 32, 3))
"""
from __future__ import annotations

from typing import Any

from ..errors import ZooError, unknown_name_message

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "mlp": {"in_features": 64, "hidden": (128, 64), "num_classes": 10},
    "small_cnn": {"in_channels": 3, "input_size": 32, "widths": (16, 32, 64), "num_classes": 10},
    "resnet18": {"in_channels": 3, "input_size": 224, "width": 64, "num_classes": 1000},
    "vit_tiny": {"in_channels": 3, "image_size": 32, "patch_size": 4, "dim": 192, "depth": 12, "heads": 3,
                 "mlp_ratio": 4, "num_classes": 10},
}


def config_for(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The full, checked config of ``name``: defaults overridden by ``given``."""
    defaults = ARCHITECTURES[name]
    unknown = [k for k in given if k not in defaults]
    if unknown:
        raise ZooError(unknown_name_message(f"option for {name!r}", unknown[0], list(defaults)))
    cfg = {**defaults, **given}
    for key in ("hidden", "widths"):
        if key in cfg:
            cfg[key] = tuple(int(v) for v in cfg[key])
            if not cfg[key] or min(cfg[key]) < 1:
                raise ZooError(f"{name}: {key} must be a non-empty tuple of ints >= 1, got {cfg[key]!r}")
    for key, value in cfg.items():
        if key not in ("hidden", "widths") and (not isinstance(value, int) or value < 1):
            raise ZooError(f"{name}: {key} must be an int >= 1, got {value!r}")
    if name == "vit_tiny":
        if cfg["image_size"] % cfg["patch_size"]:
            raise ZooError(f"vit_tiny: image_size {cfg['image_size']} is not a multiple of patch_size {cfg['patch_size']}")
        if cfg["dim"] % cfg["heads"]:
            raise ZooError(f"vit_tiny: dim {cfg['dim']} is not a multiple of heads {cfg['heads']}")
    if name == "small_cnn" and cfg["input_size"] < 2 ** (len(cfg["widths"]) - 1):
        raise ZooError(f"small_cnn: input_size {cfg['input_size']} is too small for {len(cfg['widths'])} blocks")
    if name == "resnet18" and cfg["input_size"] < 32:
        raise ZooError(f"resnet18: input_size must be >= 32, got {cfg['input_size']}")
    return cfg


def input_shape_for(name: str, cfg: dict[str, Any]) -> tuple[int | None, ...]:
    """Per-sample numpy input shape (NHWC images) the model accepts, the same on every backend:
    convolutional models take any image size their layers allow (None), as torchvision's do;
    ``vit_tiny`` takes only ``image_size`` (its position embedding is sized for it)."""
    if name == "mlp":
        return (cfg["in_features"],)
    if name == "vit_tiny":
        return (cfg["image_size"], cfg["image_size"], cfg["in_channels"])
    return (None, None, cfg["in_channels"])


def default_input_shape(name: str, cfg: dict[str, Any]) -> tuple[int, ...]:
    """The per-sample input shape used where one size is needed (summaries): ``input_size``."""
    if name in ("small_cnn", "resnet18"):
        return (cfg["input_size"], cfg["input_size"], cfg["in_channels"])
    return input_shape_for(name, cfg)


def layer_names(name: str, cfg: dict[str, Any]) -> list[str]:
    """The cut points every backend must expose, in forward order."""
    if name == "mlp":
        out = []
        for i, _ in enumerate(cfg["hidden"], 1):
            out += [f"fc{i}", f"relu{i}"]
        return out + ["fc"]
    if name == "small_cnn":
        out = []
        n = len(cfg["widths"])
        for i in range(1, n + 1):
            out += [f"conv{i}", f"bn{i}", f"relu{i}"] + ([f"mp{i}"] if i < n else [])
        return out + ["pool", "fc"]
    if name == "resnet18":
        out = ["conv1", "bn1", "relu", "maxpool"]
        for i in range(1, 5):
            out += [f"layer{i}", f"layer{i}.0", f"layer{i}.1"]
        return out + ["avgpool", "fc"]
    return (["patch_embed", "embed", "blocks"] + [f"blocks.{i}" for i in range(cfg["depth"])]
            + ["norm", "pool", "fc"])
