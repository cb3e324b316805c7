"""The transfer-learning workflow in one call: wrap, cut, attach a head, freeze.

Example:
    >>> import tlcore as tl                                                      # doctest: +SKIP
    >>> ft = tl.finetune(tl.wrap(resnet), cut=tl.LayerCut(at="layer3"),
    ...                  head=tl.Head.linear(num_classes=5), freeze=tl.FreezePolicy.all())  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any

from .cut import LayerCut
from .freeze import FreezePolicy
from .head import Head
from .model import Model
from .registry import backend_for, get_backend


def wrap(native: Any, backend: str | None = None, input_shape: tuple[int, ...] | None = None) -> Model:
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
    impl = get_backend(backend) if backend is not None else backend_for(native)
    if not impl.owns(native):
        from .errors import UnsupportedModelError
        raise UnsupportedModelError(
            f"backend {impl.name!r} cannot wrap an object of type {type(native).__qualname__}")
    return impl.wrap(native, input_shape=input_shape)


def finetune(model: Any, cut: LayerCut | None = None, head: Head | None = None,
             freeze: FreezePolicy | None = None, input_shape: tuple[int, ...] | None = None,
             seed: int = 0) -> Model:
    """Cut ``model``, attach ``head`` and apply ``freeze`` (default: freeze all that is kept).

    The result owns a copy of the weights: the original model is never modified. Every argument is
    checked before anything is built, and a bad one raises a named :class:`tl.TlcoreError`.

    Args:
        model: a :class:`Model` or a native model (wrapped first).
        cut: where to cut (default: keep everything).
        head: the new head (default: none, e.g. to fine-tune the model as it is).
        freeze: what to freeze of the kept part (default ``FreezePolicy.all()``).
        input_shape: per-sample input shape, when the model cannot tell (to size the head).
        seed: seeds the head's initial weights.
    """
    for value, kind, name in ((cut, LayerCut, "cut"), (head, Head, "head"), (freeze, FreezePolicy, "freeze")):
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"finetune({name}=...) takes a tl.{kind.__name__}, got {type(value).__name__}")
    model = wrap(model)
    last = (cut or LayerCut()).resolve(model.layers)
    kept = model._cut(last)
    if input_shape is not None:
        kept.input_shape = tuple(input_shape)
    name = None
    if head is not None:
        name = next(n for n in ("head", *(f"head_{i}" for i in range(1, 100))) if n not in kept.layers)
        kept = kept._with_head(head, name, seed)
    step = {"cut": last, "head": head.to_dict() if head else None, "head_name": name}
    kept.meta = {**model.meta, "steps": [*model.meta.get("steps", []), step]}
    return kept.freeze(freeze or FreezePolicy.all())
