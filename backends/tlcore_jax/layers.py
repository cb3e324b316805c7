"""Small Flax NNX building blocks: a named sequential container tlcore can cut anywhere, a head's
pooling (:class:`Pool`, masked on tokens) and activations as modules (so heads have readable layer
names), tlcore's heads (:class:`HeadModule`), and layers that keep PyTorch's variable names and
layouts (``Canonical*``, for the zoo's portable models).

Example:
    >>> from flax import nnx
    >>> from tlcore_jax.layers import NamedSequential, Pool
    >>> rngs = nnx.Rngs(0)
    >>> net = NamedSequential(conv=nnx.Conv(3, 8, (3, 3), rngs=rngs), relu=nnx.relu, pool=Pool("avg"),
    ...                       fc=nnx.Linear(8, 2, rngs=rngs))
    >>> net.names
    ('conv', 'relu', 'pool', 'fc')
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tlcore.head import POOLS, HeadError

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # PyTorch's and Keras' default (erf)
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
}


class NamedSequential(nnx.Module):
    """Layers kept as named attributes and applied in order, each on the previous one's output.

    Any callable can be a layer: an ``nnx.Module`` (stored as a submodule, so its variables are named
    ``<layer>.<variable>``) or a plain function such as ``nnx.relu`` (static). tlcore can cut a
    ``NamedSequential`` after any of its layers, and after any layer of a ``NamedSequential`` or
    ``nnx.Sequential`` nested in it (``"block1.conv"``).

    The first layer takes the container's inputs as they are given (one array, several positional
    ones, or keyword ones such as ``input_ids=..., attention_mask=...``); each later layer takes the
    output of the one before, and a head built by tlcore (:class:`HeadModule`) also the
    ``attention_mask`` keyword input, for its pooling.

    Args:
        layers: ``{name: layer}`` or ``[(name, layer), ...]``, in forward order.
        **named: more layers by keyword, after ``layers``.

    Example:
        >>> rngs = nnx.Rngs(0)                                              # doctest: +SKIP
        >>> net = NamedSequential(fc1=nnx.Linear(4, 8, rngs=rngs), relu=nnx.relu,
        ...                       fc2=nnx.Linear(8, 2, rngs=rngs))           # doctest: +SKIP
        >>> net(jnp.ones((1, 4))).shape                                     # doctest: +SKIP
        (1, 2)
    """

    def __init__(self, layers: Mapping[str, Callable] | Iterable[tuple[str, Callable]] = (), /,
                 **named: Callable):
        pairs = list(layers.items()) if isinstance(layers, Mapping) else list(layers)
        pairs += list(named.items())
        names: list[str] = []
        for name, layer in pairs:
            _check_layer_name(name, names)
            if not callable(layer):
                raise TypeError(f"NamedSequential layer {name!r} is not callable: {layer!r}")
            setattr(self, name, layer)
            names.append(name)
        self._names = tuple(names)

    @property
    def names(self) -> tuple[str, ...]:
        """The layer names, in forward order."""
        return self._names

    def items(self) -> Iterator[tuple[str, Callable]]:
        """``(name, layer)`` pairs in forward order."""
        return ((n, getattr(self, n)) for n in self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, name: str) -> Callable:
        if name not in self._names:
            raise KeyError(f"no layer {name!r}; layers: {list(self._names)}")
        return getattr(self, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return run_chain([layer for _, layer in self.items()], args, kwargs)


def run_chain(layers: list[Callable], args: tuple, kwargs: dict) -> Any:
    """Apply ``layers`` in order: the first to ``(*args, **kwargs)``, each later one to the output of
    the one before (a :class:`HeadModule` also to ``kwargs["attention_mask"]``, when given). With no
    layers, the single positional input is returned.

    Example:
        >>> run_chain([jnp.negative, jnp.abs], (jnp.array([-2.0]),), {})   # doctest: +SKIP
        Array([2.], dtype=float32)
    """
    if not layers:
        if len(args) != 1 or kwargs:
            raise TypeError("an empty sequential container passes through exactly one positional input")
        return args[0]
    x = layers[0](*args, **kwargs)
    mask = kwargs.get("attention_mask")
    for layer in layers[1:]:
        x = layer(x, mask=mask) if isinstance(layer, HeadModule) else layer(x)
    return x


_RESERVED = frozenset(dir(NamedSequential)) | {"_names"}


def _check_layer_name(name: object, taken: list[str]) -> None:
    if not isinstance(name, str) or not name or "." in name or name.startswith("_") or name in _RESERVED:
        raise ValueError(f"invalid NamedSequential layer name {name!r}: use a non-empty string without dots "
                         f"that does not start with '_' and is not one of the container's own attributes")
    if name in taken:
        raise ValueError(f"duplicate NamedSequential layer name {name!r}")


class Pool(nnx.Module):
    """A head's global pooling, exactly ``tlcore.head.pool_reference``: inputs with at most 2
    dimensions pass through; ``"flatten"`` flattens the rest; on token features (N, T, D) ``"avg"``
    and ``"mean"`` average the tokens, ``"max"`` takes their maximum, ``"cls"`` the first and
    ``"last"`` the last one, where ``mean``, ``max`` and ``last`` keep only the tokens an attention
    ``mask`` (N, T) marks (> 0; ``mean`` weights by it); on images (N, H, W, C) ``"max"`` takes the
    maximum over H, W and the others their mean.

    Example:
        >>> Pool("avg")(jnp.ones((2, 4, 4, 3))).shape                          # doctest: +SKIP
        (2, 3)
        >>> Pool("last")(jnp.arange(6.0).reshape(1, 3, 2), mask=jnp.array([[1, 1, 0]]))  # doctest: +SKIP
        Array([[2., 3.]], dtype=float32)
    """

    def __init__(self, mode: str = "avg"):
        if mode not in POOLS:
            raise ValueError(f"Pool mode must be one of {POOLS}, got {mode!r}")
        self.mode = mode

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        if x.ndim <= 2:
            return x
        if self.mode == "flatten":
            return x.reshape(x.shape[0], -1)
        if x.ndim == 3:
            return token_pool(x, self.mode, mask)
        axes = tuple(range(1, x.ndim - 1))
        return x.max(axis=axes) if self.mode == "max" else x.mean(axis=axes)


def token_pool(x: jax.Array, mode: str, mask: jax.Array | None) -> jax.Array:
    """Pool token features ``x`` (N, T, D) over T (see :class:`Pool`); ``mask`` (N, T) or None."""
    if mode == "cls":
        return x[:, 0]
    if mask is None or mode == "avg":
        return x[:, -1] if mode == "last" else x.max(axis=1) if mode == "max" else x.mean(axis=1)
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise HeadError(f"the attention_mask has shape {tuple(mask.shape)}, but the features before the head have "
                        f"shape {tuple(x.shape)}: pool={mode!r} needs one mask value per token, shape "
                        f"{tuple(x.shape[:2])}")
    keep = mask > 0
    if mode == "last":
        idx = x.shape[1] - 1 - jnp.argmax(keep[:, ::-1], axis=1)
        return jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
    if mode == "max":
        return jnp.where(keep[..., None], x, -jnp.inf).max(axis=1)
    weights = mask.astype(x.dtype)
    return (x * weights[..., None]).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)[:, None]


class HeadModule(NamedSequential):
    """A head built by tlcore from a ``tl.Head`` (layers ``pool``, ``fc0``, ``act0``, ``drop0``, ...,
    ``out``): its :class:`Pool` takes the attention mask of token features.

    Example:
        >>> head = HeadModule([("pool", Pool("mean")), ("out", CanonicalLinear(8, 3))])   # doctest: +SKIP
        >>> head(tokens, mask=attention_mask).shape                                         # doctest: +SKIP
        (4, 3)
    """

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for _, layer in self.items():
            x = layer(x, mask) if isinstance(layer, Pool) else layer(x)
        return x

    def after_pool(self) -> NamedSequential:
        """The layers after the pool, sharing their variables: what trains on cached (pooled) features."""
        return NamedSequential([(name, layer) for name, layer in self.items() if not isinstance(layer, Pool)])


class Activation(nnx.Module):
    """An activation function by name (``relu``, ``gelu`` (exact), ``tanh``, ``silu``) as a layer.

    Example:
        >>> Activation("relu")(jnp.array([-1.0, 2.0]))   # doctest: +SKIP
        Array([0., 2.], dtype=float32)
    """

    def __init__(self, name: str = "relu"):
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
        self.name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.name](x)


# ---------------------------------------------------------------- PyTorch-layout layers (zoo models)
# The zoo's models have the same state on every backend: PyTorch's names (``weight``, ``bias``,
# ``running_mean``, ``running_var``) and layouts (convolution ``(out, in, kh, kw)``, dense
# ``(out, in)``). These layers store their variables that way and compute on NHWC inputs.


class CanonicalLinear(nnx.Module):
    """A dense layer with PyTorch's ``weight (out, in)`` and ``bias (out,)`` (``y = x W^T + b``).

    Example:
        >>> CanonicalLinear(4, 2)(jnp.ones((3, 4))).shape   # doctest: +SKIP
        (3, 2)
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, rngs: nnx.Rngs | None = None):
        bound = 1.0 / in_features ** 0.5  # nn.Linear's default initialisation
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw, kb = rngs.params(), rngs.params()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nnx.Param(jax.random.uniform(kw, (out_features, in_features), minval=-bound, maxval=bound))
        self.bias = nnx.Param(jax.random.uniform(kb, (out_features,), minval=-bound, maxval=bound)) if use_bias \
            else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.weight[...].T
        return y if self.bias is None else y + self.bias[...]


class CanonicalConv(nnx.Module):
    """A 2-D convolution on NHWC inputs with PyTorch's ``weight (out, in, kh, kw)`` and symmetric
    integer padding.

    Example:
        >>> CanonicalConv(3, 8, 3, padding=1)(jnp.ones((1, 8, 8, 3))).shape   # doctest: +SKIP
        (1, 8, 8, 8)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 *, use_bias: bool = True, rngs: nnx.Rngs | None = None):
        fan_in = in_channels * kernel_size * kernel_size
        kw = (rngs if rngs is not None else nnx.Rngs(0)).params()
        self.in_features, self.out_features = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kernel_size, kernel_size), stride, padding
        self.weight = nnx.Param(jax.random.normal(kw, (out_channels, in_channels, kernel_size, kernel_size))
                                * (2.0 / fan_in) ** 0.5)
        self.bias = nnx.Param(jnp.zeros((out_channels,))) if use_bias else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        y = jax.lax.conv_general_dilated(x, self.weight[...], (self.stride, self.stride), [(p, p), (p, p)],
                                         dimension_numbers=("NHWC", "OIHW", "NHWC"))
        return y if self.bias is None else y + self.bias[...]


class CanonicalBatchNorm(nnx.Module):
    """BatchNorm over the last axis with PyTorch's names and update rule: ``weight``, ``bias``,
    ``running_mean``, ``running_var`` (the unbiased batch variance), ``momentum`` the weight of the
    new statistic (0.1). Runs on its running statistics when ``use_running_average`` is True (tlcore
    sets it: inference, or frozen). Statistics and normalisation are computed in (at least) float32,
    the output has the input's dtype (mixed precision).

    Example:
        >>> bn = CanonicalBatchNorm(8)                                # doctest: +SKIP
        >>> bn(jnp.ones((2, 4, 4, 8))).shape                          # doctest: +SKIP
        (2, 4, 4, 8)
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5,
                 use_running_average: bool = False):
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.use_running_average = use_running_average
        self.weight = nnx.Param(jnp.ones((num_features,)))
        self.bias = nnx.Param(jnp.zeros((num_features,)))
        self.running_mean = nnx.BatchStat(jnp.zeros((num_features,)))
        self.running_var = nnx.BatchStat(jnp.ones((num_features,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # statistics in float32 under mixed precision
        if self.use_running_average:
            mean, var = self.running_mean[...], self.running_var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean, var = xs.mean(axis=axes), xs.var(axis=axes)
            n = x.size // x.shape[-1]
            m = self.momentum
            stat_mean, stat_var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var) * n / max(n - 1, 1)
            self.running_mean.set_value((1 - m) * self.running_mean[...] + m * stat_mean)
            self.running_var.set_value((1 - m) * self.running_var[...] + m * stat_var)
        y = (xs - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]
        return y.astype(x.dtype)

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view(model, use_running_average=...)``, as on ``nnx.BatchNorm``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average


class CanonicalLayerNorm(nnx.Module):
    """LayerNorm over the last axis with PyTorch's ``weight`` and ``bias``.

    Example:
        >>> CanonicalLayerNorm(8, eps=1e-6)(jnp.ones((2, 5, 8))).shape   # doctest: +SKIP
        (2, 5, 8)
    """

    def __init__(self, dim: int, *, eps: float = 1e-5):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,)))
        self.bias = nnx.Param(jnp.zeros((dim,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = x.mean(axis=-1, keepdims=True)
        var = x.var(axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]
