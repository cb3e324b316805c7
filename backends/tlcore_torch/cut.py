"""The structure of ``nn.Module``s: cut points, names, cutting, and appending a head.

* Cut points are the children of a module in registration order, each container followed by its own
  children (``layer1``, ``layer1.0``...). Containers are ``nn.Sequential``, ``nn.ModuleList`` and
  ``nn.ModuleDict``, a module that holds a ``ModuleList``/``ModuleDict`` (it runs a list of blocks,
  as a Hugging Face encoder), and a Hugging Face ``PreTrainedModel`` inside another (``bert`` in
  ``BertForSequenceClassification``): so ``bert.embeddings``, ``bert.encoder.layer.0`` ... are cut points.
* A cut inside a chain of ``nn.Sequential`` containers slices them (a plain ``nn.Sequential``).
  Any other cut runs the model's own ``forward`` and stops when the layer to cut at returns
  (:class:`CutModule`): whatever Python the model runs works, and every layer keeps its own
  train/eval switch. (A ``torch.fx`` trace would bake each layer's ``self.training`` branch into the
  graph: timm's ``BatchNormAct2d`` then normalised with batch statistics in inference and moved its
  frozen running statistics.) The layers after the cut are replaced by :class:`Dropped`.
* :class:`CutModule` and :class:`WithHead` wrap a ``body`` that is left out of tensor names, so a
  cut or re-headed model keeps the original names.

Example:
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))   # doctest: +SKIP
    >>> layer_names(net)                                                  # doctest: +SKIP
    ['0', '1', '2']
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any

from tlcore.errors import CutError, DataError, unknown_name_message

from ._torch import nn, torch
from .head import HeadModule, Pool

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
GLOBAL_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool3d)


class _Captured(BaseException):
    """Ends a forward pass at the cut layer (a BaseException, so a model's own ``except Exception``
    cannot swallow it)."""

    def __init__(self, value: Any):
        super().__init__()
        self.value = value


def primary_output(out: Any) -> Any:
    """The tensor a layer's output stands for: the tensor itself, the first element of a tuple or
    list, or the first tensor of a mapping (``logits``/``last_hidden_state`` of a ``ModelOutput``)."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)) and out:
        return primary_output(out[0])
    if isinstance(out, dict) and out:
        for key in ("logits", "last_hidden_state"):
            if key in out:
                return out[key]
        return primary_output(next(iter(out.values())))
    raise CutError(f"cannot use an output of type {type(out).__name__} as features: expected a tensor, "
                   "a tuple/list or a mapping of tensors")


class CutModule(nn.Module):
    """``body`` run by its own ``forward`` until its submodule ``target`` (a native path) returns for
    the ``call``-th time; that output (:func:`primary_output`) is this module's output.

    Example:
        >>> cut = CutModule(torchvision.models.resnet18(), "layer3")   # doctest: +SKIP
        >>> cut(torch.zeros(1, 3, 64, 64)).shape                       # doctest: +SKIP
        torch.Size([1, 256, 4, 4])
    """

    def __init__(self, body: nn.Module, target: str, call: int = 1):
        super().__init__()
        self.body, self.target, self.call = body, target, call

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        calls = 0

        def grab(module: nn.Module, inputs: Any, output: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == self.call:
                raise _Captured(output)

        handle = self.body.get_submodule(self.target).register_forward_hook(grab)
        try:
            self.body(*args, **kwargs)
        except _Captured as captured:
            return primary_output(captured.value)
        finally:
            handle.remove()
        raise CutError(f"the cut layer {self.target!r} ran {calls} time(s) in {type(self.body).__name__}.forward, "
                       f"so its output could not be taken; cut at a layer that runs on every forward pass")

    def extra_repr(self) -> str:
        return f"target={self.target!r}"


class WithHead(nn.Module):
    """``head(body(...))``: a head appended to a module that is not an ``nn.Sequential``; the head
    is registered as child ``name`` and takes :func:`primary_output` of ``body`` (and the
    ``attention_mask`` keyword input, when tlcore built the head and the model was given one)."""

    def __init__(self, body: nn.Module, name: str, head: nn.Module):
        super().__init__()
        self.body, self.head_name = body, name
        self.add_module(name, head)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        features = primary_output(self.body(*args, **kwargs))
        head = self.get_submodule(self.head_name)
        if isinstance(head, HeadModule):
            return head(features, kwargs.get("attention_mask"))
        return head(features)


class Dropped(nn.Module):
    """Stands for a layer a cut removed; a forward pass never reaches it (it stops at the cut)."""

    def __init__(self, name: str, cut: str):
        super().__init__()
        self.name, self.cut = name, cut

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise CutError(f"layer {self.name!r} was removed by the cut at {self.cut!r}, but the model's forward "
                       f"calls it before {self.cut!r} returns: cut at a layer that runs after {self.name!r}")

    def extra_repr(self) -> str:
        return f"removed by the cut at {self.cut!r}"


WRAPPERS = (CutModule, WithHead)


# ---------------------------------------------------------------------------- names
def elided(module: nn.Module) -> frozenset[str]:
    """Native module paths left out of tlcore names: the ``body`` of every wrapper."""
    return frozenset(f"{path}.body" if path else "body"
                     for path, m in module.named_modules() if isinstance(m, WRAPPERS))


def display_name(native: str, skip: frozenset[str]) -> str:
    """The tlcore name of a native (module or tensor) path: its segments, elided ones left out."""
    if not skip:
        return native
    parts, out = native.split("."), []
    for i, part in enumerate(parts):
        if ".".join(parts[: i + 1]) not in skip:
            out.append(part)
    return ".".join(out)


def modules_by_name(module: nn.Module) -> dict[str, nn.Module]:
    """``{tlcore name: submodule}`` (the first one reached, for a module registered twice)."""
    skip = elided(module)
    out: dict[str, nn.Module] = {}
    for path, sub in module.named_modules():
        out.setdefault(display_name(path, skip), sub)
    return out


def is_pretrained_model(module: nn.Module) -> bool:
    """A Hugging Face ``PreTrainedModel`` (told by its classes' names: transformers is not imported)."""
    return any(cls.__name__ == "PreTrainedModel" for cls in type(module).__mro__)


def is_container(module: nn.Module) -> bool:
    """A module whose children are cut points themselves (see the module docstring)."""
    if isinstance(module, CONTAINERS) or is_pretrained_model(module):
        return True
    return any(isinstance(c, (nn.ModuleList, nn.ModuleDict)) for c in module.children())


def layer_names(module: nn.Module, prefix: str = "") -> list[str]:
    """Children in registration order, containers followed by their own (dotted) children; the
    ``body`` of a wrapper is listed in its place."""
    names = []
    for name, child in module.named_children():
        if isinstance(module, WRAPPERS) and name == "body":
            names += layer_names(child, prefix)
            continue
        full = f"{prefix}{name}"
        names.append(full)
        if is_container(child):
            names += layer_names(child, full + ".")
    return names


def example_input(module: nn.Module, input_shape: tuple | None) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` of a tiny batch the module takes, from a fully known ``input_shape`` or a
    Hugging Face model's own example (``dummy_inputs``; an image of the config's size); else None."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if input_shape is not None and None not in input_shape:
        return (torch.zeros((1, *input_shape), device=device),), {}
    if not is_pretrained_model(module):
        return None
    config = getattr(module, "config", None)
    if getattr(module, "main_input_name", "") == "pixel_values" and config is not None:
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return (), {"pixel_values": torch.zeros((1, getattr(config, "num_channels", 3), *size), device=device)}
    try:
        return (), {k: v[:1].to(device) for k, v in module.dummy_inputs.items()}
    except Exception:  # a model without usable dummy inputs: its registration order stands
        return None


def call_order(module: nn.Module, names: list[str], example: tuple[tuple, dict] | None) -> list[str]:
    """``names`` (tlcore layer names) sorted by when each layer first runs in one inference forward
    pass on ``example`` (a container before its children; layers that never run last), so that
    "the last layers" are the last to run, not the last registered (DistilBERT registers its
    ``dropout`` after its ``classifier``). Without an example, if it fails, or if a layer does not run
    on it (data-dependent code), ``names`` as they are."""
    if example is None:
        return list(names)
    subs, first, hooks = modules_by_name(module), {}, []

    def record(name: str) -> None:  # a pre-hook returning something would replace the inputs
        first.setdefault(name, len(first))

    for name in names:
        if name in subs:
            hooks.append(subs[name].register_forward_pre_hook(lambda m, a, name=name: record(name)))
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            module(*example[0], **example[1])
    except Exception:
        return list(names)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.training = mode
    for name in names:  # a container that is iterated, not called (a ModuleList), runs with its first child
        inner = [first[n] for n in first if n.startswith(name + ".")]
        if name not in first and inner:
            first[name] = min(inner) - 0.5
    if any(name not in first for name in names):  # the example skipped a layer (data-dependent code):
        return list(names)                         # its place is unknown, so registration order stands
    return sorted(names, key=lambda n: first[n])


def innermost(module: nn.Module) -> nn.Module:
    """The user's model inside tlcore's wrappers (whose forward passes its inputs on)."""
    while isinstance(module, WRAPPERS):
        module = module.body
    return module


def check_call(module: nn.Module, x: Any) -> None:
    """Refuse (``DataError``) inputs the model's ``forward`` cannot take: a dict with a name it has no
    parameter for or without one it needs (a Hugging Face model's ``main_input_name`` included), or
    more or fewer positional arrays than it takes."""
    model = innermost(module)
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    kinds = {p.kind for p in params}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in positional if p.default is p.empty]
    what = f"{type(model).__name__}.forward"
    if isinstance(x, dict):
        names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in x if k not in names]
        hf = is_pretrained_model(model)  # its **kwargs are options, not inputs: a typo would be ignored
        if unknown and (hf or inspect.Parameter.VAR_KEYWORD not in kinds):
            raise DataError(unknown_name_message(f"input of {what}", unknown[0], names))
        main = getattr(model, "main_input_name", None) if hf else None
        missing = [n for n in required if n not in x]
        if main and main not in x and not any(k.endswith("_embeds") for k in x):
            missing.append(main)
        if missing:
            raise DataError(f"x has no {missing[0]!r}, which {what} needs; give x as a dict with the keys "
                            f"{sorted({*x, *missing})}")
        return
    count = len(x) if isinstance(x, tuple) else 1
    if inspect.Parameter.VAR_POSITIONAL not in kinds and count > len(positional):
        raise DataError(f"x gives {count} positional input(s) but {what} takes {len(positional)}: "
                        f"{[p.name for p in positional]}")
    if count < len(required):
        raise DataError(f"x gives {count} positional input(s) but {what} needs {required}; give a tuple of "
                        f"{len(required)} arrays, or a dict by name")


def timm_head(module: nn.Module) -> str | None:
    """For a timm model whose classifier sits inside a head module with its own pooling and norm
    (ConvNeXt's ``head.fc`` in ``head``), the name of that head module; else None (the cut before the
    classifier already gives the pooled features)."""
    if not all(hasattr(module, a) for a in ("reset_classifier", "get_classifier", "forward_head", "num_features")):
        return None
    classifier = module.get_classifier()
    name = next((n for n, m in modules_by_name(module).items() if m is classifier), "")
    return name.split(".")[0] if "." in name else None


def timm_pre_logits(module: nn.Module) -> tuple[nn.Module, int]:
    """``module`` (changed in place) with timm's own classifier removed (``reset_classifier(0)``): its
    output is timm's pooled pre-logits features; and their width."""
    module.reset_classifier(0)
    return module, int(getattr(module, "head_hidden_size", None) or module.num_features)


def native_path(module: nn.Module, name: str) -> str:
    """The native path of the submodule that tlcore calls ``name``."""
    skip = elided(module)
    for path, _ in module.named_modules():
        if display_name(path, skip) == name:
            return path
    raise CutError(f"no layer {name!r} in {type(module).__name__}")


# ---------------------------------------------------------------------------- cutting
def cut_sequential(seq: nn.Sequential, last: str) -> nn.Sequential:
    """``seq`` up to and including the (possibly dotted) child ``last``, with the same names."""
    top, _, rest = last.partition(".")
    kept = OrderedDict()
    for name, child in seq.named_children():
        if name == top:
            kept[name] = cut_sequential(child, rest) if rest else child
            break
        kept[name] = child
    return nn.Sequential(kept)


def sequential_path(module: nn.Module, last: str) -> bool:
    """True when every container on the way to ``last`` (a native path) is an ``nn.Sequential``."""
    for part in last.split("."):
        if not isinstance(module, nn.Sequential):
            return False
        module = module.get_submodule(part)
    return True


def cut_module(module: nn.Module, last: str, dropped: list[str]) -> nn.Module:
    """``module`` (not copied; changed in place) computing the output of its layer ``last``: a
    sliced ``nn.Sequential`` where possible, else a :class:`CutModule` whose layers ``dropped`` (tlcore
    names, those after the cut) are replaced by :class:`Dropped`."""
    target = native_path(module, last)
    if sequential_path(module, target):
        return cut_sequential(module, target)
    paths = {name: native_path(module, name) for name in dropped}
    for name, path in paths.items():
        parent, _, leaf = path.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, Dropped(name, last))
    return CutModule(module, target)


def append_head(module: nn.Module, name: str, head: nn.Module) -> nn.Module:
    """``module`` followed by ``head``, registered as child ``name``; other names are unchanged."""
    if isinstance(module, nn.Sequential):
        return nn.Sequential(OrderedDict([*module.named_children(), (name, head)]))
    return WithHead(module, name, head)


def first_leaf(module: nn.Module) -> nn.Module:
    """The first module without children, descending through first children."""
    while True:
        children = list(module.children())
        if not children:
            return module
        module = children[0]


def feeds_dense_as_is(module: nn.Module) -> bool:
    """A layer whose output the next dense layer takes as it is, so that layer's ``in_features`` is the
    head's width: global pooling (adaptive pooling to size 1, timm's ``SelectAdaptivePool2d``),
    ``Flatten``, and the dropout before a classifier (Hugging Face's ``dropout`` before ``classifier``)."""
    if isinstance(module, (nn.Dropout, nn.Identity)):
        return True
    if isinstance(module, GLOBAL_POOLS):
        size = module.output_size
        return all(s == 1 for s in (size if isinstance(size, tuple) else (size,)))
    if isinstance(module, nn.Flatten):
        return True
    if type(module).__name__ == "SelectAdaptivePool2d":  # timm's; pool_type "" is an identity
        return bool(getattr(module, "pool_type", ""))
    return isinstance(module, Pool) and module.mode == "avg"
