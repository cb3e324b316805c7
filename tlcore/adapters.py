r"""LoRA adapters: one spec (:class:`Adapter`), the same tensors and guarantees on every backend.

An adapted layer computes ``base(x) + scale * dropout(x) @ A.T @ B.T`` (PEFT's LoRA) with
``scale = alpha / rank``. Its adapter tensors are ``<module>.lora_A`` (rank, in) and
``<module>.lora_B`` (out, rank) in ``state()``, in these layouts on every backend (PEFT's), always
trainable; ``A`` starts uniform in +-1/sqrt(in) (PEFT's default), seeded by name, ``B`` at zero, so an
adapted model starts with its base's outputs, bit for bit.

* :meth:`Model.merge` folds the adapters into the kernels (``W + scale * B @ A`` in float32), in place,
  keeping a copy of the kernels, so :meth:`Model.unmerge` restores them bit for bit (never by
  subtraction).
* :meth:`Model.save_adapter` writes the adapters and the head with the base's fingerprint (SHA-256 of
  every other tensor as it is when saved); :func:`load_adapter` replays the cut, head and adapter on a base, on any
  backend, and refuses a base whose fingerprint differs.
* :meth:`Adapter.from_peft` reads a Hugging Face PEFT adapter (``adapter_model.safetensors`` and
  ``adapter_config.json``).

Example:
    >>> import tlcore as tl
    >>> spec = tl.Adapter.lora(rank=8, alpha=16, targets=r"attn\.(qkv|proj)|mlp\.fc\d")
    >>> spec.scale
    2.0
    >>> tl.Adapter.lora(rank=0)
    Traceback (most recent call last):
    ...
    tlcore.errors.AdapterError: Adapter.lora: rank must be an int from 1 to 65536, got 0
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import checkpoint
from .errors import AdapterError, TlcoreError, short_repr
from .freeze import check_regex

if TYPE_CHECKING:
    from .model import Model

#: what ``targets="all-linear"`` means: every dense layer outside the head (PEFT's word)
ALL_LINEAR = "all-linear"
MAX_RANK = 2 ** 16
#: the most layer names ``targets`` may list
MAX_TARGETS = 100_000
#: the metadata field that marks a file written by :meth:`Model.save_adapter`
FILE_KEY = "lora_adapter"
#: tensor kinds the base fingerprint covers (random state and PyTorch's BatchNorm counters are not weights)
FINGERPRINT_KINDS = ("param", "bn_param", "bn_stat", "buffer")


@dataclass(frozen=True)
class LoraTarget:
    """A layer LoRA can adapt, as a backend reports it (``Model._lora_targets``).

    ``module``: its path (the tensor names' prefix, e.g. ``blocks.0.attn.qkv``), matched by
    ``Adapter.targets``; ``kernel``: the name of its weight in ``state()``; ``in_features`` /
    ``out_features``: its widths; ``transposed``: ``state()`` holds the kernel as (in, out) (Keras'
    and Flax's own layout) rather than PyTorch's (out, in)."""

    module: str
    kernel: str
    in_features: int
    out_features: int
    transposed: bool = False


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter spec; build it with :meth:`lora` (or :meth:`from_peft`).

    ``targets``: a regex searched in each dense layer's module path, ``"all-linear"`` (every dense
    layer outside the head) or a list of exact module paths. ``weights``: initial ``{module: (A, B)}``
    (from :meth:`from_peft`), else drawn as PEFT does.
    """

    rank: int
    alpha: float
    targets: str | tuple[str, ...] = ALL_LINEAR
    dropout: float = 0.0
    kind: str = "lora"
    weights: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind != "lora":
            raise AdapterError(f"unknown adapter kind {short_repr(self.kind)}; valid: 'lora'")
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) or not 1 <= self.rank <= MAX_RANK:
            raise AdapterError(f"Adapter.lora: rank must be an int from 1 to {MAX_RANK}, got {short_repr(self.rank)}")
        object.__setattr__(self, "rank", int(self.rank))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not (
                math.isfinite(self.alpha) and 0 < self.alpha <= 1e6):
            raise AdapterError(f"Adapter.lora: alpha must be a finite number in (0, 1e6], got {short_repr(self.alpha)}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or not 0 <= self.dropout < 1:
            raise AdapterError(f"Adapter.lora: dropout must be a number in [0, 1), got {short_repr(self.dropout)}")
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "targets", _check_targets(self.targets))

    @classmethod
    def lora(cls, rank: int = 8, alpha: float | None = None, targets: str | Sequence[str] = ALL_LINEAR,
             dropout: float = 0.0) -> Adapter:
        r"""LoRA of ``rank`` on the dense layers ``targets`` selects, scaled by ``alpha / rank``
        (``alpha`` defaults to ``rank``: scale 1), with ``dropout`` on the adapters' input.

        Example:
            >>> Adapter.lora(rank=4, targets=r"mlp\.fc\d").to_dict()["targets"]
            'mlp\\.fc\\d'
        """
        return cls(rank, rank if alpha is None else alpha, targets, dropout)

    @property
    def scale(self) -> float:
        """``alpha / rank``: the factor on ``B @ A``."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "targets": targets, "dropout": self.dropout}

    @classmethod
    def from_dict(cls, d: Any) -> Adapter:
        """The spec :meth:`to_dict` describes; every field is checked (e.g. when read from a file)."""
        fields = ("kind", "rank", "alpha", "targets", "dropout")
        if not isinstance(d, dict) or any(k not in d for k in fields) or len(d) != len(fields):
            raise AdapterError(f"an adapter spec is a dict with exactly {list(fields)}, got {short_repr(d)}")
        return cls(d["rank"], d["alpha"], d["targets"], d["dropout"], d["kind"])

    @classmethod
    def from_peft(cls, path: str | os.PathLike, config: str | os.PathLike | Mapping | None = None) -> Adapter:
        """A Hugging Face PEFT LoRA adapter: its weights (``adapter_model.safetensors``, or a
        weights-only ``adapter_model.bin``) in PEFT's layout (A (r, in), B (out, r)) and its
        ``adapter_config.json`` (default: the one beside the weights; or the config as a dict).
        Module paths lose PEFT's ``base_model.model.`` prefix, so they name the modules of the model
        PEFT wrapped. ``use_rslora`` is kept (scale ``alpha / sqrt(r)``); DoRA, adapter biases,
        ``modules_to_save`` and per-module ranks are refused.

        Example:
            >>> ft = tl.finetune(model, adapter=tl.Adapter.from_peft("out/adapter_model.safetensors"))  # doctest: +SKIP
        """
        path = Path(path)
        cfg = _peft_config(path, config)
        arrays = checkpoint.read_state_dict(path)
        pattern = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")
        pairs: dict[str, dict[str, np.ndarray]] = {}
        for key, value in arrays.items():
            m = pattern.match(key)
            if m is None:
                raise AdapterError(f"{str(path)!r}: tensor {key!r} is not a LoRA weight (<module>.lora_A.weight or "
                                   ".lora_B.weight); adapters with other tensors (DoRA, biases, modules_to_save) "
                                   "are not supported")
            pairs.setdefault(m.group(1), {})[m.group(2)] = np.asarray(value)
        if not pairs:
            raise AdapterError(f"{str(path)!r} holds no LoRA weights")
        weights = {}
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{str(path)!r}: module {module!r} has lora_{''.join(ab)} but not both A and B")
            weights[module] = (ab["A"], ab["B"])
        rank = cfg["r"]
        alpha = cfg["lora_alpha"] * (math.sqrt(rank) if cfg.get("use_rslora") else 1.0)
        spec = cls(rank, alpha, tuple(weights), cfg.get("lora_dropout", 0.0) or 0.0)
        object.__setattr__(spec, "weights", weights)
        return spec

    # ------------------------------------------------------------------ resolving on a model
    def select(self, candidates: Sequence[LoraTarget]) -> list[LoraTarget]:
        """The ``candidates`` ``targets`` names, each checked against ``rank``.

        Raises:
            AdapterError: nothing matches (the message lists the candidates), a listed module is not
                one, or ``rank`` exceeds a target's smaller width.
        """
        names = [c.module for c in candidates]
        if not candidates:
            raise AdapterError("LoRA: the model has no dense layer outside its head (nn.Linear, keras Dense, "
                               "nnx.Linear) to adapt")
        if self.targets == ALL_LINEAR:
            chosen = list(candidates)
        elif isinstance(self.targets, str):
            chosen = [c for c in candidates if re.search(self.targets, c.module)]
            if not chosen:
                raise AdapterError(f"LoRA targets {self.targets!r} match no dense layer; candidates: {_listing(names)}")
        else:
            unknown = [t for t in self.targets if t not in names]
            if unknown:
                raise AdapterError(f"LoRA targets name {len(unknown)} module(s) that are not dense layers of this "
                                   f"model: {_listing(unknown, 5)}; candidates: {_listing(names)}")
            wanted = set(self.targets)
            chosen = [c for c in candidates if c.module in wanted]
        for c in chosen:
            if self.rank > min(c.in_features, c.out_features):
                raise AdapterError(f"LoRA rank {self.rank} exceeds the smaller width of {c.module!r} "
                                   f"({c.in_features} -> {c.out_features}); use rank <= "
                                   f"{min(c.in_features, c.out_features)} or leave it out of targets")
        return chosen

    def values(self, target: LoraTarget, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Initial ``(A, B)`` for ``target``: the given weights, else A uniform in +-1/sqrt(in) (PEFT's
        Kaiming-uniform) seeded by ``seed`` and the tensor's name, and B zero."""
        shapes = (self.rank, target.in_features), (target.out_features, self.rank)
        if self.weights is not None:
            given = tuple(np.asarray(w) for w in self.weights[target.module])
            for name, w, shape in zip(("lora_A", "lora_B"), given, shapes):
                if w.shape != shape or w.dtype.kind != "f" or not np.isfinite(w).all():
                    raise AdapterError(f"LoRA weight {target.module}.{name}: expected finite floats of shape {shape} "
                                       f"(rank {self.rank}, {target.in_features} -> {target.out_features}), got "
                                       f"{w.dtype} {w.shape}")
            return given[0].astype(np.float32), given[1].astype(np.float32)
        rng = np.random.default_rng([seed, zlib.crc32(f"{target.module}.lora_A".encode())])
        bound = 1.0 / math.sqrt(target.in_features)
        return rng.uniform(-bound, bound, shapes[0]).astype(np.float32), np.zeros(shapes[1], np.float32)


def _check_targets(targets: Any) -> str | tuple[str, ...]:
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            try:
                check_regex(targets)
            except TlcoreError as e:
                raise AdapterError(str(e).replace("FreezePolicy.matching", "LoRA targets")) from None
        return targets
    if not isinstance(targets, (list, tuple)) or not 0 < len(targets) <= MAX_TARGETS or not all(
            isinstance(t, str) and 0 < len(t) <= 1024 for t in targets):
        raise AdapterError(f"LoRA targets must be a regex, 'all-linear' or a list of 1 to {MAX_TARGETS:,} module "
                           f"paths, got {short_repr(targets)}")
    return tuple(targets)


def _listing(names: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _peft_config(path: Path, config: str | os.PathLike | Mapping | None) -> dict[str, Any]:
    if config is None:
        config = path.with_name("adapter_config.json")
    if not isinstance(config, Mapping):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError) as e:
            raise AdapterError(f"cannot read the PEFT config {str(config)!r}: {e}") from None
    cfg = dict(config)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"the PEFT config is of type {short_repr(cfg.get('peft_type'))}; only LORA adapters load")
    for key, why in (("use_dora", "DoRA"), ("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas"),
                     ("modules_to_save", "modules_to_save (load those weights with load_state)")):
        if cfg.get(key):
            raise AdapterError(f"the PEFT config uses {why}, which tlcore's LoRA does not support")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"the PEFT config trains biases (bias={cfg['bias']!r}); only bias='none' loads")
    if "r" not in cfg or "lora_alpha" not in cfg:
        raise AdapterError(f"the PEFT config needs 'r' and 'lora_alpha', got keys {sorted(cfg)}")
    return cfg


# ---------------------------------------------------------------------------- on a model
@dataclass
class AdapterState:
    """The adapters a model holds: their spec, the targets they adapt and, after :func:`merge`, what
    :func:`unmerge` restores."""

    spec: Adapter
    targets: list[LoraTarget]
    merged: bool = False
    lora: dict[str, np.ndarray] = field(default_factory=dict)
    kernels: dict[str, np.ndarray] | None = None

    @property
    def modules(self) -> list[str]:
        return [t.module for t in self.targets]

    def tensor_names(self) -> set[str]:
        return set() if self.merged else {f"{m}.lora_{ab}" for m in self.modules for ab in "AB"}


def fingerprint(model: Model, exclude: set[str] = frozenset()) -> str:
    """SHA-256 of the model's base: every weight, statistic and buffer outside the head and the
    adapters (names, dtypes, shapes, bytes), the same on every backend for a zoo model."""
    from .cut import in_layer

    state = model._read_state()
    names = [t.name for t in model._base_tensors() if t.kind in FINGERPRINT_KINDS and t.name not in exclude
             and not t.name.endswith("num_batches_tracked") and not (model._head and in_layer(t.layer, model._head))]
    return checkpoint.digest({n: state[n] for n in names})


def attach(model: Model, spec: Adapter, seed: int) -> None:
    """Add ``spec``'s adapters to ``model`` in place (every check before the first one is added)."""
    if not isinstance(spec, Adapter):
        raise TypeError(f"adapter= takes a tl.Adapter (e.g. tl.Adapter.lora(rank=8)), got {type(spec).__name__}")
    if model._adapter is not None:
        raise AdapterError("the model already has LoRA adapters; merge() them first to add new ones")
    targets = spec.select(model._lora_targets())
    values = {t.module: spec.values(t, seed) for t in targets}
    state = AdapterState(Adapter(spec.rank, spec.alpha, tuple(values), spec.dropout), targets)
    added = []
    try:
        for t in targets:
            model._add_lora(t, spec.scale, spec.dropout, *values[t.module])
            added.append(t.module)
    except BaseException:
        for module in reversed(added):
            model._remove_lora(module)
        raise
    model._adapter = state
    _restructured(model)


def _restructured(model: Model) -> None:
    model._infos = None
    model._changed()
    model.freeze(model.policy)


def merge(model: Model, keep_base: bool = True) -> Model:
    """Fold the adapters into their kernels, in place (see :meth:`Model.merge`)."""
    state = model._adapter
    if state is None:
        raise AdapterError("merge(): the model has no LoRA adapters (tl.finetune(..., adapter=tl.Adapter.lora(...)))")
    if state.merged:
        raise AdapterError("merge(): the adapters are merged already; unmerge() first to merge again")
    current = model._read_state()
    prefixes = tuple(f"{m}.lora_" for m in state.modules)  # A, B and any random state of the adapters' dropout
    lora = {n: v.copy() for n, v in current.items() if n.startswith(prefixes)}
    merged, kept = {}, {}
    for t in state.targets:
        a, b = lora[f"{t.module}.lora_A"].astype(np.float32), lora[f"{t.module}.lora_B"].astype(np.float32)
        delta = np.float32(state.spec.scale) * (b @ a)
        kernel = current[t.kernel]
        merged[t.kernel] = (kernel.astype(np.float32) + (delta.T if t.transposed else delta)).astype(kernel.dtype)
        if keep_base:
            kept[t.kernel] = kernel.copy()
    for t in state.targets:
        model._remove_lora(t.module)
    model._write_state(merged)
    state.merged, state.lora, state.kernels = True, lora, kept if keep_base else None
    _restructured(model)
    return model


def unmerge(model: Model) -> Model:
    """Undo :func:`merge`, in place: the stored kernels back, bit for bit, and the adapters as they were."""
    state = model._adapter
    if state is None or not state.merged:
        raise AdapterError("unmerge(): the model has no merged LoRA adapters (merge() first)")
    if state.kernels is None:
        raise AdapterError("unmerge(): the adapters were merged with keep_base=False, so the original kernels "
                           "are gone; merge(keep_base=True) keeps them")
    for t in state.targets:
        model._add_lora(t, state.spec.scale, state.spec.dropout, state.lora[f"{t.module}.lora_A"],
                        state.lora[f"{t.module}.lora_B"])
    model._write_state({**state.kernels, **state.lora})
    state.merged, state.lora, state.kernels = False, {}, None
    _restructured(model)
    return model


def save_adapter(model: Model, path: str | os.PathLike) -> Path:
    """Write the adapters and the head of ``model`` with its base's fingerprint (see :meth:`Model.save_adapter`)."""
    from .cut import in_layer

    state = model._adapter
    if state is None or state.merged:
        raise AdapterError("save_adapter(): the model has no " + ("unmerged " if state else "") + "LoRA adapters"
                           + ("; unmerge() first, or save the merged model whole with save()" if state else ""))
    model._require_head("save_adapter()")
    current = model._read_state()
    head = [t.name for t in model._base_tensors() if model._head and in_layer(t.layer, model._head)]
    tensors = {n: current[n] for n in sorted(state.tensor_names()) + head}
    steps = model.meta.get("steps", [])
    meta = {FILE_KEY: {"spec": state.spec.to_dict(), "fingerprint": fingerprint(model, state.tensor_names()),
                       "step": steps[-1] if steps else None},
            "backend": model.backend, "arch": model.meta.get("arch"), "config": model.meta.get("config")}
    return checkpoint.write(path, tensors, meta)


def load_adapter(base: Any, path: str | os.PathLike, head: Any = None) -> Model:
    """``base`` (the model the adapter's model was fine-tuned from, on any backend) with the cut, head
    and adapters of the file at ``path`` (written by :meth:`Model.save_adapter`); ``base`` itself is
    not changed. ``head``: your own head module again, when the adapter's model had one.

    Raises:
        AdapterError: the file was written for another base (its fingerprint differs) or holds no adapter.
        tl.CheckpointError: a missing or damaged file.

    Example:
        >>> ft = tl.load_adapter(tl.zoo.create("vit_tiny", backend="jax"), "a.safetensors")  # doctest: +SKIP
    """
    from .cut import LayerCut
    from .head import Head, HeadPlan
    from .workflow import finetune

    tensors, meta = checkpoint.read(path)
    shown = str(path)
    record = meta.get(FILE_KEY)
    if not isinstance(record, dict):
        raise AdapterError(f"{shown!r} is not a LoRA adapter file (write one with ft.save_adapter(path)); a whole "
                           "model loads with tl.load(path)")
    spec = Adapter.from_dict(record.get("spec"))
    if isinstance(spec.targets, str):
        raise AdapterError(f"{shown!r}: its adapter spec must list module paths, got {spec.targets!r}")
    expected = record.get("fingerprint")
    step = record.get("step") or {}
    if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected) or not isinstance(step, dict):
        raise AdapterError(f"{shown!r}: its metadata needs a 64-hex fingerprint and a step object")
    cut, head_name = step.get("cut"), step.get("head_name")
    if cut is not None and not isinstance(cut, str):
        raise AdapterError(f"{shown!r}: metadata step.cut must be a layer name or null, got {short_repr(cut)}")
    if step.get("native_head"):
        if head is None:
            raise AdapterError(f"{shown!r} was trained with your own head module; pass it again: "
                               "tl.load_adapter(base, path, head=<native head module>)")
        head_spec = head
    else:
        head_spec = Head.from_dict(step["head"]) if step.get("head") is not None else None
    ft = finetune(base, cut=LayerCut(at=cut) if cut else None,
                  head=head_spec, adapter=spec)
    if head_spec is not None and not ft.head_built:
        width = step.get("head_width")
        if isinstance(width, bool) or not isinstance(width, int):
            raise AdapterError(f"{shown!r}: metadata step.head_width must be the head's input width, got "
                               f"{short_repr(width)}")
        ft._build_head(HeadPlan(head_spec, width))
    found = fingerprint(ft, ft._adapter.tensor_names())
    if found != expected:
        what = "its weights" if cut is None else f"its weights, or the cut at {cut!r},"
        raise AdapterError(f"{shown!r} was trained on another base: its fingerprint is {expected[:12]}..., this "
                           f"base's is {found[:12]}... ({what} differ); load it onto the model it was fine-tuned "
                           "from, with the base weights it had when it was saved")
    if head_name is not None and head_name != ft.head:
        raise AdapterError(f"{shown!r}: its head is named {head_name!r}, this fine-tune's is {ft.head!r}")
    ft.load_state(tensors, strict=False)
    return ft

