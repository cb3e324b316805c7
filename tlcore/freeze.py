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

import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .cut import in_layer, top_level_layer
from .errors import FreezePolicyError, LayerNotFoundError, short_repr, unknown_name_message

try:  # the regex parser of the standard library (``sre_parse`` before Python 3.11)
    from re import _constants as _sre, _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

#: Tensor kinds a backend reports. ``param``: trainable weight; ``bn_param``/``bn_stat``: BatchNorm
#: affine parameter / moving statistic or counter; ``buffer``: constant state training never writes;
#: ``rng``: random-number state that a training step advances (e.g. Flax's dropout counters).
KINDS = ("param", "bn_param", "bn_stat", "buffer", "rng")
BN_MODES = ("frozen", "train")
MODES = ("all", "none", "up_to", "matching")
#: the longest regular expression ``FreezePolicy.matching`` takes
MAX_REGEX_LENGTH = 256
#: the most repeated parts (``*``, ``+``, ``{m,n}``) one expression may have
MAX_REGEX_REPEATS = 3
#: the longest layer name (or absolute index) ``FreezePolicy.up_to`` takes
MAX_TARGET_LENGTH = 1024
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT} | ({_sre.POSSESSIVE_REPEAT} if hasattr(_sre, "POSSESSIVE_REPEAT") else set())


def check_regex(pattern: str) -> None:
    r"""Refuse a regular expression that could make ``re.search`` backtrack for a very long time.

    Python's ``re`` backtracks and cannot be interrupted, so a pattern such as ``(.*.*)*Z`` (read from
    a checkpoint, say) would hang on a long enough name. The rules, cheap and conservative: at most
    :data:`MAX_REGEX_LENGTH` characters; no repeated group containing another repeat or an
    alternation (nested quantifiers: exponential time); at most :data:`MAX_REGEX_REPEATS` repeats
    (polynomial time of a low degree). Freeze patterns (``^layer[12]\.``, ``(conv|bn)\d+\.weight``)
    need neither.

    Raises:
        FreezePolicyError: the pattern is not a string, is invalid, or breaks a rule (the message says which).

    Example:
        >>> check_regex(r"^(conv|bn)\d+\.")
        >>> check_regex(r"(.*.*)*Z")
        Traceback (most recent call last):
        ...
        tlcore.errors.FreezePolicyError: FreezePolicy.matching: the regex '(.*.*)*Z' repeats a part that itself repeats or alternates (nested quantifiers can take exponential time); write it without nesting, e.g. '[ab]*' for '(a|b)*'
    """
    if not isinstance(pattern, str) or not pattern:
        raise FreezePolicyError(f"FreezePolicy.matching needs a non-empty regular expression, got {short_repr(pattern)}")
    if len(pattern) > MAX_REGEX_LENGTH:
        raise FreezePolicyError(f"FreezePolicy.matching: the regex has {len(pattern):,} characters, more than "
                                f"{MAX_REGEX_LENGTH}: {short_repr(pattern)}")
    try:
        parsed = _sre_parse.parse(pattern)
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise FreezePolicyError(f"FreezePolicy.matching: invalid regex {short_repr(pattern)}: {e}") from None
    repeats = 0
    stack = [(parsed, False)]  # (sub-pattern, inside a repeat of more than one)
    while stack:
        sub, inside = stack.pop()
        for op, av in sub:
            if op in _REPEATS and av[1] > 1:
                if inside:
                    raise FreezePolicyError(_NESTED.format(short_repr(pattern)))
                repeats += 1
                stack.append((av[2], True))
                continue
            if op is _sre.BRANCH and inside:
                raise FreezePolicyError(_NESTED.format(short_repr(pattern)))
            for item in (av if isinstance(av, (tuple, list)) else (av,)):
                for part in (item if isinstance(item, list) else (item,)):
                    if isinstance(part, _sre_parse.SubPattern):
                        stack.append((part, inside))
    if repeats > MAX_REGEX_REPEATS:
        raise FreezePolicyError(f"FreezePolicy.matching: the regex {short_repr(pattern)} has {repeats} repeated parts "
                                f"(*, +, {{m,n}}), more than {MAX_REGEX_REPEATS}; each one multiplies the time a "
                                "name takes to match")


_NESTED = ("FreezePolicy.matching: the regex {} repeats a part that itself repeats or alternates (nested "
           "quantifiers can take exponential time); write it without nesting, e.g. '[ab]*' for '(a|b)*'")


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
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise FreezePolicyError(unknown_name_message("freeze mode", short_repr(self.mode), MODES))
        if not isinstance(self.bn, str) or self.bn not in BN_MODES:
            raise FreezePolicyError(f"bn must be 'frozen' or 'train', got {short_repr(self.bn)}")
        if self.mode == "up_to":
            if isinstance(self.target, numbers.Integral) and not isinstance(self.target, bool):
                if abs(self.target) > MAX_TARGET_LENGTH:
                    raise FreezePolicyError(f"FreezePolicy.up_to: layer index {short_repr(self.target)} is out of "
                                            f"range (at most {MAX_TARGET_LENGTH} either way)")
                object.__setattr__(self, "target", int(self.target))
            elif not isinstance(self.target, str) or not 0 < len(self.target) <= MAX_TARGET_LENGTH:
                raise FreezePolicyError(f"FreezePolicy.up_to needs a layer name (at most {MAX_TARGET_LENGTH} "
                                        f"characters) or index, got {short_repr(self.target)}")
        elif self.mode == "matching":
            check_regex(self.target)
        elif self.target is not None:
            raise FreezePolicyError(f"FreezePolicy.{self.mode}() takes no target, got {short_repr(self.target)}")

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
        """The policy :meth:`to_dict` describes; every field is checked (e.g. when read from a file).

        Raises:
            FreezePolicyError: ``d`` is not such a dict, or a value is invalid.
        """
        if not isinstance(d, dict) or "mode" not in d:
            raise FreezePolicyError(f"a freeze policy is a dict with 'mode', 'target' and 'bn', got {short_repr(d)}")
        unknown = [k for k in d if k not in ("mode", "target", "bn")]
        if unknown:
            raise FreezePolicyError(f"unknown freeze policy field {short_repr(unknown[0])}; valid: mode, target, bn")
        return cls(d["mode"], d.get("target"), d.get("bn", "frozen"))

    def resolve(self, tensors: Sequence[TensorInfo], layers: Sequence[str],
                head: str | None = None, adapters: frozenset[str] = frozenset()) -> Resolved:
        """Resolve to a mask over ``tensors``; ``head`` names the attached head layer and
        ``adapters`` the LoRA tensors, never frozen.

        Raises:
            LayerNotFoundError: ``up_to`` names no layer (the message lists the valid ones).
            FreezePolicyError: ``up_to``/``matching`` would freeze no tensor.
        """
        base = [t for t in tensors if not (head and in_layer(t.layer, head)) and t.name not in adapters]
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
            if t.name in adapters:
                mask[t.name] = True
            elif t.kind == "param":
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
