"""What to freeze: :class:`FreezePolicy`, plain data that resolves to a mask in the core.

A backend describes its tensors as :class:`TensorInfo` records; :meth:`FreezePolicy.resolve` turns a
policy into a :class:`Resolved` mask (``{name: can training change it?}``) and the set of BatchNorm
layers that must run in inference mode. Backends only apply the result, so every backend freezes
exactly the same tensors. The attached head is never frozen by a policy.

BatchNorm is frozen as a unit: with ``bn="frozen"`` (the default, as Keras does), a BatchNorm layer
with any frozen tensor keeps its affine parameters *and* its moving statistics, and runs in inference
mode during training. With ``bn="train"`` (fastai's ``train_bn``), every BatchNorm layer stays
trainable and updates its statistics, even inside the frozen part. Dropout is not affected by
freezing: it stays active while training.

Example:
    >>> from tlcore import FreezePolicy
    >>> from tlcore.freeze import TensorInfo
    >>> ts = [TensorInfo("conv.weight", "conv", "param"), TensorInfo("fc.weight", "fc", "param")]
    >>> FreezePolicy.up_to("conv").resolve(ts, ["conv", "fc"]).mask
    {'conv.weight': False, 'fc.weight': True}
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .cut import in_layer, top_level_layer
from .errors import FreezePolicyError, LayerNotFoundError, unknown_name_message

#: Tensor kinds a backend reports. ``param``: trainable weight; ``bn_param``/``bn_stat``: BatchNorm
#: affine parameter / moving statistic or counter; ``buffer``: constant state training never writes;
#: ``rng``: random-number state that a training step advances (e.g. Flax's dropout counters).
KINDS = ("param", "bn_param", "bn_stat", "buffer", "rng")
BN_MODES = ("frozen", "train")
MODES = ("all", "none", "up_to", "matching")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of ``Model.state()``: its name, the deepest layer of ``Model.layers`` that owns it
    (``""`` for tensors at the model's root), its kind, and the layer path that groups BatchNorm
    tensors into one unit."""

    name: str
    layer: str
    kind: str = "param"
    unit: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TensorInfo.kind must be one of {KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class Resolved:
    """A resolved policy: ``mask[name]`` is True when training may change that tensor."""

    mask: dict[str, bool]
    frozen_bn_units: frozenset[str]
    policy: FreezePolicy

    @property
    def frozen(self) -> list[str]:
        return [n for n, trainable in self.mask.items() if not trainable]

    @property
    def trainable_params(self) -> list[str]:
        return [n for n, t in self.mask.items() if t]


def owning_layer(path: str, layers: set[str]) -> str:
    """The deepest of ``layers`` that contains module ``path`` (``""`` when none does).

    Example:
        >>> owning_layer("layer1.0.conv1", {"layer1", "layer1.0"})
        'layer1.0'
    """
    parts = path.split(".") if path else []
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in layers:
            return candidate
    return ""


@dataclass(frozen=True)
class FreezePolicy:
    """Which tensors of the kept (non-head) part of a model to freeze.

    Build one with :meth:`all`, :meth:`none`, :meth:`up_to` or :meth:`matching`.
    """

    mode: str = "all"
    target: str | int | None = None
    bn: str = "frozen"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FreezePolicyError(unknown_name_message("freeze mode", self.mode, MODES))
        if self.bn not in BN_MODES:
            raise FreezePolicyError(f"bn must be 'frozen' or 'train', got {self.bn!r}")
        if self.mode == "up_to" and (isinstance(self.target, bool) or not isinstance(self.target, (str, int))):
            raise FreezePolicyError("FreezePolicy.up_to needs a layer name or index")
        if self.mode == "matching":
            if not isinstance(self.target, str) or not self.target:
                raise FreezePolicyError("FreezePolicy.matching needs a non-empty regular expression")
            try:
                re.compile(self.target)
            except re.error as e:
                raise FreezePolicyError(f"FreezePolicy.matching: invalid regex {self.target!r}: {e}") from None

    @classmethod
    def all(cls, bn: str = "frozen") -> FreezePolicy:
        """Freeze everything kept from the original model (the head stays trainable)."""
        return cls("all", None, bn)

    @classmethod
    def none(cls) -> FreezePolicy:
        """Freeze nothing: full fine-tuning."""
        return cls("none", None, "train")

    @classmethod
    def up_to(cls, layer: str | int, bn: str = "frozen") -> FreezePolicy:
        """Freeze layers from the input up to and including ``layer`` (a name, or an int counting
        top-level layers as ``LayerCut`` does)."""
        return cls("up_to", layer, bn)

    @classmethod
    def matching(cls, regex: str, bn: str = "frozen") -> FreezePolicy:
        """Freeze tensors whose name matches ``regex`` (``re.search``)."""
        return cls("matching", regex, bn)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "target": self.target, "bn": self.bn}

    @classmethod
    def from_dict(cls, d: dict) -> FreezePolicy:
        return cls(d["mode"], d.get("target"), d.get("bn", "frozen"))

    def resolve(self, tensors: Sequence[TensorInfo], layers: Sequence[str],
                head: str | None = None) -> Resolved:
        """Resolve to a mask over ``tensors``; ``head`` names the attached head layer, never frozen.

        Raises:
            LayerNotFoundError: ``up_to`` names no layer (the message lists the valid ones).
            FreezePolicyError: ``up_to``/``matching`` would freeze no tensor.
        """
        base = [t for t in tensors if not (head and in_layer(t.layer, head))]
        layers = list(layers)
        weighted = {t.layer.split(".")[0] for t in tensors if t.kind in ("param", "bn_param") and t.layer}
        last = self._up_to_index(layers, weighted) if self.mode == "up_to" else -1
        order = {name: i for i, name in enumerate(layers)}
        selected = {t.name for t in base if self._selects(t, layers, order, last)}
        if self.mode in ("up_to", "matching") and not selected:
            raise FreezePolicyError(
                f"{self!r} freezes no tensor; names it could match: {[t.name for t in base][:20]}")
        frozen_units = frozenset(
            t.unit for t in base if t.kind in ("bn_param", "bn_stat") and t.name in selected
        ) if self.bn == "frozen" else frozenset()
        mask = {}
        for t in tensors:
            if t.kind == "param":
                mask[t.name] = t.name not in selected
            elif t.kind in ("bn_param", "bn_stat"):
                mask[t.name] = t.unit not in frozen_units
            else:
                mask[t.name] = t.kind == "rng"
        return Resolved(mask, frozen_units, self)

    def _selects(self, t: TensorInfo, layers: list[str], order: dict[str, int], last: int) -> bool:
        if self.mode == "all":
            return True
        if self.mode == "none":
            return False
        if self.mode == "matching":
            return re.search(self.target, t.name) is not None
        if t.layer == "":
            return True  # root tensors (e.g. a class token) come before every layer
        return order.get(t.layer, len(layers)) <= last or in_layer(t.layer, layers[last])

    def _up_to_index(self, layers: list[str], weighted: set[str]) -> int:
        if not isinstance(self.target, str):
            return layers.index(top_level_layer(layers, self.target, "FreezePolicy.up_to", weighted))
        if self.target not in layers:
            raise LayerNotFoundError(unknown_name_message("layer", self.target, layers))
        return layers.index(self.target)
