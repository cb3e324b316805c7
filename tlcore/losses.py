"""Framework-neutral loss specs with PyTorch's exact semantics, and their numpy references.

Each spec is a frozen (hashable) dataclass, validated when it is built, that every backend translates
once. Its :meth:`LossSpec.reference` and :meth:`LossSpec.reference_grad` compute the mean loss and
its gradient with respect to the predictions in float64 with numpy only, so the conformance kit can
check every backend against the same numbers.

Weighted means. Every loss has a per-sample value ``L_i`` (the mean over a sample's outputs for
:class:`BinaryCrossEntropy`, :class:`MSE` and :class:`Huber`; torch's ``reduction="none"`` value for
:class:`CrossEntropy`, which already contains the class weights) and a denominator weight ``d_i``.
With per-sample weights ``s`` (non-negative, default 1) the mean loss is::

    sum_i s_i * L_i / sum_i s_i * d_i

where ``d_i = class_weight[y_i]`` for :class:`CrossEntropy` with integer labels (1 without class
weights) and ``d_i = 1`` otherwise. Without ``sample_weight`` this is exactly torch's
``reduction="mean"``; without label smoothing and with integer labels it is
``sum(w_i * nll_i) / sum(w_i)`` with ``w_i = s_i * class_weight[y_i]``: the product of the two
weights. Torch does not normalise probability targets by the class weights, and neither does this.

Example:
    >>> import numpy as np
    >>> from tlcore.losses import CrossEntropy, as_loss
    >>> spec = CrossEntropy(label_smoothing=0.1)
    >>> round(spec.reference(np.zeros((2, 4)), np.array([0, 3])), 6)    # log(4): all logits 0
    1.386294
    >>> as_loss("huber").to_dict()
    {'kind': 'huber', 'delta': 1.0}
    >>> CrossEntropy(label_smoothing=1.0)
    Traceback (most recent call last):
    ...
    tlcore.losses.LossConfigError: CrossEntropy: label_smoothing must be in [0, 1), got 1.0
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import numpy as np

from .data import as_float, to_numpy
from .errors import DataError, OptimizerConfigError, unknown_name_message

__all__ = [
    "BinaryCrossEntropy",
    "CrossEntropy",
    "Huber",
    "LOSSES",
    "LossConfigError",
    "LossSpec",
    "MSE",
    "PROBABILITY_TOLERANCE",
    "as_loss",
    "check_probability_rows",
    "check_sample_weight",
    "check_targets",
    "loss_from_dict",
    "with_class_weight",
]

#: how far from 1 a row of class probabilities may sum
PROBABILITY_TOLERANCE = 1e-3


class LossConfigError(OptimizerConfigError):
    """A loss spec has an invalid value (an :class:`~tlcore.errors.OptimizerConfigError`, so code that
    catches those for loss specs keeps working)."""


# ---- validation helpers ----

def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _weight(owner: str, name: str, value: Any) -> float:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise LossConfigError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
    return as_float(value)


def _class_index(owner: str, key: Any) -> int:
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, numbers.Integral) or key < 0:
        raise LossConfigError(f"{owner}: class_weight keys must be class indices (ints >= 0), got {key!r}")
    return int(key)


def _is_pair(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2 and not _is_real(item)


def _normalize_class_weight(cw: Any) -> tuple | None:
    """``None``; a tuple of floats (one per class, from a sequence); or a tuple of ``(class, weight)``
    pairs sorted by class (from a mapping: the classes not named weigh 1)."""
    owner = "CrossEntropy"
    if cw is None:
        return None
    if isinstance(cw, np.ndarray):
        cw = cw.tolist()
    if isinstance(cw, Mapping):
        items = list(cw.items())
    elif isinstance(cw, Sequence) and not isinstance(cw, (str, bytes)) and cw and all(_is_pair(i) for i in cw):
        items = [tuple(i) for i in cw]   # the canonical pairs (dataclasses.replace, JSON lists)
    elif isinstance(cw, Sequence) and not isinstance(cw, (str, bytes)):
        if not cw:
            raise LossConfigError(f"{owner}: class_weight is empty; give one weight per class, a "
                                  "{class: weight} mapping, or None")
        weights = tuple(_weight(owner, f"class_weight[{i}]", w) for i, w in enumerate(cw))
        if not any(weights):
            raise LossConfigError(f"{owner}: class_weight must have a weight > 0, got all zeros {list(cw)!r}")
        return weights
    else:
        raise LossConfigError(f"{owner}: class_weight must be a {{class: weight}} mapping, a sequence of weights "
                              f"(one per class) or None, got {type(cw).__name__}: {cw!r}")
    if not items:
        raise LossConfigError(f"{owner}: class_weight is an empty mapping; give None for no class weights")
    pairs: dict[int, float] = {}
    for key, w in items:
        c = _class_index(owner, key)
        if c in pairs:
            raise LossConfigError(f"{owner}: class_weight names class {c} twice")
        pairs[c] = _weight(owner, f"class_weight[{c}]", w)
    return tuple(sorted(pairs.items()))


def check_sample_weight(sample_weight: Any, n: int, name: str = "sample_weight") -> np.ndarray:
    """Per-sample weights as float64 of shape ``(n,)``: finite and >= 0, else a :class:`DataError`.

    Args:
        sample_weight: An array-like of shape ``(n,)``, or None (every sample weighs 1).
        n: The number of samples.
        name: The name to use in error messages.

    Returns:
        The weights (ones for None).

    Example:
        >>> check_sample_weight([1, 0.5], 2).tolist()
        [1.0, 0.5]
        >>> check_sample_weight([1, -1], 2)
        Traceback (most recent call last):
        ...
        tlcore.errors.DataError: sample_weight must be >= 0; sample 1 has weight -1.0
    """
    if sample_weight is None:
        return np.ones(n, dtype=np.float64)
    try:
        w = np.asarray(to_numpy(sample_weight), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name} must be numbers, got {type(sample_weight).__name__}: {e}") from None
    if w.shape != (n,):
        raise DataError(f"{name} must have shape ({n},) (one weight per sample), got shape {w.shape}")
    bad = np.flatnonzero(~np.isfinite(w))
    if bad.size:
        raise DataError(f"{name} must be finite; sample {bad[0]} has weight {w[bad[0]]}")
    neg = np.flatnonzero(w < 0)
    if neg.size:
        raise DataError(f"{name} must be >= 0; sample {neg[0]} has weight {w[neg[0]]}")
    return w


def _array(value: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(to_numpy(value))
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{name} must be a numeric array, got {type(value).__name__}: {e}") from None
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr


def _finite_float(arr: np.ndarray, name: str, dtype: Any) -> np.ndarray:
    out = arr.astype(dtype)
    if not np.isfinite(out).all():
        bad = int(out.size - np.isfinite(out).sum())
        raise DataError(f"{name} contains {bad} NaN or infinite value(s)")
    return out


def check_probability_rows(p: np.ndarray, name: str = "y") -> None:
    """Refuse (with a :class:`DataError`) rows of class probabilities outside [0, 1] or not summing
    to 1 within :data:`PROBABILITY_TOLERANCE`, naming the first bad row.

    Example:
        >>> check_probability_rows(np.array([[0.5, 0.5], [0.2, 0.7]]))
        Traceback (most recent call last):
        ...
        tlcore.errors.DataError: class probabilities in y must sum to 1 ... row 1 sums to 0.9: [0.2, 0.7]
    """
    outside = np.flatnonzero(((p < 0) | (p > 1)).any(axis=1))
    if outside.size:
        i = int(outside[0])
        raise DataError(f"class probabilities in {name} must be in [0, 1]; row {i} is {_row(p[i])}")
    sums = p.sum(axis=1, dtype=np.float64)
    off = np.flatnonzero(np.abs(sums - 1.0) > PROBABILITY_TOLERANCE)
    if off.size:
        i = int(off[0])
        raise DataError(f"class probabilities in {name} must sum to 1 (within {PROBABILITY_TOLERANCE:g}) per row; "
                        f"row {i} sums to {sums[i]:.6g}: {_row(p[i])}")


def _row(r: np.ndarray, limit: int = 8) -> str:
    vals = [float(f"{v:.6g}") for v in r[:limit].tolist()]
    return str(vals)[:-1] + (", ...]" if len(r) > limit else "]")


def _width(y: np.ndarray) -> int:
    return 1 if y.ndim == 1 else int(np.prod(y.shape[1:]))


# ---- the specs ----

@dataclass(frozen=True)
class LossSpec:
    """Base of the loss specs; ``kind`` names the loss (``"cross_entropy"``...)."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict:
        """The spec as plain JSON-able values; :func:`loss_from_dict` is the inverse."""
        return {"kind": self.kind}

    # -- the numpy reference --

    def _terms(self, pred: np.ndarray, targets: Any,
               w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-sample losses ``L`` (n,), denominator weights ``d`` (n,) and ``dL_i/dpred_i`` (pred's shape)."""
        raise NotImplementedError

    def _prepare(self, pred: Any, sample_weight: Any) -> tuple[np.ndarray, np.ndarray]:
        p = _array(pred, "pred")
        if p.ndim == 0 or p.shape[0] == 0:
            raise DataError(f"pred is empty (shape {p.shape}); give at least one sample")
        p = _finite_float(p, "pred", np.float64)
        return p, check_sample_weight(sample_weight, len(p))

    def reference_sums(self, pred: Any, targets: Any, sample_weight: Any = None) -> tuple[float, float]:
        """The numerator and denominator of the mean loss: ``(sum s_i L_i, sum s_i d_i)`` (see the
        module docstring), so a mean over many batches is the ratio of the summed sums.

        Example:
            >>> import numpy as np
            >>> MSE().reference_sums(np.array([1.0, 3.0]), np.array([0.0, 0.0]), sample_weight=[1, 0.5])
            (5.5, 1.5)
        """
        p, w = self._prepare(pred, sample_weight)
        per_sample, denom, _ = self._terms(p, targets, w)
        return float(np.dot(w, per_sample)), float(np.dot(w, denom))

    def reference(self, pred: Any, targets: Any, sample_weight: Any = None) -> float:
        """The mean loss in float64, as torch computes it (``reduction="mean"``).

        Args:
            pred: Logits (classification) or predictions (regression), shape ``(n, ...)``.
            targets: As :func:`check_targets` takes them for this spec.
            sample_weight: Optional per-sample weights ``(n,)``, >= 0.

        Returns:
            ``sum_i s_i L_i / sum_i s_i d_i`` (see the module docstring).

        Raises:
            DataError: For malformed predictions, targets or weights, or weights summing to 0.
        """
        num, den = self.reference_sums(pred, targets, sample_weight)
        return num / _check_denominator(den)

    def reference_grad(self, pred: Any, targets: Any, sample_weight: Any = None) -> np.ndarray:
        """The gradient of :meth:`reference` with respect to ``pred`` (float64, ``pred``'s shape).

        Raises:
            DataError: As :meth:`reference`.
        """
        p, w = self._prepare(pred, sample_weight)
        _, denom, grad = self._terms(p, targets, w)
        den = _check_denominator(float(np.dot(w, denom)))
        return grad * (w / den).reshape((-1,) + (1,) * (grad.ndim - 1))


def _check_denominator(den: float) -> float:
    if not den > 0:
        raise DataError("the weights of these samples sum to 0, so their weighted mean loss is undefined "
                        "(torch returns nan); give some sample a weight > 0")
    return den


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))                               # never overflows
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@dataclass(frozen=True)
class CrossEntropy(LossSpec):
    """Softmax cross-entropy on logits, as ``torch.nn.functional.cross_entropy``.

    Targets are integer class labels ``(n,)`` or class probabilities ``(n, c)`` (soft labels or
    one-hot rows, each summing to 1).

    Attributes:
        label_smoothing: In [0, 1): the target becomes ``(1 - ε) * target + ε / c`` (torch's rule,
            for labels and probabilities alike).
        class_weight: None; a sequence with one weight per class (torch's ``weight=``); or a
            ``{class: weight}`` mapping where classes not named weigh 1. Weights are finite and >= 0.
            Stored as a tuple of weights or a tuple of ``(class, weight)`` pairs. With integer labels
            the mean divides by the summed weights of the samples' classes (as torch); with
            probability targets it divides by the number of samples (as torch).

    Example:
        >>> import numpy as np
        >>> spec = CrossEntropy(class_weight={1: 3.0})
        >>> spec.class_weight, spec.class_weights(3).tolist()
        (((1, 3.0),), [1.0, 3.0, 1.0])
        >>> z = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
        >>> round(spec.reference(z, np.array([0, 1])), 6)   # same nll per sample: the weighted mean is it
        0.239545
    """

    kind: ClassVar[str] = "cross_entropy"
    label_smoothing: float = 0.0
    class_weight: Union[Mapping, Sequence, None] = None

    def __post_init__(self) -> None:
        ls = self.label_smoothing
        if not _is_real(ls) or not 0.0 <= ls < 1.0:
            raise LossConfigError(f"CrossEntropy: label_smoothing must be in [0, 1), got {ls!r}")
        object.__setattr__(self, "label_smoothing", as_float(ls))
        object.__setattr__(self, "class_weight", _normalize_class_weight(self.class_weight))

    def to_dict(self) -> dict:
        cw = self.class_weight
        if cw is not None:
            cw = dict(cw) if _is_pair(cw[0]) else list(cw)
        return {"kind": self.kind, "label_smoothing": self.label_smoothing, "class_weight": cw}

    def class_weights(self, num_classes: int) -> np.ndarray | None:
        """One weight per class (float64), or None without class weights.

        Raises:
            DataError: The weights name a class ``>= num_classes``, or a sequence of weights does not
                have ``num_classes`` of them.
        """
        cw = self.class_weight
        if cw is None:
            return None
        if _is_pair(cw[0]):
            missing = [c for c, _ in cw if c >= num_classes]
            if missing:
                raise DataError(f"class_weight names class {missing[0]} but the head has {num_classes} outputs "
                                f"(classes 0..{num_classes - 1})")
            dense = np.ones(num_classes, dtype=np.float64)
            for c, w in cw:
                dense[c] = w
            return dense
        if len(cw) != num_classes:
            raise DataError(f"class_weight has {len(cw)} weights but the head has {num_classes} outputs; give one "
                            "weight per class, or a {class: weight} mapping")
        return np.asarray(cw, dtype=np.float64)

    def _terms(self, pred, targets, w):
        if pred.ndim != 2:
            raise DataError(f"cross_entropy takes logits of shape (n, classes), got shape {pred.shape}")
        n, c = pred.shape
        y = _check_targets(self, targets, n, c, np.float64)
        cw = self.class_weights(c)
        eps = self.label_smoothing
        if y.ndim == 1:                                   # torch's cross_entropy_loss_label_smoothing
            q = np.zeros((n, c))
            q[np.arange(n), y] = (1.0 - eps) * (1.0 if cw is None else cw[y])
            q += eps / c * (1.0 if cw is None else cw)
            denom = np.ones(n) if cw is None else cw[y]
        else:                                             # torch's cross_entropy_loss_prob_target
            q = y * (1.0 - eps) + eps / c if eps else y
            if cw is not None:
                q = q * cw
            denom = np.ones(n)
        lp = _log_softmax(pred)
        per_sample = -(q * lp).sum(axis=1)
        grad = np.exp(lp) * q.sum(axis=1, keepdims=True) - q
        return per_sample, denom, grad


@dataclass(frozen=True)
class BinaryCrossEntropy(LossSpec):
    """Sigmoid binary cross-entropy on logits, as ``torch.nn.functional.binary_cross_entropy_with_logits``.

    Targets are probabilities in [0, 1] with one value per output; the loss of a sample is the mean
    over its outputs.

    Attributes:
        pos_weight: None; a number; or one weight per output (torch's ``pos_weight=``, >= 0): the
            positive term of each output is multiplied by it,
            ``-(pos_weight * t * log σ(x) + (1 - t) * log(1 - σ(x)))``.

    Example:
        >>> import numpy as np
        >>> round(BinaryCrossEntropy(pos_weight=2.0).reference(np.zeros(2), np.array([1.0, 0.0])), 6)
        1.039721
    """

    kind: ClassVar[str] = "binary_cross_entropy"
    pos_weight: Union[float, Sequence, None] = None

    def __post_init__(self) -> None:
        pw = self.pos_weight
        if isinstance(pw, np.ndarray):
            pw = pw.tolist()
        if pw is None:
            pass
        elif _is_real(pw):
            pw = _weight("BinaryCrossEntropy", "pos_weight", pw)
        elif isinstance(pw, Sequence) and not isinstance(pw, (str, bytes)) and len(pw) > 0:
            pw = tuple(_weight("BinaryCrossEntropy", f"pos_weight[{i}]", v) for i, v in enumerate(pw))
        else:
            raise LossConfigError(f"BinaryCrossEntropy: pos_weight must be a number >= 0, one such number per "
                                  f"output, or None; got {self.pos_weight!r}")
        object.__setattr__(self, "pos_weight", pw)

    def to_dict(self) -> dict:
        pw = list(self.pos_weight) if isinstance(self.pos_weight, tuple) else self.pos_weight
        return {"kind": self.kind, "pos_weight": pw}

    def pos_weights(self, num_outputs: int) -> np.ndarray | None:
        """One positive weight per output (float64), or None without ``pos_weight``.

        Raises:
            DataError: A sequence of weights does not have ``num_outputs`` of them.
        """
        pw = self.pos_weight
        if pw is None:
            return None
        if isinstance(pw, tuple):
            if len(pw) != num_outputs:
                raise DataError(f"pos_weight has {len(pw)} weights but the model has {num_outputs} output(s); "
                                "give one per output, or a single number")
            return np.asarray(pw, dtype=np.float64)
        return np.full(num_outputs, pw, dtype=np.float64)

    def _terms(self, pred, targets, w):
        n = len(pred)
        x = pred.reshape(n, -1)
        t = _check_targets(self, targets, n, x.shape[1], np.float64)
        pw = self.pos_weights(x.shape[1])
        softplus_neg = np.log1p(np.exp(-np.abs(x))) + np.maximum(-x, 0.0)    # -log σ(x)
        if pw is None:
            elem = (1.0 - t) * x + softplus_neg
            dx = _sigmoid(x) - t
        else:                                             # torch: log_weight = (pos_weight - 1) * t + 1
            elem = (1.0 - t) * x + ((pw - 1.0) * t + 1.0) * softplus_neg
            dx = _sigmoid(x) * (pw * t + 1.0 - t) - pw * t
        k = x.shape[1]
        return elem.mean(axis=1), np.ones(n), (dx / k).reshape(pred.shape)


def _regression(spec: LossSpec, pred: np.ndarray, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    n = len(pred)
    x = pred.reshape(n, -1)
    return x, _check_targets(spec, targets, n, x.shape[1], np.float64)


@dataclass(frozen=True)
class MSE(LossSpec):
    """Mean squared error, as ``torch.nn.functional.mse_loss`` (mean over every output of every sample).

    Example:
        >>> import numpy as np
        >>> MSE().reference(np.array([[1.0, 2.0]]), np.array([[0.0, 0.0]]))
        2.5
    """

    kind: ClassVar[str] = "mse"

    def _terms(self, pred, targets, w):
        x, t = _regression(self, pred, targets)
        d = x - t
        return (d * d).mean(axis=1), np.ones(len(x)), (2.0 * d / x.shape[1]).reshape(pred.shape)


@dataclass(frozen=True)
class Huber(LossSpec):
    """Huber loss, as ``torch.nn.functional.huber_loss``: ``0.5 d²`` where ``|d| < delta``, else
    ``delta * (|d| - 0.5 delta)``, with ``d = pred - target``.

    Attributes:
        delta: The threshold between the quadratic and the linear part, a finite number > 0.

    Example:
        >>> import numpy as np
        >>> Huber(delta=1.0).reference(np.array([0.5, 3.0]), np.array([0.0, 0.0]))
        1.3125
    """

    kind: ClassVar[str] = "huber"
    delta: float = 1.0

    def __post_init__(self) -> None:
        d = self.delta
        if not _is_real(d) or not math.isfinite(d) or d <= 0:
            raise LossConfigError(f"Huber: delta must be a finite number > 0, got {d!r}")
        object.__setattr__(self, "delta", as_float(d))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "delta": self.delta}

    def _terms(self, pred, targets, w):
        x, t = _regression(self, pred, targets)
        d = x - t
        a = np.abs(d)
        elem = np.where(a < self.delta, 0.5 * d * d, self.delta * (a - 0.5 * self.delta))
        grad = np.clip(d, -self.delta, self.delta) / x.shape[1]
        return elem.mean(axis=1), np.ones(len(x)), grad.reshape(pred.shape)


#: loss name -> spec class; each name alone means the spec with its defaults
LOSSES: dict[str, type[LossSpec]] = {c.kind: c for c in (CrossEntropy, BinaryCrossEntropy, MSE, Huber)}


def as_loss(value: LossSpec | str) -> LossSpec:
    """A loss spec from a spec (returned as it is) or a loss name (the spec with its defaults).

    Example:
        >>> as_loss("cross_entropy")
        CrossEntropy(label_smoothing=0.0, class_weight=None)
        >>> as_loss("crossentropy")
        Traceback (most recent call last):
        ...
        tlcore.losses.LossConfigError: unknown loss 'crossentropy'; did you mean 'cross_entropy'? Valid: ...
    """
    if isinstance(value, LossSpec):
        if LOSSES.get(value.kind) is not type(value):
            raise LossConfigError(f"not a loss spec of tlcore.losses: {value!r}")
        return value
    if isinstance(value, str) and value in LOSSES:
        return LOSSES[value]()
    raise LossConfigError(unknown_name_message("loss", value, list(LOSSES)))


def with_class_weight(spec: LossSpec, class_weight: Any) -> LossSpec:
    """``spec`` with ``fit``'s ``class_weight`` (a mapping or sequence, see :class:`CrossEntropy`);
    ``spec`` itself when None.

    Example:
        >>> with_class_weight(CrossEntropy(), {1: 5.0}).class_weight
        ((1, 5.0),)
    """
    if class_weight is None:
        return spec
    if not isinstance(spec, CrossEntropy):
        hint = "; BinaryCrossEntropy(pos_weight=...) weighs positives" if isinstance(spec, BinaryCrossEntropy) else ""
        raise LossConfigError(f"class_weight is for cross_entropy, not {spec.kind}{hint}")
    if spec.class_weight is not None:
        raise LossConfigError("class_weight is given twice: in the CrossEntropy spec and to fit; give it once")
    return CrossEntropy(label_smoothing=spec.label_smoothing, class_weight=class_weight)


def loss_from_dict(d: Mapping) -> LossSpec:
    """Inverse of :meth:`LossSpec.to_dict` (also after a JSON round trip, whose keys are strings).

    Example:
        >>> import json
        >>> spec = CrossEntropy(label_smoothing=0.1, class_weight={2: 0.5})
        >>> loss_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
        True
    """
    if not isinstance(d, Mapping):
        raise LossConfigError(f"a loss spec dict must be a mapping with a 'kind', got {type(d).__name__}")
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in LOSSES:
        raise LossConfigError(unknown_name_message("loss", kind, list(LOSSES)))
    cw = d.get("class_weight")
    if isinstance(cw, Mapping):
        d["class_weight"] = {int(k) if isinstance(k, str) and k.strip().isdigit() else k: v for k, v in cw.items()}
    try:
        return LOSSES[kind](**d)
    except TypeError as e:
        raise LossConfigError(f"bad fields for loss {kind!r}: {e}") from None


# ---- targets ----

def check_targets(spec: LossSpec | str, y: Any, n: int, num_outputs: int | None, name: str = "y") -> np.ndarray:
    """Validate targets ``y`` for ``spec`` (a spec or a loss name) and a model with ``num_outputs``
    outputs (None: unknown, not checked), and convert them.

    * :class:`CrossEntropy`: integer labels ``(n,)`` (integral floats are accepted) in
      ``[0, num_outputs)``, returned as int64; or class probabilities ``(n, num_outputs)`` in [0, 1]
      with rows summing to 1 (within :data:`PROBABILITY_TOLERANCE`), returned as float32. The spec's
      ``class_weight`` must fit the head.
    * :class:`BinaryCrossEntropy`: finite values in [0, 1]; :class:`MSE`, :class:`Huber`: finite
      values. One value per output, returned as float32 of shape ``(n, num_outputs)`` (a 1-D ``y``
      becomes a column).

    Raises:
        DataError: With what is wrong and what would be right.

    Example:
        >>> check_targets("cross_entropy", [0, 2, 1], 3, 3)
        array([0, 2, 1])
        >>> check_targets(CrossEntropy(class_weight={3: 2.0}), [0, 2, 1], 3, 3)
        Traceback (most recent call last):
        ...
        tlcore.errors.DataError: class_weight names class 3 but the head has 3 outputs (classes 0..2)
    """
    return _check_targets(as_loss(spec), y, n, num_outputs, np.float32, name)


def _check_targets(spec: LossSpec, y: Any, n: int, num_outputs: int | None, dtype: Any,
                   name: str = "y") -> np.ndarray:
    y = _array(y, name)
    if y.ndim == 0 or len(y) != n:
        raise DataError(f"predictions and {name} have different lengths: {n} samples but "
                        f"{len(y) if y.ndim else 0} targets")
    kind = spec.kind
    if isinstance(spec, CrossEntropy):
        if num_outputs is not None:
            spec.class_weights(num_outputs)
        if y.ndim == 1:
            if y.dtype.kind == "f":
                y = _finite_float(y, name, np.float64)
                if not np.all(np.mod(y, 1) == 0):
                    i = int(np.flatnonzero(np.mod(y, 1) != 0)[0])
                    raise DataError(f"cross_entropy takes integer class labels (n,) or class probabilities "
                                    f"(n, classes); {name}[{i}] = {float(y[i])!r} is not an integer")
            elif y.dtype.kind == "b":
                raise DataError(f"cross_entropy takes integer class labels; {name} is boolean (use 0/1 ints, "
                                "or binary_cross_entropy)")
            y = y.astype(np.int64)
            if y.min() < 0 or (num_outputs is not None and y.max() >= num_outputs):
                valid = "ints >= 0" if num_outputs is None else f"0..{num_outputs - 1}"
                raise DataError(f"labels out of range: {name} spans [{y.min()}, {y.max()}]"
                                + ("" if num_outputs is None else f" but the head has {num_outputs} outputs")
                                + f" (valid labels {valid})")
            return y
        if y.ndim != 2:
            raise DataError(f"cross_entropy takes integer class labels (n,) or class probabilities (n, classes), "
                            f"got {name} of shape {y.shape}")
        if num_outputs is not None and y.shape[1] != num_outputs:
            hint = (f"; for integer labels give shape (n,), e.g. {name}.ravel()" if y.shape[1] == 1 else "")
            raise DataError(f"{name} has {y.shape[1]} class probabilities per sample but the head has "
                            f"{num_outputs} outputs{hint}")
        p = _finite_float(y, name, dtype)
        check_probability_rows(p, name)
        return p
    t = _finite_float(y, name, dtype)
    if kind == "binary_cross_entropy" and not np.all((t >= 0) & (t <= 1)):
        raise DataError(f"binary_cross_entropy takes targets in [0, 1]; {name} spans [{t.min()}, {t.max()}]")
    width = _width(t)
    if num_outputs is not None:
        if width != num_outputs:
            raise DataError(f"{name} has {width} value(s) per sample but the model has {num_outputs} output(s)")
        if isinstance(spec, BinaryCrossEntropy):
            spec.pos_weights(num_outputs)
    return t.reshape(n, width)
