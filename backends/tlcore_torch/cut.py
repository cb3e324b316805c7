"""The structure of ``nn.Module``s: cut points, names, cutting, and appending a head.

* Cut points are the children of a module in registration order; the children of ``nn.Sequential``,
  ``nn.ModuleList`` and ``nn.ModuleDict`` containers are listed after them (``layer1``,
  ``layer1.0``...).
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

from collections import OrderedDict
from typing import Any

from tlcore.errors import CutError

from ._torch import nn, torch
from .head import Pool

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
    is registered as child ``name`` and takes :func:`primary_output` of ``body``."""

    def __init__(self, body: nn.Module, name: str, head: nn.Module):
        super().__init__()
        self.body, self.head_name = body, name
        self.add_module(name, head)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_submodule(self.head_name)(primary_output(self.body(*args, **kwargs)))


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
        if isinstance(child, CONTAINERS):
            names += layer_names(child, full + ".")
    return names


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


def is_global_pool(module: nn.Module) -> bool:
    """A layer whose output has one value per channel: adaptive pooling to size 1, timm's
    ``SelectAdaptivePool2d``, a ``Flatten`` (its width is what the next dense layer takes)."""
    if isinstance(module, GLOBAL_POOLS):
        size = module.output_size
        return all(s == 1 for s in (size if isinstance(size, tuple) else (size,)))
    if isinstance(module, nn.Flatten):
        return True
    if type(module).__name__ == "SelectAdaptivePool2d":  # timm's; pool_type "" is an identity
        return bool(getattr(module, "pool_type", ""))
    return isinstance(module, Pool) and module.mode == "avg"
