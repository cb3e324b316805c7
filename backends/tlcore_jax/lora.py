"""LoRA adapters on ``nnx.Linear`` and :class:`~tlcore_jax.layers.CanonicalLinear` layers, in place.

An adapted layer computes ``base(x) + scale * (drop(x) @ A.T) @ B.T`` (PEFT's LoRA; ``scale`` is
``alpha / rank``). The layer keeps its identity, its place and its variables: its class is swapped
for a subclass (one per base class, cached, so equal structures have equal pytree definitions and
share compiled steps) that adds

* ``lora_A`` (rank, in) and ``lora_B`` (out, rank): ``nnx.Param``s stored in exactly the layouts
  ``state()`` reports (``<module>.lora_A`` / ``<module>.lora_B``), in the kernel's dtype;
* ``lora_scale``: a static float;
* with a dropout rate > 0: ``lora_rate`` (static), ``deterministic`` (the flag
  ``freeze.set_modes`` and ``nnx.view`` switch: the dropout acts only in training steps; True,
  i.e. off, when added; ``lora_flag`` marks it as the adapter's when the layer had none) and
  ``lora_rng``, an ``nnx.RngStream`` of its own (state ``<module>.lora_rng.key`` / ``.count``,
  kind ``rng``, reseeded with every run as the other streams).

No submodule is added (a dropout module inside the dense layer would make ``infer_input_shape``
and ``static_width`` look into it), so the layer stays a leaf layer and its tensor names keep their
owner. ``nnx.clone`` (and so a ``_cut`` copy) keeps the subclass and the adapter's values;
:func:`remove_lora` deletes the attributes and restores the base class.

``nnx.LinearGeneral`` and ``nnx.Einsum`` are not adapted (not reported as targets).

Example:
    >>> from flax import nnx
    >>> layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> add_lora(layer, scale=2.0, dropout=0.0, a=np.ones((2, 4), np.float32), b=np.zeros((3, 2), np.float32))
    >>> type(layer).__name__, layer.lora_A.shape, layer.lora_B.shape
    ('LoraLinear', (2, 4), (3, 2))
    >>> remove_lora(layer); type(layer).__name__
    'Linear'
"""
from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlcore.adapters import LoraTarget
from tlcore.cut import in_layer
from tlcore.errors import TlcoreError
from tlcore.freeze import owning_layer

from .cut import Path, _Recorder, _children, get_path, set_path
from .layers import CanonicalLinear

#: the dense layers LoRA adapts (subclasses included)
DENSE = (nnx.Linear, CanonicalLinear)
#: attributes an adapter adds to its layer (``deterministic`` only when the layer had none)
LORA_ATTRS = ("lora_A", "lora_B", "lora_scale", "lora_rate", "lora_rng")
#: base class -> its LoRA subclass
_CLASSES: dict[type, type] = {}


def kernel_name(layer: nnx.Module) -> str:
    """The attribute holding ``layer``'s weight: ``weight`` (PyTorch's (out, in) layout,
    :class:`CanonicalLinear`) or ``kernel`` (Flax's (in, out), ``nnx.Linear``).

    Example:
        >>> kernel_name(CanonicalLinear(4, 2)), kernel_name(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
        ('weight', 'kernel')
    """
    return "weight" if isinstance(layer, CanonicalLinear) else "kernel"


def is_adapted(layer: object) -> bool:
    """True for a layer :func:`add_lora` adapted (and :func:`remove_lora` did not restore).

    Example:
        >>> is_adapted(CanonicalLinear(4, 2))
        False
    """
    return getattr(type(layer), "_lora_base", None) is not None


def lora_class(base: type) -> type:
    """The LoRA subclass of the dense layer class ``base``, made once and cached (so two models
    adapted alike have equal pytree definitions). It is registered in this module under its name
    (``Lora<base name>``, a number appended if taken), so that modules holding it can be pickled.

    Example:
        >>> lora_class(nnx.Linear).__name__, lora_class(nnx.Linear) is lora_class(nnx.Linear)
        ('LoraLinear', True)
    """
    if is_adapted(base) or not issubclass(base, DENSE):
        raise TypeError(f"LoRA adapts nnx.Linear and CanonicalLinear layers, not {base.__name__}")
    cls = _CLASSES.get(base)
    if cls is not None:
        return cls

    class Lora(base):  # a direct subclass: instances of ``base`` can take it as their __class__
        _lora_base = base

        def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
            return super().__call__(x, *args, **kwargs) + lora_delta(self, x)

        def set_view(self, deterministic: bool | None = None) -> None:
            """For ``nnx.view(model, deterministic=...)``: switch the adapter's dropout."""
            if deterministic is not None and "lora_rate" in vars(self):
                self.deterministic = deterministic

    name = f"Lora{base.__name__}"
    while name in globals():
        name += "_"
    Lora.__name__ = Lora.__qualname__ = name
    Lora.__module__ = __name__
    Lora.__doc__ = f"{base.__name__} with a LoRA adapter (see tlcore_jax.lora)."
    globals()[name] = _CLASSES[base] = Lora
    return Lora


def lora_delta(layer: nnx.Module, x: jax.Array) -> jax.Array:
    """The adapter's term ``scale * (drop(x) @ A.T) @ B.T`` of an adapted ``layer``, in the layer's
    compute dtype (``layer.dtype`` when set: Flax's mixed precision), the dropout (as
    ``nnx.Dropout``'s: inverted, a Bernoulli mask from the layer's own stream) only when
    ``layer.deterministic`` is False.

    Example:
        >>> lora_delta(layer, jnp.ones((1, 4))).shape   # doctest: +SKIP
        (1, 3)
    """
    a, b = layer.lora_A[...], layer.lora_B[...]
    dtype = getattr(layer, "dtype", None)
    if dtype is not None:
        x, a, b = x.astype(dtype), a.astype(dtype), b.astype(dtype)
    rate = getattr(layer, "lora_rate", 0.0)
    if rate and not layer.deterministic:
        keep = 1.0 - rate
        mask = jax.random.bernoulli(layer.lora_rng(), keep, x.shape)
        x = jax.lax.select(mask, x / keep, jnp.zeros_like(x))
    return layer.lora_scale * ((x @ a.T) @ b.T)


def _check_shapes(layer: nnx.Module, a: np.ndarray, b: np.ndarray) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features \
            or a.shape[0] != b.shape[1]:
        raise TlcoreError(f"LoRA tensors for a {layer.in_features}->{layer.out_features} dense layer must be "
                          f"A (rank, {layer.in_features}) and B ({layer.out_features}, rank), got A {a.shape} and "
                          f"B {b.shape}")


def add_lora(layer: nnx.Module, scale: float, dropout: float, a: np.ndarray, b: np.ndarray,
             seed: int = 0) -> None:
    """Adapt the dense ``layer`` in place (see the module's docstring): its output becomes
    ``base(x) + scale * (drop(x) @ a.T) @ b.T`` with ``a`` (rank, in) and ``b`` (out, rank) as the
    new parameters ``lora_A`` and ``lora_B``, in the kernel's dtype; ``dropout``: the rate of the
    adapter's input dropout (0: none, no random state added); ``seed``: its stream's initial key
    (a run reseeds it).

    Example:
        >>> layer = CanonicalLinear(4, 3)
        >>> add_lora(layer, 0.5, 0.1, np.zeros((2, 4), np.float32), np.zeros((3, 2), np.float32))
        >>> layer.lora_rate, layer.deterministic
        (0.1, True)
    """
    if is_adapted(layer):
        raise TlcoreError(f"this {type(layer)._lora_base.__name__} already has a LoRA adapter; remove it first")
    if not isinstance(layer, DENSE):
        raise TlcoreError(f"LoRA adapts nnx.Linear and CanonicalLinear layers, not {type(layer).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise TlcoreError(f"the LoRA dropout rate must be in [0, 1), got {dropout}")
    a, b = np.asarray(a), np.asarray(b)
    _check_shapes(layer, a, b)
    dtype = getattr(layer, kernel_name(layer)).get_value().dtype
    object.__setattr__(layer, "__class__", lora_class(type(layer)))  # nnx's __setattr__ would store it as a field
    layer.lora_A = nnx.Param(jnp.asarray(a, dtype=dtype))
    layer.lora_B = nnx.Param(jnp.asarray(b, dtype=dtype))
    layer.lora_scale = float(scale)
    if dropout > 0:
        layer.lora_rate = float(dropout)
        layer.lora_rng = nnx.RngStream(jax.random.key(seed), tag="lora_dropout")
        if "deterministic" not in vars(layer):
            layer.deterministic = True
            layer.lora_flag = True  # the flag is the adapter's: removed with it


def remove_lora(layer: nnx.Module) -> None:
    """Undo :func:`add_lora` on ``layer`` in place: the adapter's attributes are deleted and the
    base class restored, so it computes (and its pytree is) the base layer's again.

    Example:
        >>> remove_lora(layer); is_adapted(layer)   # doctest: +SKIP
        False
    """
    if not is_adapted(layer):
        raise TlcoreError(f"this {type(layer).__name__} has no LoRA adapter")
    attrs = vars(layer)
    if attrs.get("lora_flag"):
        del layer.deterministic
    for attr in (*LORA_ATTRS, "lora_flag"):
        if attr in attrs:
            delattr(layer, attr)
    object.__setattr__(layer, "__class__", type(layer)._lora_base)


def dense_layers(module: nnx.Module) -> list[tuple[Path, nnx.Module]]:
    """``(native path, layer)`` of every dense layer (:data:`DENSE`) below ``module``, each once
    (a shared layer at its first path), in definition order as far as the module's attributes keep
    it (``nnx.clone`` sorts them), then any reached only by ``nnx.iter_graph``.

    Example:
        >>> net = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(0)))
        >>> [p for p, _ in dense_layers(net)]
        [('layers', 0), ('layers', 2)]
    """
    graph = {id(n): tuple(p) for p, n in nnx.iter_graph(module) if isinstance(n, DENSE)}
    found: dict[int, tuple[Path, nnx.Module]] = {}

    def walk(node: Any, prefix: Path) -> None:
        for _, segs, child in _children(node):
            if isinstance(child, DENSE) and id(child) not in found:
                found[id(child)] = (prefix + segs, child)
            elif isinstance(child, nnx.Module):
                walk(child, prefix + segs)

    walk(module, ())
    for p, n in nnx.iter_graph(module):
        if isinstance(n, DENSE) and id(n) not in found:
            found[id(n)] = (tuple(p), n)
    # the graph's path is the one layout names (a shared layer's first path there)
    return [(graph.get(i, path), layer) for i, (path, layer) in found.items()]


def call_rank(module: nnx.Module, paths: list[Path], example: Any, forward: Any, prepare: Any) -> dict[Path, int]:
    """``{path: rank}`` of the layers at ``paths`` in the order ``forward(module, example)`` first
    calls them, found in one abstract run (``jax.eval_shape``; ``module`` is not changed); layers
    never called are left out, and so is everything when the run fails or ``example`` is None.

    Example:
        >>> call_rank(net, [("layers", 2), ("layers", 0)], x, lambda m, x: m(x), lambda m: None)   # doctest: +SKIP
        {('layers', 0): 0, ('layers', 2): 1}
    """
    if example is None or not paths:
        return {}
    seen: dict[str, int] = {}
    keys = {repr(p): p for p in paths}

    def run(copy: nnx.Module, x: Any) -> Any:
        prepare(copy)
        for key, path in keys.items():
            layer = get_path(copy, path)
            set_path(get_path(copy, path[:-1]), path[-1], _Recorder(layer, key, seen))
        return forward(copy, x)

    try:
        jax.eval_shape(run, module, example)
    except Exception:  # noqa: BLE001 - the order is then the definition order
        return {}
    return {keys[k]: i for k, i in seen.items()}


def lora_targets(module: nnx.Module, module_path: dict[str, Path], layers: list[str], head: str | None,
                 order: dict[Path, int] | None = None) -> list[LoraTarget]:
    """Every dense layer of ``module`` outside the layer ``head`` (None: no head) as a
    :class:`~tlcore.adapters.LoraTarget`, adapted or not: ``module`` its tlcore name (from
    ``module_path``, name -> native path), ``kernel`` ``<module>.weight`` (transposed False,
    :class:`CanonicalLinear`) or ``<module>.kernel`` (transposed True, ``nnx.Linear``). Sorted by
    the position of their owning layer in ``layers``, then by ``order`` (native path -> call rank,
    see :func:`call_rank`; layers it lacks after those it has), then definition order.

    Example:
        >>> [t.module for t in lora_targets(vit, lay.module_path, lay.layers, "fc")][:2]   # doctest: +SKIP
        ['blocks.0.attn.qkv', 'blocks.0.attn.proj']
    """
    name_of = {tuple(p): n for n, p in module_path.items()}
    known, rank = set(layers), {name: i for i, name in enumerate(layers)}
    order = order or {}
    keyed = []
    for i, (path, layer) in enumerate(dense_layers(module)):
        name = name_of.get(path)
        if name is None:
            continue
        owner = owning_layer(name, known)
        if head is not None and in_layer(owner, head):
            continue
        canonical = kernel_name(layer) == "weight"
        target = LoraTarget(name, f"{name}.{kernel_name(layer)}", int(layer.in_features), int(layer.out_features),
                            transposed=not canonical)
        keyed.append(((rank.get(owner, -1), order.get(path, len(order)), i), target))
    return [t for _, t in sorted(keyed, key=lambda kt: kt[0])]


def dropout_seed(name: str) -> int:
    """A dropout stream's initial seed from its module's name (a run reseeds it).

    Example:
        >>> dropout_seed("0") == dropout_seed("0") != dropout_seed("1")
        True
    """
    return zlib.crc32(name.encode()) & 0x7FFFFFFF
