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

import math
import numbers
from collections.abc import Sequence
from typing import Any

from ..errors import ZooConfigError, ZooError, short_repr, unknown_name_message
from ..head import MAX_PARAMS, MAX_SIZE

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "mlp": {"in_features": 64, "hidden": (128, 64), "num_classes": 10},
    "small_cnn": {"in_channels": 3, "input_size": 32, "widths": (16, 32, 64), "num_classes": 10},
    "resnet18": {"in_channels": 3, "input_size": 224, "width": 64, "num_classes": 1000},
    "vit_tiny": {"in_channels": 3, "image_size": 32, "patch_size": 4, "dim": 192, "depth": 12, "heads": 3,
                 "mlp_ratio": 4, "num_classes": 10},
}


#: per option: (smallest, largest) value; sequences (``hidden``, ``widths``) bound each size and
#: their length separately (see :data:`SEQUENCE_LENGTHS`)
BOUNDS: dict[str, tuple[int, int]] = {
    "in_features": (1, MAX_SIZE), "hidden": (1, MAX_SIZE), "num_classes": (1, MAX_SIZE),
    "in_channels": (1, 2 ** 16), "input_size": (1, 2 ** 16), "widths": (1, MAX_SIZE), "width": (1, 2 ** 16),
    "image_size": (1, 2 ** 16), "patch_size": (1, 2 ** 16), "dim": (1, 2 ** 16), "depth": (1, 1024),
    "heads": (1, 2 ** 16), "mlp_ratio": (1, 1024),
}
SEQUENCE_LENGTHS = {"hidden": 256, "widths": 32}
#: the most values one activation of a zoo model may hold for one sample (2**28: 1 GiB of float32),
#: checked for the sizes a model is built for (``vit_tiny``'s attention over its tokens, the
#: ``input_size`` a convolutional model is summarised at, an input shape read from a checkpoint)
MAX_ACTIVATION = 2 ** 28


def config_for(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The full, checked config of ``name``: defaults overridden by ``given``.

    Every value is checked before anything is built: its type (ints, not floats or bools; sequences of
    ints for ``hidden``/``widths``), its bounds (:data:`BOUNDS`), and the size of what it describes:
    at most :data:`MAX_PARAMS` parameters (:func:`num_state_values`) and :data:`MAX_ACTIVATION` values
    in one activation.

    Raises:
        ZooError: an unknown option; ZooConfigError: a value of the wrong type, out of bounds or too big.
    """
    defaults = ARCHITECTURES[name]
    if not isinstance(given, dict):
        raise ZooConfigError(f"{name}: the config must be a dict of options, got {short_repr(given)}")
    unknown = [k for k in given if k not in defaults]
    if unknown:
        raise ZooError(unknown_name_message(f"option for {name!r}", short_repr(unknown[0]), list(defaults)))
    cfg = {**defaults, **given}
    for key, value in cfg.items():
        low, high = BOUNDS[key]
        if key in SEQUENCE_LENGTHS:
            longest = SEQUENCE_LENGTHS[key]
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not 1 <= len(value) <= longest \
                    or not all(_is_int(v) and low <= v <= high for v in value):
                raise ZooConfigError(f"{name}: {key} must be a non-empty sequence of at most {longest} ints in "
                                     f"[{low}, {high}], got {short_repr(value)}")
            cfg[key] = tuple(int(v) for v in value)
        elif not _is_int(value) or not low <= value <= high:
            raise ZooConfigError(f"{name}: {key} must be an int in [{low}, {high}], got {short_repr(value)}")
        else:
            cfg[key] = int(value)
    if name == "vit_tiny":
        if cfg["patch_size"] > cfg["image_size"] or cfg["image_size"] % cfg["patch_size"]:
            raise ZooConfigError(f"vit_tiny: image_size {cfg['image_size']} is not a multiple of patch_size "
                                 f"{cfg['patch_size']}")
        if cfg["dim"] % cfg["heads"]:
            raise ZooConfigError(f"vit_tiny: dim {cfg['dim']} is not a multiple of heads {cfg['heads']}")
    if name == "small_cnn" and cfg["input_size"] < 2 ** (len(cfg["widths"]) - 1):
        raise ZooConfigError(f"small_cnn: input_size {cfg['input_size']} is too small for {len(cfg['widths'])} blocks")
    if name == "resnet18" and cfg["input_size"] < 32:
        raise ZooConfigError(f"resnet18: input_size must be >= 32, got {cfg['input_size']}")
    n = num_state_values(name, cfg)
    if n > MAX_PARAMS:
        raise ZooConfigError(f"{name}: this config describes {n:,} parameters, more than tlcore.zoo.MAX_PARAMS = "
                             f"{MAX_PARAMS:,}: {short_repr(given, 200)}")
    if name == "vit_tiny":
        check_activation(name, cfg, None)
    elif name in ("small_cnn", "resnet18"):
        check_activation(name, cfg, (cfg["input_size"], cfg["input_size"], cfg["in_channels"]), "input_size")
    return cfg


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def state_shapes(name: str, cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of ``state()`` of zoo model ``name`` built from the checked ``cfg``
    (PyTorch's names and layouts, the same on every backend), computed without building it.

    Example:
        >>> state_shapes("mlp", config_for("mlp", {"in_features": 4, "hidden": (8,), "num_classes": 3}))
        {'fc1.weight': (8, 4), 'fc1.bias': (8,), 'fc.weight': (3, 8), 'fc.bias': (3,)}
    """
    out: dict[str, tuple[int, ...]] = {}

    def dense(prefix: str, fan_in: int, fan_out: int) -> None:
        out[f"{prefix}.weight"], out[f"{prefix}.bias"] = (fan_out, fan_in), (fan_out,)

    def norm(prefix: str, width: int, stats: bool = True) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var") if stats else ("weight", "bias"):
            out[f"{prefix}.{leaf}"] = (width,)

    nc = cfg["num_classes"]
    if name == "mlp":
        width = cfg["in_features"]
        for i, h in enumerate(cfg["hidden"], 1):
            dense(f"fc{i}", width, h)
            width = h
    elif name == "small_cnn":
        width = cfg["in_channels"]
        for i, w in enumerate(cfg["widths"], 1):
            out[f"conv{i}.weight"] = (w, width, 3, 3)
            norm(f"bn{i}", w)
            width = w
    elif name == "resnet18":
        w = cfg["width"]
        out["conv1.weight"] = (w, cfg["in_channels"], 7, 7)
        norm("bn1", w)
        width = w
        for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2)), 1):
            cout = w * mult
            for j, (cin, s) in enumerate(((width, stride), (cout, 1))):
                block = f"layer{i}.{j}"
                out[f"{block}.conv1.weight"] = (cout, cin, 3, 3)
                norm(f"{block}.bn1", cout)
                out[f"{block}.conv2.weight"] = (cout, cout, 3, 3)
                norm(f"{block}.bn2", cout)
                if s != 1 or cin != cout:
                    out[f"{block}.downsample.0.weight"] = (cout, cin, 1, 1)
                    norm(f"{block}.downsample.1", cout)
            width = cout
    else:
        d, p, hidden = cfg["dim"], cfg["patch_size"], cfg["dim"] * cfg["mlp_ratio"]
        out["patch_embed.weight"], out["patch_embed.bias"] = (d, cfg["in_channels"], p, p), (d,)
        out["embed.cls_token"] = (1, 1, d)
        out["embed.pos_embed"] = (1, (cfg["image_size"] // p) ** 2 + 1, d)
        for i in range(cfg["depth"]):
            norm(f"blocks.{i}.norm1", d, stats=False)
            dense(f"blocks.{i}.attn.qkv", d, 3 * d)
            dense(f"blocks.{i}.attn.proj", d, d)
            norm(f"blocks.{i}.norm2", d, stats=False)
            dense(f"blocks.{i}.mlp.fc1", d, hidden)
            dense(f"blocks.{i}.mlp.fc2", hidden, d)
        norm("norm", d, stats=False)
        width = d
    dense("fc", width, nc)
    return out


def num_state_values(name: str, cfg: dict[str, Any]) -> int:
    """How many values ``state()`` of zoo model ``name`` built from the checked ``cfg`` holds
    (parameters and BatchNorm statistics), computed without building it.

    Example:
        >>> num_state_values("mlp", config_for("mlp", {"in_features": 4, "hidden": (8,), "num_classes": 3}))
        67
    """
    return sum(math.prod(shape) for shape in state_shapes(name, cfg).values())


def check_activation(name: str, cfg: dict[str, Any], shape: tuple[int | None, ...] | None, what: str = "input shape") -> None:
    """Refuse (:class:`ZooConfigError`) sizes for which one activation of the model on one sample
    would hold more than :data:`MAX_ACTIVATION` values: ``shape`` is a per-sample input (NHWC) of a
    convolutional model; ``vit_tiny``'s sizes are all in ``cfg``."""
    if name == "vit_tiny":
        tokens = (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
        largest = max(cfg["heads"] * tokens * tokens, tokens * cfg["dim"] * cfg["mlp_ratio"])
        if largest > MAX_ACTIVATION:
            raise ZooConfigError(f"vit_tiny: {tokens:,} tokens of dim {cfg['dim']} need activations of {largest:,} "
                                 f"values per sample, more than tlcore.zoo.MAX_ACTIVATION = {MAX_ACTIVATION:,}")
        return
    if shape is None or name not in ("small_cnn", "resnet18"):
        return
    h, w = (1 if d is None else d for d in shape[:2])
    widths = cfg["widths"] if name == "small_cnn" else (cfg["width"],)
    largest = h * w * max(*widths, shape[2] or 1)
    if largest > MAX_ACTIVATION:
        raise ZooConfigError(f"{name}: an input of {tuple(shape)} per sample ({what}) needs activations of "
                             f"{largest:,} values, more than tlcore.zoo.MAX_ACTIVATION = {MAX_ACTIVATION:,}")


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
