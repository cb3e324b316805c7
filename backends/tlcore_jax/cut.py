"""Structure of ``nnx.Module``s: cut points (layers), tlcore names of module paths, cutting, and
appending a head.

Sequential containers (``nnx.Sequential``, :class:`~tlcore_jax.layers.NamedSequential`) run their
layers in order, so a cut inside a chain of them slices them. Any other module is cut by running its
own ``__call__`` and stopping when the layer to cut at returns (:class:`CutAt`): whatever Python the
module runs works; the layers after the cut are replaced by :class:`Dropped`.

Layers are listed in forward order: a container before its children, and the submodules of a module
that is not sequential in the order its ``__call__`` first calls them when an example input is known
(:func:`call_order`, one abstract run), else in definition order.

Inputs reach a module as they are given: one array, positional arrays (a tuple) or keyword arrays (a
dict, e.g. ``input_ids`` and ``attention_mask``); a head built by tlcore also receives the
``attention_mask`` keyword input, for its pooling.

Names: module paths joined by dots, except that the ``layers`` list of an ``nnx.Sequential`` and the
``body`` of :class:`WithHead` and :class:`CutAt` are left out, so the children of
``nnx.Sequential(a, b)`` are ``0`` and ``1`` (as in PyTorch) and a cut or re-headed module keeps its
own names.

Example:
    >>> net = nnx.Sequential(nnx.Linear(2, 4, rngs=rngs), nnx.relu, nnx.Linear(4, 2, rngs=rngs))  # doctest: +SKIP
    >>> [name for name, _, _ in layer_entries(net)]                                              # doctest: +SKIP
    ['0', '1', '2']
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from tlcore.errors import CutError

from .layers import CanonicalLinear, HeadModule, NamedSequential, Pool, run_chain

Path = tuple  # a native NNX path: attribute names and list indices


class WithHead(nnx.Module):
    """``head(body(...))``: a head appended to a module that is not a sequential container. The body
    takes the inputs as given; a head built by tlcore (:class:`HeadModule`) also takes the
    ``attention_mask`` keyword input, when there is one.

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

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        features = self.body(*args, **kwargs)
        head = getattr(self, self._head_name)
        if isinstance(head, HeadModule):
            return head(features, mask=kwargs.get("attention_mask"))
        return head(features)


class _Captured(BaseException):
    """Ends a forward pass at the cut layer (a BaseException: a model's ``except Exception`` cannot
    swallow it)."""

    def __init__(self, value: Any):
        super().__init__()
        self.value = value


class _Capture:
    """Stands in for the cut layer during one call of :class:`CutAt`; raises with its output."""

    def __init__(self, layer: Callable, call: int):
        self.layer, self.call, self.calls = layer, call, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.layer(*args, **kwargs)
        self.calls += 1
        if self.calls == self.call:
            raise _Captured(out)
        return out


class CutAt(nnx.Module):
    """``body`` run by its own ``__call__`` until its layer at native path ``target`` returns for the
    ``call``-th time; that output is this module's.

    Example:
        >>> cut = CutAt(my_cnn, ("bn2",))   # doctest: +SKIP
    """

    def __init__(self, body: nnx.Module, target: Path, call: int = 1):
        self.body = body
        self._target, self._call = tuple(target), int(call)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        parent = get_path(self.body, self._target[:-1])
        seg = self._target[-1]
        layer = get_path(parent, (seg,))
        capture = _Capture(layer, self._call)
        set_path(parent, seg, capture)
        try:
            self.body(*args, **kwargs)
        except _Captured as captured:
            return captured.value
        finally:
            set_path(parent, seg, layer)
        raise CutError(f"the cut layer {'.'.join(map(str, self._target))!r} ran {capture.calls} time(s) in "
                       f"{type(self.body).__name__}.__call__, so its output could not be taken")


class Dropped(nnx.Module):
    """Stands for a layer a cut removed; a forward pass never reaches it (it stops at the cut)."""

    def __init__(self, name: str, cut: str):
        self._name, self._cut = name, cut

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise CutError(f"layer {self._name!r} was removed by the cut at {self._cut!r}, but the module calls it "
                       f"before {self._cut!r} returns: cut at a layer that runs after {self._name!r}")


WRAPPERS = (WithHead, CutAt)


def get_path(node: Any, path: Path) -> Any:
    """The object at native ``path`` below ``node`` (attributes, list indices, dict keys)."""
    for seg in path:
        node = node[seg] if isinstance(seg, int) or isinstance(node, (dict, list, tuple, nnx.List, nnx.Dict)) \
            else getattr(node, seg)
    return node


def set_path(parent: Any, seg: Any, value: Any) -> None:
    """Set ``parent``'s attribute or item ``seg`` to ``value``."""
    if isinstance(seg, int) or isinstance(parent, (dict, list, nnx.List, nnx.Dict)):
        parent[seg] = value
    else:
        setattr(parent, seg, value)


def is_sequential(obj: object) -> bool:
    """True for the containers tlcore slices: ``nnx.Sequential`` and ``NamedSequential``."""
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
    submodules in definition order; a wrapper's body stands in its place; layers a cut removed
    (:class:`Dropped`) are left out."""
    return [entry for entry in _all_children(module) if not isinstance(entry[2], Dropped)]


def _all_children(module: object) -> list[tuple[str, Path, Any]]:
    seq = sequence(module)
    if seq is not None:
        return seq
    if isinstance(module, WRAPPERS):
        inner = [(n, ("body", *p), c) for n, p, c in _children(module.body)]
        if isinstance(module, WithHead):
            inner.append((module.head_name, (module.head_name,), getattr(module, module.head_name)))
        return inner
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
        elif isinstance(node, WRAPPERS):
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


# ---------------------------------------------------------------------------- cutting
class _NotSequential(Exception):
    pass


def _slice(module: object, last: str) -> nnx.Module:
    """``module`` up to layer ``last`` when every container on the way is sequential (or the head of a
    :class:`WithHead`), else :class:`_NotSequential`."""
    top, _, rest = last.partition(".")
    if isinstance(module, WithHead) and top == module.head_name:
        head = getattr(module, top)
        return WithHead(module.body, top, _slice(head, rest) if rest else head)
    seq = sequence(module)
    if seq is None or top not in [n for n, _, _ in seq]:
        raise _NotSequential
    kept = []
    for name, _, layer in seq:
        if name == top:
            kept.append((name, _slice(layer, rest) if rest else layer))
            break
        kept.append((name, layer))
    if isinstance(module, nnx.Sequential):
        return nnx.Sequential(*[layer for _, layer in kept])
    return (HeadModule if isinstance(module, HeadModule) else NamedSequential)(kept)


def cut_module(module: nnx.Module, last: str | None, dropped: list[str] = ()) -> nnx.Module:
    """``module`` (not copied; changed in place) computing the output of its layer ``last`` (None keeps
    it whole): sliced containers where possible, else a :class:`CutAt` whose layers ``dropped``
    (those after the cut) are replaced by :class:`Dropped`."""
    if last is None:
        return module
    try:
        return _slice(module, last)
    except _NotSequential:
        pass
    paths = {name: path for name, path, _ in layer_entries(module)}
    for name in dropped:
        set_path(get_path(module, paths[name][:-1]), paths[name][-1], Dropped(name, last))
    return CutAt(module, paths[last])


def append_head(module: nnx.Module, name: str, head: nnx.Module) -> nnx.Module:
    """``module`` followed by ``head`` as layer ``name``; the module's own names are unchanged."""
    seq = sequence(module)
    if seq is not None:
        return NamedSequential([(n, layer) for n, _, layer in seq] + [(name, head)])
    return WithHead(module, name, head)


def static_width(last: object, after: object) -> int | None:
    """The features' width when a global average pool (``last``) feeds a dense layer (``after``, or
    its first leaf layer): that layer's ``in_features``."""
    while True:
        children = _children(after) if isinstance(after, nnx.Module) else []
        if not children:
            break
        after = children[0][2]
    pooled = isinstance(last, Pool) and last.mode == "avg"
    return after.in_features if pooled and isinstance(after, (nnx.Linear, CanonicalLinear)) else None


def top_layer(module: nnx.Module, name: str) -> Any:
    """The top-level layer ``name`` of a sequential container or of a :class:`WithHead`."""
    if isinstance(module, WithHead) and module.head_name == name:
        return getattr(module, name)
    for n, _, layer in sequence(module) or ():
        if n == name:
            return layer
    raise CutError(f"{name!r} is not a top-level layer of this {type(module).__name__}")


def run_until(module: nnx.Module, stop: str) -> Callable[..., Any]:
    """A function running ``module`` on its inputs up to (not including) the top-level layer ``stop``."""
    if isinstance(module, WithHead) and module.head_name == stop:
        return module.body
    seq = sequence(module)
    if seq is None or stop not in [n for n, _, _ in seq]:
        raise CutError(f"{stop!r} is not a top-level layer of this {type(module).__name__}")
    before = [layer for _, _, layer in seq[:[n for n, _, _ in seq].index(stop)]]
    return lambda *args, **kwargs: run_chain(before, args, kwargs)


def trace_shapes(module: object, x: Any, prefix: str, shapes: dict[str, tuple]) -> Any:
    """Run ``module`` on ``x`` (abstractly, under ``jax.eval_shape``) and record each layer's
    per-sample output shape in ``shapes``; returns the output. Inside a module that is not a
    sequential container only the module's own output is recorded."""
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


# ---------------------------------------------------------------------------- call order
class _Recorder:
    """Stands in for a layer during one abstract run of :func:`call_order`: notes the first call of
    ``name``, then runs the layer (and reads its attributes) as the layer itself."""

    def __init__(self, layer: Callable, name: str, seen: dict[str, int]):
        self._layer, self._name, self._seen = layer, name, seen

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._seen.setdefault(self._name, len(self._seen))
        return self._layer(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._layer, attr)


def call_order(module: nnx.Module, example: Any, forward: Callable[[Callable, Any], Any],
               prepare: Callable[[nnx.Module], None] = lambda m: None) -> list[str] | None:
    """The layers of ``module`` (see :func:`layer_entries`) in the order ``forward(module, example)``
    first calls them, found in one abstract run (``jax.eval_shape``: nothing is computed, ``module``
    is not changed; ``prepare`` sets the run's modes first): a container before its children (one
    that is iterated, not called, such as an ``nnx.List``, just before its first child), layers never
    called last. None when the run fails (the caller keeps the definition order).

    Example:
        >>> call_order(net, jax.ShapeDtypeStruct((1, 4), jnp.float32), lambda m, x: m(x))   # doctest: +SKIP
        ['encoder', 'dropout', 'fc']
    """
    names = [name for name, _, _ in layer_entries(module)]
    seen: dict[str, int] = {}

    def run(copy: nnx.Module, x: Any) -> Any:
        prepare(copy)
        for name, path, layer in reversed(layer_entries(copy)):  # children first, then their containers
            if callable(layer):
                set_path(get_path(copy, path[:-1]), path[-1], _Recorder(layer, name, seen))
        return forward(copy, x)

    try:
        jax.eval_shape(run, module, example)
    except Exception:  # noqa: BLE001 - any failure only means that the order cannot be known this way
        return None
    first: dict[str, float] = dict(seen)
    for name in names:
        inner = [first[n] for n in seen if n.startswith(name + ".")]
        if name not in first and inner:
            first[name] = min(inner) - 0.5
    rank = {name: i for i, name in enumerate(names)}
    return sorted(names, key=lambda n: (first.get(n, len(names) + rank[n]), rank[n]))


def entry_layer(module: Any) -> Any:
    """The callable that receives a module's inputs: the module itself, or for a wrapper its body and
    for a sequential container its first layer (followed down)."""
    while True:
        if isinstance(module, WRAPPERS):
            module = module.body
            continue
        seq = sequence(module)
        if not seq:
            return module
        module = seq[0][2]
