"""A small zoo of architectures defined identically on every backend.

A zoo model has the same layer names, the same ``state()`` keys and tensor layouts (PyTorch's:
convolution kernels ``(out, in, kh, kw)``, dense ``(out, in)``) and takes the same numpy input
(images channels-last, NHWC) on every backend. Weights are initialised in numpy from ``seed``, so
``create(name, backend=b, seed=s)`` is the same network for every ``b``.

Example:
    >>> import tlcore as tl
    >>> tl.zoo.names()
    ['mlp', 'resnet18', 'small_cnn', 'vit_tiny']
    >>> m = tl.zoo.create("small_cnn", backend="torch", num_classes=5, in_channels=1)  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import BackendNotFoundError, ZooConfigError, ZooError, short_repr, unknown_name_message
from ..head import MAX_PARAMS
from .archs import ARCHITECTURES, MAX_ACTIVATION, config_for, default_input_shape, input_shape_for
from ..init import init_state

__all__ = ["ARCHITECTURES", "MAX_ACTIVATION", "MAX_PARAMS", "PRETRAINED", "ZooConfigError", "create", "names",
           "pretrained_tags", "init_state"]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

#: pretrained tags: ``{arch: {tag: (file in tlcore/weights, config, what it was trained on)}}``
PRETRAINED: dict[str, dict[str, tuple[str, dict, str]]] = {
    "small_cnn": {
        "digits04": ("small_cnn-digits04.safetensors",
                     {"in_channels": 1, "input_size": 8, "widths": (64, 128, 256), "num_classes": 5},
                     "scikit-learn digits 0-4 (8x8 grey), scripts/train_pretrained.py"),
    },
}


class UnknownArchitectureError(ZooError):
    """``tl.zoo.create`` got a name that is not in the zoo."""


class UnknownPretrainedError(ZooError):
    """``pretrained=`` names a tag that does not exist for that architecture."""


def names() -> list[str]:
    """The architectures in the zoo."""
    return sorted(ARCHITECTURES)


def pretrained_tags(name: str) -> list[str]:
    return sorted(PRETRAINED.get(name, {}))


def create(name: str, backend: str = "torch", num_classes: int | None = None, seed: int = 0,
           pretrained: str | None = None, weights: str | Path | None = None, **config: Any):
    """Build zoo architecture ``name`` on ``backend`` as a :class:`tlcore.Model`.

    Args:
        name: one of :func:`names`.
        backend: ``"torch"``, ``"keras"`` or ``"jax"``.
        num_classes: outputs of the final ``fc`` layer.
        seed: seeds the numpy initialisation (the same on every backend).
        pretrained: a shipped tag (see :data:`PRETRAINED`), e.g. ``"digits04"`` for ``small_cnn``.
        weights: a state dict file (``.safetensors``, or ``.pth`` read with ``weights_only=True``) in
            PyTorch's key layout, e.g. torchvision's ResNet-18 weights.
        **config: the architecture's options (see ``tlcore.zoo.archs``).

    Every option is checked before anything is built (see :func:`tlcore.zoo.archs.config_for`): a value
    of the wrong type (``widths=[4.5]``, ``num_classes=True``), out of bounds, or describing more than
    :data:`MAX_PARAMS` parameters raises :class:`tl.ZooConfigError`.

    Raises:
        UnknownArchitectureError, UnknownPretrainedError: the name or tag does not exist.
        ZooConfigError: an option has the wrong type or is out of bounds.
        tl.CheckpointError: ``weights`` is missing, corrupted (a tlcore checkpoint's checksum is
            verified) or does not fit.
    """
    from ..checkpoint import CheckpointMismatchError, read, read_state_dict, single_line
    from ..data import check_seed
    from ..workflow import fit_state_dict

    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise UnknownArchitectureError(unknown_name_message("zoo architecture", short_repr(name), names()))
    if not isinstance(backend, str):
        raise BackendNotFoundError(f"backend must be a name such as 'torch', got {short_repr(backend)}")
    seed = check_seed(seed)
    if pretrained is not None and weights is not None:
        raise ZooError("give `pretrained` or `weights`, not both")
    arrays = None
    if pretrained is not None:
        tags = PRETRAINED.get(name, {})
        if not isinstance(pretrained, str) or pretrained not in tags:
            raise UnknownPretrainedError(unknown_name_message(f"pretrained tag for {name!r}", short_repr(pretrained),
                                                              sorted(tags)))
        file, tag_config, _ = tags[pretrained]
        given = {**config, **({} if num_classes is None else {"num_classes": num_classes})}
        config_for(name, {**tag_config, **given})  # the given values are checked before they are compared
        clash = {k: v for k, v in given.items() if k in tag_config and _same(v) != _same(tag_config[k])}
        if clash:
            raise ZooError(f"pretrained {pretrained!r} is a {name} with {tag_config}; it cannot have {clash}. "
                           "Attach a new head with tl.finetune to change num_classes")
        config = {**tag_config, **config}
        arrays = read(WEIGHTS_DIR / file)[0]
    elif num_classes is not None:
        config["num_classes"] = num_classes
    cfg = config_for(name, config)
    if weights is not None:
        arrays = read_state_dict(weights)
    model = _build(name, backend, cfg)
    try:
        model.load_state(init_state(model.state(), seed) if arrays is None else fit_state_dict(model, arrays))
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{str(weights)!r}: {single_line(e)}") from None
    if pretrained is not None:
        model.meta["pretrained"] = pretrained
    return model


def _same(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _build(name: str, backend: str, cfg: dict[str, Any]):
    """The architecture on ``backend``, with the backend's own initial weights."""
    from ..registry import get_backend

    model = get_backend(backend).zoo_model(name, cfg)
    model.input_shape = input_shape_for(name, cfg)
    model.meta.update(arch=name, config=cfg, default_input_shape=default_input_shape(name, cfg))
    if name == "vit_tiny":
        model.meta["input_hint"] = (f"vit_tiny takes images of its image_size={cfg['image_size']}; build it for "
                                    "another size with tl.zoo.create('vit_tiny', image_size=...)")
    return model
