"""Structure of ``nnx.Module``s: cut points (layers), tlcore names of module paths, cutting, and
appending a head.

Sequential containers (``nnx.Sequential``, :class:`~tlcore_jax.layers.NamedSequential`, and
:class:`WithHead`, which tlcore builds) run their layers in order, so they can be cut after any layer
and dotted names reach into nested ones. Any other module is kept whole: its ``__call__`` is
arbitrary Python, so nothing tells what runs after one of its submodules.

Names: module paths joined by dots, except that the ``layers`` list of an ``nnx.Sequential`` and the
``body`` of a :class:`WithHead` are left out, so the children of ``nnx.Sequential(a, b)`` are ``0`` and
``1`` (as in PyTorch) and a head appended to a module leaves the module's own names unchanged.

Example:
    >>> net = nnx.Sequential(nnx.Linear(2, 4, rngs=rngs), nnx.relu, nnx.Linear(4, 2, rngs=rngs))  # doctest: +SKIP
    >>> [name for name, _, _ in layer_entries(net)]                                              # doctest: +SKIP
    ['0', '1', '2']
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from tlcore.errors import CutError

from .layers import NamedSequential

Path = tuple  # a native NNX path: attribute names and list indices


class WithHead(nnx.Module):
    """``head(body(x))``: a head appended to a module that is not a sequential container.

    ``body`` is left out of tensor names, so the module keeps its own names and the head's are
    ``<head_name>.<...>``.

    Example:
        >>> model = WithHead(my_module, "head", head)   # doctest: +SKIP
    """

    def __init__(self, body: nnx.Module, head_name: str, head: Callable):
        self.body = body
        self._head_name = head_name
        setattr(self, head_name, head)

    @property
    def head_name(self) -> str:
        return self._head_name

    def __call__(self, x: Any) -> Any:
        return getattr(self, self._head_name)(self.body(x))


def is_sequential(obj: object) -> bool:
    """True for the containers tlcore can cut: ``nnx.Sequential`` and ``NamedSequential``."""
    return isinstance(obj, (nnx.Sequential, NamedSequential))


def sequence(module: object) -> list[tuple[str, Path, Any]] | None:
    """``(name, native path segments, layer)`` in forward order for a sequential container, else None."""
    if isinstance(module, nnx.Sequential):
        return [(str(i), ("layers", i), layer) for i, layer in enumerate(module.layers)]
    if isinstance(module, NamedSequential):
        return [(name, (name,), layer) for name, layer in module.items()]
    return None


def _children(module: object) -> list[tuple[str, Path, Any]]:
    """Direct sublayers for listing: a container's layers, a list's or dict's items, or a module's
    submodules in definition order."""
    seq = sequence(module)
    if seq is not None:
        return seq
    if isinstance(module, WithHead):
        return ([(n, ("body", *p), c) for n, p, c in _children(module.body)]
                + [(module.head_name, (module.head_name,), getattr(module, module.head_name))])
    if isinstance(module, nnx.List):
        return [(str(i), (i,), c) for i, c in enumerate(module) if isinstance(c, nnx.Module)]
    if isinstance(module, nnx.Dict):
        return [(str(k), (k,), c) for k, c in module.items() if isinstance(c, nnx.Module)]
    out = []
    for attr, value in vars(module).items():
        if attr.startswith("_pytree__"):
            continue
        if isinstance(value, nnx.Module):
            out.append((attr, (attr,), value))
        elif isinstance(value, (list, tuple)):
            out += [(f"{attr}.{i}", (attr, i), c) for i, c in enumerate(value) if isinstance(c, nnx.Module)]
        elif isinstance(value, dict):
            out += [(f"{attr}.{k}", (attr, k), c) for k, c in value.items() if isinstance(c, nnx.Module)]
    return out


def _expands(obj: object) -> bool:
    return is_sequential(obj) or isinstance(obj, (nnx.List, nnx.Dict))


def layer_entries(module: nnx.Module, prefix: str = "", native: Path = ()) -> list[tuple[str, Path, Any]]:
    """Every layer as ``(name, native path, object)``, a container before its (dotted) children.

    Sequential containers (and lists/dicts of modules) are expanded; other modules are single layers.
    """
    out = []
    for name, segs, child in _children(module):
        full, path = prefix + name, native + segs
        out.append((full, path, child))
        if _expands(child):
            out += layer_entries(child, full + ".", path)
    return out


def elided_paths(module: nnx.Module) -> frozenset[Path]:
    """Native path prefixes whose last segment is left out of names."""
    elided = set()
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Sequential):
            elided.add(tuple(path) + ("layers",))
        elif isinstance(node, WithHead):
            elided.add(tuple(path) + ("body",))
    return frozenset(elided)


def display_name(path: Path, elided: frozenset[Path]) -> str:
    """The tlcore name of a native path: its segments joined by dots, elided ones left out."""
    path = tuple(path)
    return ".".join(str(s) for i, s in enumerate(path) if path[: i + 1] not in elided)


def layer_kind(obj: object) -> str:
    """A readable kind for the summary: the class name, or a function's name."""
    if isinstance(obj, nnx.Module):
        return type(obj).__name__
    return getattr(obj, "__name__", type(obj).__name__)


def cut_points_message(module: nnx.Module) -> str:
    return (f"{type(module).__name__} is not a sequential container, so tlcore cannot know what its "
            "__call__ does after one of its submodules. Cut points exist only inside nnx.Sequential and "
            "tlcore_jax.NamedSequential containers (after any of their layers; dotted names such as "
            "'block1.conv' reach nested ones), and this model's root is neither. Keep the whole model "
            "(LayerCut()), or build it as tlcore_jax.NamedSequential(conv1=..., bn1=..., ...) or "
            "nnx.Sequential(...) so that its layers run in sequence and can be cut")


def cut_module(module: nnx.Module, last: str | None) -> nnx.Module:
    """``module`` (not copied) up to and including layer ``last``; None keeps it whole.

    Raises:
        CutError: ``last`` lies inside a module that is not a sequential container.
    """
    if last is None:
        return module
    top, _, rest = last.partition(".")
    if isinstance(module, WithHead):
        if top != module.head_name:
            raise CutError(f"cannot cut at {last!r}: " + cut_points_message(module.body))
        head = getattr(module, top)
        return WithHead(module.body, top, _cut_child(head, rest, last) if rest else head)
    seq = sequence(module)
    if seq is None:
        raise CutError(f"cannot cut at {last!r}: " + cut_points_message(module))
    kept = []
    for name, _, layer in seq:
        if name == top:
            kept.append((name, _cut_child(layer, rest, last) if rest else layer))
            break
        kept.append((name, layer))
    else:
        raise CutError(f"{type(module).__name__} has no layer {top!r}; layers: {[n for n, _, _ in seq]}")
    if isinstance(module, nnx.Sequential):
        return nnx.Sequential(*[layer for _, layer in kept])
    return NamedSequential(kept)


def _cut_child(child: object, rest: str, last: str) -> nnx.Module:
    if sequence(child) is None and not isinstance(child, WithHead):
        raise CutError(f"cannot cut at {last!r}: " + cut_points_message(child))
    return cut_module(child, rest)


def append_head(module: nnx.Module, name: str, head: nnx.Module) -> nnx.Module:
    """``module`` followed by ``head`` as layer ``name``; the module's own names are unchanged."""
    seq = sequence(module)
    if seq is not None:
        return NamedSequential([(n, layer) for n, _, layer in seq] + [(name, head)])
    if isinstance(module, WithHead) or not hasattr(module, name):
        return WithHead(module, name, head)
    raise CutError(f"cannot attach a head named {name!r}: {type(module).__name__} already has an attribute "
                   "of that name")


def run_until(module: nnx.Module, stop: str) -> Callable[[Any], Any]:
    """A function running ``module`` on its input up to (not including) the top-level layer ``stop``."""
    if isinstance(module, WithHead) and module.head_name == stop:
        return module.body
    seq = sequence(module)
    if seq is None or stop not in [n for n, _, _ in seq]:
        raise CutError(f"{stop!r} is not a top-level layer of this {type(module).__name__}")

    def run(x: Any) -> Any:
        for name, _, layer in seq:
            if name == stop:
                return x
            x = layer(x)
        return x

    return run


def trace_shapes(module: object, x: Any, prefix: str, shapes: dict[str, tuple]) -> Any:
    """Run ``module`` on ``x`` (abstractly, under ``jax.eval_shape``) and record each layer's
    per-sample output shape in ``shapes``; returns the output."""
    if isinstance(module, WithHead):
        x = trace_shapes(module.body, x, prefix, shapes)
        head = getattr(module, module.head_name)
        out = trace_shapes(head, x, f"{prefix}{module.head_name}.", shapes)
        _record(shapes, prefix + module.head_name, out)
        return out
    seq = sequence(module)
    if seq is None:
        return module(x)
    for name, _, layer in seq:
        x = trace_shapes(layer, x, f"{prefix}{name}.", shapes) if sequence(layer) is not None else layer(x)
        _record(shapes, prefix + name, x)
    return x


def _record(shapes: dict[str, tuple], name: str, out: Any) -> None:
    if hasattr(out, "shape"):
        shapes[name] = tuple(out.shape[1:])
