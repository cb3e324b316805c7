"""Framework-neutral head specs, and the head plan every backend builds from.

A head pools the features it receives (``pool="avg"``: the mean over every axis but the channels,
i.e. global average pooling of images and the mean over the tokens of a sequence; ``"flatten"``),
then runs its hidden dense layers (activation, optional dropout) and a final dense layer with
``num_classes`` outputs.

The core plans the head (:func:`plan_head`: the width after pooling, the dense tensors' names and
shapes in PyTorch's layout) and draws its initial values in numpy from ``seed`` and the tensor names
(:func:`initial_values`), so the same head starts from the same weights on every backend, whenever
it is built. Backends only build the layers and write those values.

Example:
    >>> from tlcore import Head
    >>> Head.linear(num_classes=5).layers()
    [('pool', 'pool'), ('out', 'dense')]
    >>> [n for n, _ in Head.mlp(hidden=(64,), num_classes=5, dropout=0.1).layers()]
    ['pool', 'fc0', 'act0', 'drop0', 'out']
    >>> plan = plan_head(Head.mlp(hidden=(8,), num_classes=3), feature_shape=(4, 4, 16), channels_last=True)
    >>> plan.width, plan.tensor_shapes()
    (16, {'fc0.weight': (8, 16), 'fc0.bias': (8,), 'out.weight': (3, 8), 'out.bias': (3,)})
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import TlcoreError, short_repr

#: the most parameters a head (or a zoo model, see ``tlcore.zoo``) may have: 2**27, 512 MiB of float32.
#: Sizes are checked against it before anything is allocated, so a typo (``Head.linear(10**10)``) or a
#: hostile checkpoint is refused with a named error instead of exhausting memory.
MAX_PARAMS = 2 ** 27
#: the largest size of one dimension (a width, a number of classes)
MAX_SIZE = 2 ** 24
#: the most hidden layers a head may have
MAX_HIDDEN_LAYERS = 64

ACTIVATIONS = ("relu", "gelu", "tanh", "silu")
#: ``avg``: mean over every axis but the channels (images: global average pooling; tokens: the mean
#: of all tokens); ``flatten``; ``max``: the max over the same axes (honouring the attention mask on
#: tokens); ``mean``: the mean of the tokens the attention mask keeps; ``cls``: the first token;
#: ``last``: the last token the attention mask keeps (the last one without a mask)
POOLS = ("avg", "flatten", "max", "mean", "cls", "last")
TOKEN_POOLS = ("mean", "cls", "last")


class HeadError(TlcoreError, ValueError):
    """A head spec has an invalid value, or cannot be sized from the features it receives."""


def _positive_int(name: str, value: object, maximum: int = MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= maximum:
        raise HeadError(f"{name} must be an int in [1, {maximum}], got {short_repr(value)}")
    return int(value)


def dense_params(sizes: Sequence[int]) -> int:
    """Weights and biases of a chain of dense layers through ``sizes`` (``[in, hidden..., out]``).

    Example:
        >>> dense_params([4, 8, 3])   # (4 * 8 + 8) + (8 * 3 + 3)
        67
    """
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))


@dataclass(frozen=True)
class Head:
    """A classification/regression head. Build it with :meth:`linear` or :meth:`mlp`."""

    num_classes: int
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    activation: str = "relu"
    pool: str = "avg"

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_classes", _positive_int("num_classes", self.num_classes))
        if isinstance(self.hidden, (str, bytes)) or not isinstance(self.hidden, Sequence) \
                or len(self.hidden) > MAX_HIDDEN_LAYERS:
            raise HeadError(f"hidden must be a sequence of at most {MAX_HIDDEN_LAYERS} ints in [1, {MAX_SIZE}], "
                            f"got {short_repr(self.hidden)}")
        object.__setattr__(self, "hidden", tuple(_positive_int("hidden sizes", h) for h in self.hidden))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) \
                or not 0.0 <= self.dropout < 1.0:
            raise HeadError(f"dropout must be a number in [0, 1), got {short_repr(self.dropout)}")
        object.__setattr__(self, "dropout", float(self.dropout))
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise HeadError(f"unknown activation {short_repr(self.activation)}; valid: {ACTIVATIONS}")
        if not isinstance(self.pool, str) or self.pool not in POOLS:
            raise HeadError(f"unknown pool {short_repr(self.pool)}; valid: {POOLS}")
        least = dense_params([1, *self.hidden, self.num_classes])  # with a single input feature
        if least > MAX_PARAMS:
            raise HeadError(f"this head would have at least {least:,} parameters (hidden={self.hidden}, "
                            f"num_classes={self.num_classes}), more than tl.head.MAX_PARAMS = {MAX_PARAMS:,}")

    @classmethod
    def linear(cls, num_classes: int, *, pool: str = "avg") -> Head:
        """One dense layer from the (pooled) features to ``num_classes`` outputs."""
        return cls(num_classes=num_classes, pool=pool)

    @classmethod
    def mlp(cls, hidden: Sequence[int] = (128,), *, num_classes: int, dropout: float = 0.0,
            activation: str = "relu", pool: str = "avg") -> Head:
        """Hidden dense layers with ``activation`` (and dropout), then the output layer."""
        return cls(num_classes=num_classes, hidden=hidden, dropout=dropout, activation=activation, pool=pool)

    def layers(self) -> list[tuple[str, str]]:
        """``(name, kind)`` of each layer in order; kinds: pool, dense, activation, dropout.

        Every backend names the head's layers (and so its tensors) after this list.
        """
        out: list[tuple[str, str]] = [("pool", "pool")]
        for i, _ in enumerate(self.hidden):
            out += [(f"fc{i}", "dense"), (f"act{i}", "activation")]
            if self.dropout:
                out.append((f"drop{i}", "dropout"))
        return out + [("out", "dense")]

    def to_dict(self) -> dict:
        return {"num_classes": self.num_classes, "hidden": list(self.hidden), "dropout": self.dropout,
                "activation": self.activation, "pool": self.pool}

    @classmethod
    def from_dict(cls, d: dict) -> Head:
        """The head :meth:`to_dict` describes; every field is checked (e.g. when read from a file).

        Raises:
            HeadError: ``d`` is not such a dict, or a value has the wrong type or is out of bounds.
        """
        fields = ("num_classes", "hidden", "dropout", "activation", "pool")
        if not isinstance(d, dict) or "num_classes" not in d:
            raise HeadError(f"a head is a dict with 'num_classes' (and {fields[1:]}), got {short_repr(d)}")
        unknown = [k for k in d if k not in fields]
        if unknown:
            raise HeadError(f"unknown head field {short_repr(unknown[0])}; valid: {fields}")
        return cls(num_classes=d["num_classes"], hidden=d.get("hidden", ()), dropout=d.get("dropout", 0.0),
                   activation=d.get("activation", "relu"), pool=d.get("pool", "avg"))


@dataclass(frozen=True)
class HeadPlan:
    """A head sized for its features: ``width`` features per sample after pooling.

    ``feature_shape`` is the per-sample shape of the features the head receives (in the backend's
    layout; ``None`` when the head was sized from a width alone, e.g. from a checkpoint).
    """

    spec: Head
    width: int
    feature_shape: tuple[int | None, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, Head):
            raise HeadError(f"HeadPlan takes a tl.Head, got {type(self.spec).__name__}")
        object.__setattr__(self, "width", _positive_int("the head's input width", self.width))
        n = self.num_params()
        if n > MAX_PARAMS:
            raise HeadError(f"this head would have {n:,} parameters on features of width {self.width:,} "
                            f"(num_classes={self.spec.num_classes}, hidden={self.spec.hidden}), more than "
                            f"tl.head.MAX_PARAMS = {MAX_PARAMS:,}; pool the features (pool='avg') or cut earlier")

    def dense_layers(self) -> list[tuple[str, int, int]]:
        """``(name, in_features, out_features)`` of each dense layer, in order."""
        sizes = [self.width, *self.spec.hidden, self.spec.num_classes]
        names = [f"fc{i}" for i in range(len(self.spec.hidden))] + ["out"]
        return [(name, sizes[i], sizes[i + 1]) for i, name in enumerate(names)]

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of the head's tensors in PyTorch's layout (``weight`` is (out, in))."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, fan_in, fan_out in self.dense_layers():
            shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (fan_out, fan_in), (fan_out,)
        return shapes

    def num_params(self) -> int:
        return dense_params([self.width, *self.spec.hidden, self.spec.num_classes])


def pooled_width(feature_shape: Sequence[int | None], pool: str, channels_last: bool) -> int | None:
    """Features per sample after pooling ``feature_shape`` (per sample), or None when a size it needs
    is unknown. ``avg`` keeps the channels (axis -1 when ``channels_last`` or for 1-D/2-D shapes such
    as tokens x dims, else axis 0); ``flatten`` keeps everything.

    Example:
        >>> pooled_width((512, 7, 7), "avg", channels_last=False), pooled_width((None, None, 64), "avg", True)
        (512, 64)
        >>> pooled_width((7, 7, 8), "flatten", True), pooled_width((None, 8), "flatten", True) is None
        (392, True)
    """
    shape = tuple(feature_shape)
    if not shape:
        return 1
    if pool == "flatten" or len(shape) == 1:
        return None if any(d is None for d in shape) else int(math.prod(shape))
    channels = shape[-1] if channels_last or len(shape) == 2 else shape[0]
    return None if channels is None else int(channels)


def plan_head(spec: Head, feature_shape: Sequence[int | None], channels_last: bool) -> HeadPlan | None:
    """The :class:`HeadPlan` of ``spec`` on features of per-sample ``feature_shape``; None when the
    width cannot be known from it (the head is then built on the first batch)."""
    if spec.pool in TOKEN_POOLS and len(feature_shape) not in (1, 2):
        raise HeadError(f"pool={spec.pool!r} takes token features (tokens, dims) per sample, but the features "
                        f"before the head have shape {tuple(feature_shape)}; use pool='avg', 'max' or 'flatten'")
    width = pooled_width(feature_shape, spec.pool, channels_last)
    if width is None:
        return None
    if width < 1:
        raise HeadError(f"the features before the head have shape {tuple(feature_shape)}: nothing to pool")
    return HeadPlan(spec, width, tuple(feature_shape))


def pool_reference(x: np.ndarray, pool: str, mask: np.ndarray | None = None, channels_last: bool = True) -> np.ndarray:
    """What every backend's head computes in its ``pool`` layer, in numpy (float64): ``x`` is a batch
    of features, ``mask`` an optional (batch, tokens) attention mask (1 = a real token) for token
    features (batch, tokens, dims).

    Example:
        >>> x = np.arange(12.0).reshape(1, 3, 4)            # one sequence of 3 tokens, 4 dims
        >>> mask = np.array([[1, 1, 0]])                      # the third token is padding
        >>> pool_reference(x, "mean", mask).tolist(), pool_reference(x, "last", mask).tolist()
        ([[2.0, 3.0, 4.0, 5.0]], [[4.0, 5.0, 6.0, 7.0]])
        >>> pool_reference(x, "cls").tolist(), pool_reference(x, "max", mask).tolist()
        ([[0.0, 1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0, 7.0]])
    """
    x = np.asarray(x, np.float64)
    if x.ndim <= 2:
        return x
    if pool == "flatten":
        return x.reshape(len(x), -1)
    if x.ndim == 3:  # tokens
        m = np.ones(x.shape[:2]) if mask is None else np.asarray(mask, np.float64)
        if pool == "cls":
            return x[:, 0]
        if pool == "last":
            idx = x.shape[1] - 1 - np.argmax(m[:, ::-1] > 0, axis=1)
            return x[np.arange(len(x)), idx]
        if pool == "max":
            return np.where(m[..., None] > 0, x, -np.inf).max(axis=1)
        if pool == "mean":
            return (x * m[..., None]).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)[:, None]
        return x.mean(axis=1)
    axes = tuple(range(1, x.ndim - 1)) if channels_last else tuple(range(2, x.ndim))
    return x.max(axis=axes) if pool == "max" else x.mean(axis=axes)


def initial_values(plan: HeadPlan, seed: int) -> dict[str, np.ndarray]:
    """The head's initial weights (float32, PyTorch's layout), from ``seed`` and each tensor's name
    and shape only: as ``nn.Linear``, weights and biases uniform in +-1/sqrt(fan_in).

    Example:
        >>> plan = HeadPlan(Head.linear(2), width=4)
        >>> v = initial_values(plan, seed=0)
        >>> sorted(v), v["out.weight"].shape, bool(np.abs(v["out.weight"]).max() <= 0.5)
        (['out.bias', 'out.weight'], (2, 4), True)
        >>> bool((initial_values(plan, seed=0)["out.bias"] == v["out.bias"]).all())
        True
    """
    from .init import init_state

    shapes = {name: np.zeros(shape, np.float32) for name, shape in plan.tensor_shapes().items()}
    return init_state(shapes, seed)
