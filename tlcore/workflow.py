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

from . import checkpoint, data
from .cut import LayerCut, kept_layers
from .errors import CheckpointError, UnsupportedModelError
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
             seed: int = 0) -> Model:
    """Cut ``model``, attach ``head`` and apply ``freeze`` (default: freeze all that is kept).

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
        seed: seeds the head's initial weights.
    """
    for value, kind, name in ((cut, LayerCut, "cut"), (freeze, FreezePolicy, "freeze")):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"finetune({name}=...) takes a tl.{kind.__name__}, got {type(value).__name__}")
    seed = data.check_seed(seed)
    input_shape = data.check_input_shape(input_shape)
    model = wrap(model)
    model._require_head("a cut")
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
    return kept.freeze(freeze or FreezePolicy.all())


# ---------------------------------------------------------------------------- checkpoints
def save(model: Model, path: str | os.PathLike) -> Path:
    """Write ``model`` (weights, non-trainable state and how it was built) to ``path``, atomically."""
    meta = {
        "backend": model.backend, "versions": get_backend(model.backend).versions(),
        "arch": model.meta.get("arch"), "config": model.meta.get("config"),
        "pretrained": model.meta.get("pretrained"), "steps": model.meta.get("steps", []),
        "policy": model.policy.to_dict(), "input_shape": model.input_shape,
        "layers": model.layers, "trainable": model.trainable_mask(),
    }
    return checkpoint.write(path, model.state(), meta)


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

    Raises:
        tl.CheckpointError (and its subclasses): missing, corrupted, foreign or mismatched files.
    """
    from .zoo import _build

    tensors, meta = checkpoint.read(path)
    if model is not None:
        base = wrap(model, backend=backend)
    elif meta.get("arch"):
        base = _build(meta["arch"], backend or meta["backend"], meta["config"])
        base.meta["pretrained"] = meta.get("pretrained")
    else:
        raise CheckpointError(f"{str(path)!r} holds a wrapped {meta['backend']} model that is not from the zoo; "
                              f"pass the same architecture as tl.load(path, model=<native {meta['backend']} model>)")
    for step in meta.get("steps", []):
        spec = Head.from_dict(step["head"]) if step["head"] else None
        if step.get("native_head"):
            if head is None:
                raise CheckpointError(f"{str(path)!r} was fine-tuned with its own head module; pass the same "
                                      "architecture as tl.load(path, model=..., head=<native head module>)")
            spec = head
        base = finetune(base, cut=LayerCut(at=step["cut"]) if step["cut"] else None, head=spec,
                        freeze=FreezePolicy.none(), input_shape=meta.get("input_shape"))
        if not base.head_built:  # sized from the recorded width, not from data
            base._build_head(HeadPlan(spec, int(step["head_width"])))
    base.load_state(fit_state_dict(base, tensors))
    base.freeze(FreezePolicy.from_dict(meta["policy"]))
    return base
