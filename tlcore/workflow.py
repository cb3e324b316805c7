"""The transfer-learning workflow: wrap, cut, attach a head, freeze; save and rebuild from a checkpoint.

Example:
    >>> import tlcore as tl                                                      # doctest: +SKIP
    >>> ft = tl.finetune(tl.wrap(resnet), cut=tl.LayerCut(at="layer3"),
    ...                  head=tl.Head.linear(num_classes=5), freeze=tl.FreezePolicy.all())  # doctest: +SKIP
    >>> ft.save("ft.safetensors"); again = tl.load("ft.safetensors", model=resnet)          # doctest: +SKIP
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from . import adapters, checkpoint, data
from .adapters import Adapter
from .cut import LayerCut, kept_layers
from .errors import AdapterError, CheckpointError, UnsupportedModelError
from .freeze import FreezePolicy
from .head import Head, HeadPlan
from .model import Model
from .registry import backend_for, get_backend


def wrap(native: Any, backend: str | None = None, input_shape: tuple[int | None, ...] | None = None) -> Model:
    """Wrap a native model; ``backend`` is inferred from its type when None.

    The wrapped model starts fully trainable (``FreezePolicy.none()``); it shares the native
    object, so training it trains ``native``.

    Example:
        >>> m = tl.wrap(torch.nn.Sequential(torch.nn.Linear(4, 2)))   # doctest: +SKIP
        >>> m.backend                                                  # doctest: +SKIP
        'torch'
    """
    if isinstance(native, Model):
        return native
    input_shape = data.check_input_shape(input_shape)
    impl = get_backend(backend) if backend is not None else backend_for(native)
    if not impl.owns(native):
        raise UnsupportedModelError(
            f"backend {impl.name!r} cannot wrap an object of type {type(native).__qualname__}")
    return impl.wrap(native, input_shape=input_shape)


def finetune(model: Any, cut: LayerCut | None = None, head: Head | Any = None,
             freeze: FreezePolicy | None = None, input_shape: tuple[int, ...] | None = None,
             seed: int = 0, adapter: Adapter | None = None) -> Model:
    """Cut ``model``, attach ``head`` and ``adapter`` and apply ``freeze`` (default: freeze all that is kept).

    The result owns a copy of the weights: the original model is never modified. Every argument is
    checked before anything is built, and a bad one raises a named :class:`tl.TlcoreError`. The head
    sizes itself: when its input width is not known without data, it is built on the first batch
    that reaches it, with the same initial weights (they depend only on ``seed`` and its shape).

    Args:
        model: a :class:`Model` or a native model (wrapped first).
        cut: where to cut (default: keep everything).
        head: the new head: a :class:`tl.Head` spec, or your own head module of the model's framework
            (it takes the cut model's output as it is, trains, and is saved with the model); default
            none, e.g. to fine-tune the model as it is.
        freeze: what to freeze of the kept part (default ``FreezePolicy.all()``).
        input_shape: per-sample input shape; optional, checked against the data when given.
        seed: seeds the initial weights of the head and the adapters.
        adapter: LoRA adapters (:class:`tl.Adapter`) on the kept part's dense layers; they always
            train, and ``freeze`` applies to the rest.
    """
    for value, kind, name in ((cut, LayerCut, "cut"), (freeze, FreezePolicy, "freeze")):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"finetune({name}=...) takes a tl.{kind.__name__}, got {type(value).__name__}")
    seed = data.check_seed(seed)
    input_shape = data.check_input_shape(input_shape)
    model = wrap(model)
    model._require_head("a cut")
    if model._adapter is not None and not model._adapter.merged:
        raise AdapterError("tl.finetune: the model has LoRA adapters; merge() them first (or save_adapter() them and "
                           "load them onto a fresh base with tl.load_adapter)")
    weighted = {t.layer.split(".")[0] for t in model.tensors if t.kind in ("param", "bn_param") and t.layer}
    last = (cut or LayerCut()).resolve(model.layers, weighted)
    kept = model._cut(last, kept_layers(model.layers, last))
    if input_shape is not None:
        kept.input_shape = input_shape
    native_head = head is not None and not isinstance(head, Head)
    step = {"cut": last, "head": head.to_dict() if isinstance(head, Head) else None, "head_name": None,
            "native_head": native_head}
    kept.meta = {**model.meta, "steps": [*model.meta.get("steps", []), step]}
    if head is not None:
        # a name no layer of the original uses (a layer removed by the cut may still be an attribute)
        taken = set(model.layers) | set(kept.layers) | {t.name.split(".")[0] for t in kept._base_tensors()}
        step["head_name"] = next(n for n in ("head", *(f"head_{i}" for i in range(1, 100))) if n not in taken)
        if native_head:
            kept._attach_native(head, step["head_name"])
        else:
            kept._request_head(head, step["head_name"], seed)
    if adapter is not None:
        adapters.attach(kept, adapter, seed)
    return kept.freeze(freeze or FreezePolicy.all())


# ---------------------------------------------------------------------------- checkpoints
def save(model: Model, path: str | os.PathLike) -> Path:
    """Write ``model`` (weights, non-trainable state and how it was built) to ``path``, atomically."""
    return checkpoint.write(path, model.state(), model_meta(model))


def model_meta(model: Model) -> dict[str, Any]:
    """How ``model`` was built (the checkpoint metadata :func:`rebuild` replays)."""
    return {
        "backend": model.backend, "versions": get_backend(model.backend).versions(),
        "arch": model.meta.get("arch"), "config": model.meta.get("config"),
        "pretrained": model.meta.get("pretrained"), "steps": model.meta.get("steps", []),
        "policy": model.policy.to_dict(), "input_shape": model.input_shape,
        "layers": model.layers, "trainable": model.trainable_mask(),
        "adapter": model._adapter.spec.to_dict() if model._adapter and not model._adapter.merged else None,
    }


def fit_state_dict(model: Model, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` restricted to what ``model`` holds, ignoring PyTorch's BatchNorm counters;
    raises :class:`CheckpointMismatchError` listing every missing, unexpected or misshapen tensor."""
    current = model.state()
    counter = lambda k: k.endswith("num_batches_tracked")  # noqa: E731  (PyTorch-only BatchNorm counters)
    arrays = {k: v for k, v in arrays.items() if k in current or not counter(k)}
    problems = [f"missing {k!r} (model shape {current[k].shape})" for k in current if k not in arrays and not counter(k)]
    problems += [f"unexpected {k!r} (checkpoint shape {arrays[k].shape})" for k in arrays if k not in current]
    problems += [f"{k}: checkpoint {arrays[k].shape} vs model {current[k].shape}"
                 for k in current if k in arrays and arrays[k].shape != current[k].shape]
    if problems:
        raise checkpoint.CheckpointMismatchError(
            f"the weights do not fit this {model.meta.get('arch') or 'model'} ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems[:50]))
    return {k: arrays[k] for k in current if k in arrays}


def load(path: str | os.PathLike, backend: str | None = None, model: Any = None, head: Any = None) -> Model:
    """Restore a saved model on ``backend`` (default: the one it was saved from).

    Zoo models (fine-tuned ones included: cut, head and policy are replayed) load on any backend.
    A wrapped native model is rebuilt from ``model``, the same native architecture, on its backend;
    a model fine-tuned with your own head module needs that module again as ``head`` (its weights
    come from the file). Nothing is returned unless every tensor fits.

    The file is verified (its SHA-256 covers the tensors and the metadata) and every metadata field is
    checked (types, bounds, the parameters it describes) before anything is built, so a damaged or
    hostile file is refused with a one-line :class:`tl.CheckpointError`, never a crash, a hang or a
    huge allocation.

    Raises:
        tl.CheckpointError (and its subclasses): missing, corrupted, foreign or mismatched files.
    """
    tensors, meta = checkpoint.read(path)
    if adapters.FILE_KEY in meta:
        raise checkpoint.NotACheckpointError(f"{str(path)!r} holds LoRA adapters only; load them onto their base "
                                             "with tl.load_adapter(base, path)")
    if "train" in meta:
        raise checkpoint.NotACheckpointError(
            f"{str(path)!r} is a training state written by fit(checkpoint_dir=...); continue the run (or get its "
            "model) with tl.resume(<its folder>)")
    return rebuild(tensors, meta, path, backend=backend, model=model, head=head)


def rebuild(tensors: dict[str, np.ndarray], meta: dict[str, Any], path: str | os.PathLike,
            backend: str | None = None, model: Any = None, head: Any = None) -> Model:
    """The model a checkpoint's ``meta`` describes (see :func:`load`), with ``tensors`` loaded and its
    freeze policy applied; ``path`` names the file in errors. ``meta`` is checked first
    (:func:`check_record`); an error replaying it is a :class:`tl.CheckpointError` naming the file."""
    from .errors import TlcoreError
    from .registry import get_backend, specs
    from .zoo import _build

    record = check_record(meta, path, tensors)
    shown = str(path)
    if model is not None:
        base = wrap(model, backend=backend)
    elif record["arch"]:
        name = backend or record["backend"]
        if backend is None and name not in specs():
            raise CheckpointError(f"{shown!r}: metadata field backend names no tlcore backend: {name!r}; load it "
                                  "with tl.load(path, backend='torch') (or 'keras', 'jax')")
        get_backend(name)  # an uninstalled backend: tl.BackendNotFoundError, as for tl.zoo.create
        base = _build(record["arch"], name, record["config"])
        base.meta["pretrained"] = record["pretrained"]
    else:
        raise CheckpointError(f"{shown!r} holds a wrapped {record['backend']} model that is not from the zoo; pass "
                              f"the same architecture as model=<native {record['backend']} model> (tl.load(path, "
                              "model=...) or tl.resume(folder, model=...))")
    try:
        for i, step in enumerate(record["steps"]):
            spec = step["head"]
            if step["native_head"]:
                if head is None:
                    raise CheckpointError(f"{shown!r} was fine-tuned with its own head module; pass the same "
                                          "architecture as tl.load(path, model=..., head=<native head module>)")
                spec = head
            base = finetune(base, cut=LayerCut(at=step["cut"]) if step["cut"] else None, head=spec,
                            freeze=FreezePolicy.none(), input_shape=record["input_shape"])
            if not base.head_built:  # sized from the recorded width, not from data
                if step["head_width"] is None:
                    raise CheckpointError(f"{shown!r}: metadata steps[{i}] has no head_width to size its head with")
                base._build_head(HeadPlan(spec, step["head_width"]))
        if record["adapter"] is not None:
            adapters.attach(base, record["adapter"], 0)
        base.load_state(fit_state_dict(base, tensors))
        base.freeze(record["policy"])
    except CheckpointError as e:
        message = checkpoint.single_line(e)
        raise type(e)(message if shown in message else f"{shown!r}: {message}") from None
    except TlcoreError as e:  # a cut, head or policy of the file that does not fit the model it describes
        raise CheckpointError(f"{shown!r}: its metadata does not fit the model it describes: "
                              f"{checkpoint.single_line(e)}") from e
    return base


#: the most fine-tuning steps a checkpoint may record
MAX_STEPS = 16
#: the most values per sample an input shape read from a checkpoint may describe (2**22: e.g.
#: 1182 x 1182 x 3), so that sizing a head on it cannot exhaust memory
MAX_INPUT_VALUES = 2 ** 22


def check_record(meta: Any, path: str | os.PathLike, tensors: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The checkpoint record ``meta`` (as :func:`model_meta` writes it) with every field checked and
    parsed, before anything is built: types, bounds, the zoo config (:func:`tlcore.zoo.archs.config_for`:
    at most ``tlcore.zoo.MAX_PARAMS`` parameters), heads (:class:`tl.Head`), the freeze policy (a safe
    regex), the input shape; with ``tensors``, the shapes the zoo config and the last head describe
    against the tensors the file holds (so a model bigger than the file is never built).
    Fields it does not replay (``versions``, ``layers``, ``trainable``) are checked for their types.

    Returns:
        ``{"backend", "arch", "config", "pretrained", "steps", "policy", "input_shape", "versions",
        "layers", "trainable"}``; steps as ``{"cut", "head": Head | None, "head_name", "native_head",
        "head_width"}``, the policy as a :class:`tl.FreezePolicy`.

    Raises:
        tl.CheckpointError: one line naming the file, the field and what it should be.
    """
    from .data import check_input_shape
    from .errors import TlcoreError, short_repr
    from .zoo.archs import ARCHITECTURES, check_activation, config_for, input_shape_for, state_shapes

    shown = str(path)

    def bad(field: str, what: str) -> CheckpointError:
        return CheckpointError(f"{shown!r}: metadata field {field} {what}")

    def text(field: str, value: Any, optional: bool = False, limit: int = 1024) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not 0 < len(value) <= limit:
            raise bad(field, f"must be a{'' if not optional else 'n optional'} string of 1 to {limit} characters, "
                             f"got {short_repr(value)}")
        return value

    if not isinstance(meta, dict):
        raise CheckpointError(f"{shown!r}: its metadata must be a JSON object, got {short_repr(meta)}")
    out: dict[str, Any] = {"backend": text("backend", meta.get("backend"), limit=64)}
    arch = text("arch", meta.get("arch"), optional=True, limit=64)
    if arch is not None and arch not in ARCHITECTURES:
        raise bad("arch", f"names no zoo architecture: {short_repr(arch)}; valid: {sorted(ARCHITECTURES)}")
    out["arch"] = arch
    config = meta.get("config")
    if arch is not None:
        try:
            config = config_for(arch, config)
        except TlcoreError as e:
            raise bad("config", f"is invalid: {checkpoint.single_line(e)}") from None
    elif config is not None and not isinstance(config, dict):
        raise bad("config", f"must be an object or null, got {short_repr(config)}")
    out["config"] = config
    out["pretrained"] = text("pretrained", meta.get("pretrained"), optional=True, limit=64)

    steps = meta.get("steps", [])
    if not isinstance(steps, list) or len(steps) > MAX_STEPS:
        raise bad("steps", f"must be a list of at most {MAX_STEPS} fine-tuning steps, got {short_repr(steps)}")
    out["steps"] = []
    for i, step in enumerate(steps):
        field = f"steps[{i}]"
        if not isinstance(step, dict):
            raise bad(field, f"must be an object, got {short_repr(step)}")
        native = step.get("native_head", False)
        if not isinstance(native, bool):
            raise bad(f"{field}.native_head", f"must be true or false, got {short_repr(native)}")
        spec = step.get("head")
        if spec is not None:
            if native:
                raise bad(f"{field}.head", "must be null for a native head module")
            try:
                spec = Head.from_dict(spec)
            except TlcoreError as e:
                raise bad(f"{field}.head", f"is invalid: {checkpoint.single_line(e)}") from None
        width = step.get("head_width")
        if width is not None:
            if spec is None or isinstance(width, bool) or not isinstance(width, int):
                raise bad(f"{field}.head_width", f"must be an int for a tl.Head's input width, got {short_repr(width)}")
            try:
                HeadPlan(spec, width)
            except TlcoreError as e:
                raise bad(f"{field}.head_width", f"is invalid: {checkpoint.single_line(e)}") from None
        out["steps"].append({"cut": text(f"{field}.cut", step.get("cut"), optional=True), "head": spec,
                             "head_name": text(f"{field}.head_name", step.get("head_name"), optional=True, limit=256),
                             "native_head": native, "head_width": width})

    out["adapter"] = meta.get("adapter")
    if out["adapter"] is not None:
        try:
            out["adapter"] = Adapter.from_dict(out["adapter"])
        except TlcoreError as e:
            raise bad("adapter", f"is invalid: {checkpoint.single_line(e)}") from None
        if isinstance(out["adapter"].targets, str):
            raise bad("adapter.targets", f"must list the adapted modules, got {short_repr(out['adapter'].targets)}")
    try:
        out["policy"] = FreezePolicy.from_dict(meta.get("policy"))
    except TlcoreError as e:
        raise bad("policy", f"is invalid: {checkpoint.single_line(e)}") from None

    shape = meta.get("input_shape")
    if shape is not None:
        if not isinstance(shape, list) or not 1 <= len(shape) <= 8:
            raise bad("input_shape", f"must be null or a list of 1 to 8 sizes, got {short_repr(shape)}")
        try:
            shape = check_input_shape(shape)
        except TlcoreError as e:
            raise bad("input_shape", f"is invalid: {checkpoint.single_line(e)}") from None
        known = [d for d in shape if d is not None]
        if any(d > MAX_INPUT_VALUES for d in known) or int(np.prod(known, dtype=object)) > MAX_INPUT_VALUES:
            raise bad("input_shape", f"{short_repr(shape)} describes more than {MAX_INPUT_VALUES:,} values per sample")
        if arch is not None:
            expected = input_shape_for(arch, config)
            if len(shape) != len(expected) or any(e is not None and d != e for d, e in zip(shape, expected)):
                raise bad("input_shape", f"{short_repr(shape)} does not fit a {arch} that takes {expected}")
            try:
                check_activation(arch, config, shape)
            except TlcoreError as e:
                raise bad("input_shape", f"is invalid: {checkpoint.single_line(e)}") from None
    out["input_shape"] = shape

    versions = meta.get("versions", {})
    if not isinstance(versions, dict) or len(versions) > 64 or not all(
            isinstance(v, str) and len(k) <= 64 and len(v) <= 256 for k, v in versions.items()):
        raise bad("versions", f"must be an object of framework versions (strings), got {short_repr(versions)}")
    out["versions"] = versions
    layers = meta.get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(x, str) and len(x) <= 1024 for x in layers):
        raise bad("layers", f"must be a list of layer names, got {short_repr(layers)}")
    out["layers"] = layers
    trainable = meta.get("trainable", {})
    if not isinstance(trainable, dict) or not all(isinstance(v, bool) for v in trainable.values()):
        raise bad("trainable", f"must be an object of true/false per tensor, got {short_repr(trainable)}")
    out["trainable"] = trainable
    if tensors is not None and arch is not None:  # what the config describes and the file holds: the same
        shapes = state_shapes(arch, config)
        for name, shape in shapes.items():
            held = tensors.get(name)
            if held is None and not out["steps"]:  # the whole zoo model is in the file
                raise bad("config", f"describes a {arch} with a tensor {name} {shape}, which the file lacks")
            if held is not None and tuple(held.shape) != shape:
                raise bad("config", f"describes {name} of shape {shape}, but the file holds {tuple(held.shape)}")
    if tensors is not None and out["steps"]:
        _check_last_head(out["steps"][-1], tensors, bad)
    return out


def _check_last_head(step: dict[str, Any], tensors: dict[str, np.ndarray], bad) -> None:
    """The head the last step attaches is in the final model: the file must hold its tensors with the
    sizes the head spec says (checked before the model, and the head, are built)."""
    spec, name = step["head"], step["head_name"]
    if spec is None or name is None:
        return
    sizes = [*spec.hidden, spec.num_classes]
    layers = [f"fc{i}" for i in range(len(spec.hidden))] + ["out"]
    for i, (layer, size) in enumerate(zip(layers, sizes)):
        weight, bias = tensors.get(f"{name}.{layer}.weight"), tensors.get(f"{name}.{layer}.bias")
        fan_in = step["head_width"] if i == 0 else sizes[i - 1]
        if weight is None or bias is None or weight.ndim != 2 or weight.shape[0] != size or bias.shape != (size,) \
                or (fan_in is not None and weight.shape[1] != fan_in):
            found = None if weight is None else tuple(weight.shape)
            raise bad("steps[-1].head", f"describes a layer {name}.{layer} of {size} outputs"
                      f"{'' if fan_in is None else f' from {fan_in} inputs'}, but the file holds "
                      f"{name}.{layer}.weight of shape {found}")
