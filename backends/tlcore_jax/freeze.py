"""Names and kinds of an ``nnx.Module``'s variables, and the train/inference modes of its layers.

NNX has no ``requires_grad``: freezing is applied when a training step is built, by splitting the
state into the trainable parameters (the only thing differentiated and optimized), the state a
forward pass may update (BatchNorm statistics of trainable BatchNorm layers, RNG counters), and
constants (frozen parameters, frozen BatchNorm statistics, everything else).

Example:
    >>> lay = layout(model)                          # doctest: +SKIP
    >>> [t.name for t in lay.infos][:3]              # doctest: +SKIP
    ['conv1.bias', 'conv1.kernel', 'bn1.bias']
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flax import nnx

from tlcore.errors import TlcoreError
from tlcore.freeze import Resolved, TensorInfo, owning_layer

from .cut import Path, display_name, elided_paths, layer_entries, layer_kind
from .layers import CanonicalBatchNorm

BATCHNORM = (nnx.BatchNorm, CanonicalBatchNorm)


@dataclass
class Layout:
    """A module's layers and variables under tlcore names, with their native NNX paths."""

    layers: list[str]
    kinds: dict[str, str]
    infos: list[TensorInfo]
    path_of: dict[str, Path]                              # tensor name -> native variable path
    module_path: dict[str, Path]                          # module name -> native module path
    rng_streams: list[tuple[str, Path]] = field(default_factory=list)  # (name, native path)

    @property
    def kind_of(self) -> dict[str, str]:
        return {t.name: t.kind for t in self.infos}


def is_batchnorm(module: object) -> bool:
    """A BatchNorm layer: Flax's, tlcore's, or any module that owns ``nnx.BatchStat`` variables (a
    custom normalisation layer keeps its running statistics in them)."""
    if isinstance(module, BATCHNORM):
        return True
    return isinstance(module, nnx.Module) and any(isinstance(v, nnx.BatchStat) for v in vars(module).values())


def variable_kind(var: nnx.Variable, owner: object) -> str:
    """``rng`` for RNG keys/counters; ``bn_param``/``bn_stat`` inside a BatchNorm (see
    :func:`is_batchnorm`); ``param`` for other ``nnx.Param``s; ``buffer`` for any other variable
    (constant while training)."""
    if isinstance(var, nnx.RngState):
        return "rng"
    if is_batchnorm(owner):
        return "bn_param" if isinstance(var, nnx.Param) else "bn_stat" if isinstance(var, nnx.BatchStat) else "buffer"
    return "param" if isinstance(var, nnx.Param) else "buffer"


def layout(module: nnx.Module, order: Iterable[str] = ()) -> Layout:
    """Names, kinds and owning layers of every layer and variable of ``module``.

    ``order`` (the layers of the model this one was cut from) keeps the definition order of the
    submodules of modules that are not sequential, which ``nnx.clone`` does not preserve; layers not
    in it (a new head) keep their place after those that are.
    """
    entries = layer_entries(module)
    rank = {name: i for i, name in enumerate(order)}
    if rank:
        entries = [e for _, e in sorted(enumerate(entries), key=lambda ie: (rank.get(ie[1][0], len(rank)), ie[0]))]
    layers = [name for name, _, _ in entries]
    kinds = {name: layer_kind(obj) for name, _, obj in entries}
    order, known = {name: i for i, name in enumerate(layers)}, set(layers)
    elided = elided_paths(module)
    nodes = {tuple(p): n for p, n in nnx.iter_graph(module)
             if isinstance(n, (nnx.Pytree, nnx.Variable))}
    infos, path_of, module_path, streams = [], {}, {}, []
    for path, node in nodes.items():
        name = display_name(path, elided)
        if isinstance(node, nnx.Module):
            module_path[name] = path
        elif isinstance(node, nnx.RngStream):
            streams.append((name, path))
        elif isinstance(node, nnx.Variable):
            owner = nodes.get(path[:-1])
            kind = variable_kind(node, owner)
            if name in path_of:
                raise TlcoreError(f"two variables of {type(module).__name__} have the same tlcore name {name!r} "
                                  f"({path_of[name]} and {path}); rename one of them")
            path_of[name] = path
            unit = display_name(path[:-1], elided) if kind in ("bn_param", "bn_stat") else ""
            infos.append(TensorInfo(name, owning_layer(name, known), kind, unit))
    infos.sort(key=lambda t: (order.get(t.layer, -1), t.name))
    return Layout(layers, kinds, infos, path_of, module_path, sorted(streams))


@dataclass(frozen=True)
class Partition:
    """Native variable paths of the three parts a training step sees."""

    trainable: frozenset[Path]        # differentiated and optimized
    mutable: frozenset[Path]          # written by the forward pass (trainable BN statistics, RNG)
    frozen_bn: frozenset[Path]        # native module paths of BatchNorm layers run on running averages


def partition(lay: Layout, resolved: Resolved) -> Partition:
    """Split the resolved mask into what a training step differentiates, updates and keeps."""
    trainable, mutable = set(), set()
    for t in lay.infos:
        if not resolved.mask[t.name]:
            continue
        if t.kind in ("param", "bn_param"):
            trainable.add(lay.path_of[t.name])
        elif t.kind in ("bn_stat", "rng"):
            mutable.add(lay.path_of[t.name])
    frozen_bn = frozenset(lay.module_path[u] for u in resolved.frozen_bn_units)
    return Partition(frozenset(trainable), frozenset(mutable), frozen_bn)


def set_modes(module: nnx.Module, *, training: bool, frozen_bn: frozenset[Path] = frozenset()) -> None:
    """Set ``deterministic`` (Dropout and the like) and ``use_running_average`` (BatchNorm) on every
    submodule that has them: inference mode everywhere, or training mode except frozen BatchNorm
    layers, which keep running on (and never update) their moving statistics.

    Called on the copy of the module that a compiled step builds, never on the user's module.
    """
    for path, sub in nnx.iter_modules(module):
        attrs = vars(sub)
        if "use_running_average" in attrs:
            sub.use_running_average = (not training) or tuple(path) in frozen_bn
        if "deterministic" in attrs:
            sub.deterministic = not training


def stochastic_modules(module: nnx.Module) -> list[tuple[Path, nnx.Module]]:
    """Submodules that are random while training: a ``deterministic`` flag and a non-zero rate."""
    out = []
    for path, sub in nnx.iter_modules(module):
        attrs = vars(sub)
        if "deterministic" in attrs:
            rate = attrs.get("rate", attrs.get("dropout_rate"))
            if rate is None or rate > 0:
                out.append((tuple(path), sub))
    return out
