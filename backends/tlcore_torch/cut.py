"""Cutting ``nn.Module``s: slicing for ``nn.Sequential``, ``torch.fx`` tracing for the rest
(as torchvision's ``create_feature_extractor`` does)."""
from __future__ import annotations

from collections import OrderedDict

import torch.fx as fx
from torch import nn

from tlcore.errors import CutError
from tlcore.freeze import in_layer


def layer_names(module: nn.Module, prefix: str = "") -> list[str]:
    """Children in registration order; ``nn.Sequential`` children are listed, then their children."""
    names = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        names.append(full)
        if isinstance(child, nn.Sequential):
            names += layer_names(child, full + ".")
    return names


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
    """True when every container on the way to ``last`` is an ``nn.Sequential``."""
    parts = last.split(".")
    for part in parts:
        if not isinstance(module, nn.Sequential):
            return False
        module = module.get_submodule(part)
    return True


def trace(module: nn.Module) -> fx.GraphModule:
    if isinstance(module, fx.GraphModule):
        return module
    try:
        return fx.symbolic_trace(module)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...) for dynamic code
        raise CutError(
            f"cannot cut {type(module).__name__}: torch.fx could not trace it ({type(e).__name__}: {e}). "
            "Cut at a layer of an nn.Sequential, or make forward() free of data-dependent control flow"
        ) from e


def _owners(node: fx.Node) -> list[str]:
    owners = list(node.meta.get("nn_module_stack", {}))
    if node.op == "call_module":
        owners.append(str(node.target))
    return owners


def cut_traced(module: nn.Module, last: str) -> fx.GraphModule:
    """The traced ``module`` whose output is the output of the last operation inside ``last``."""
    gm = trace(module)
    graph = gm.graph
    inside = [n for n in graph.nodes if any(in_layer(o, last) for o in _owners(n))]
    if not inside:
        raise CutError(f"layer {last!r} is never called in {type(module).__name__}.forward, so the model "
                       "cannot be cut there")
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (inside[-1],)
    graph.eliminate_dead_code()
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=type(module).__name__ + "Cut")


def cut_module(module: nn.Module, last: str | None) -> nn.Module:
    """``module`` (not copied) cut after ``last``; None keeps it whole."""
    if last is None:
        return module
    if sequential_path(module, last):
        return cut_sequential(module, last)
    return cut_traced(module, last)


def append_module(module: nn.Module, name: str, tail: nn.Module) -> nn.Module:
    """``module`` followed by ``tail``, registered as child ``name``; other names are unchanged."""
    if isinstance(module, nn.Sequential):
        return nn.Sequential(OrderedDict([*module.named_children(), (name, tail)]))
    gm = trace(module)
    gm.add_submodule(name, tail)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        call = gm.graph.call_module(name, (output.args[0],))
    output.args = (call,)
    gm.recompile()
    return gm
