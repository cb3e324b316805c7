"""Metrics computed with numpy from predictions (logits) and targets, the same on every backend.

Names: ``"accuracy"``, ``"top_<k>"`` (``"top_1"``, ``"top_5"``...), ``"f1_macro"``,
``"precision_macro"``, ``"recall_macro"``, ``"auc"``, ``"mse"``, ``"mae"``; and ``"loss"`` when a
loss spec is given (see :mod:`tlcore.losses`). Every metric takes optional per-sample weights.

How logits and targets are read (the width is the number of outputs per sample):

* width 1 (shape ``(n,)`` or ``(n, 1)``): binary; the predicted class is ``logit > 0``, the targets
  are 0/1 labels or probabilities (class 1 where ``> 0.5``), AUC ranks the logit.
* width >= 2 with :class:`~tlcore.losses.BinaryCrossEntropy`: multi-label, each output a binary
  task; accuracy is the mean over every output of every sample (not scikit-learn's subset
  accuracy), the macro metrics and AUC average over the outputs; ``top_<k>`` is refused.
* width >= 2 otherwise: single-label multiclass; the predicted class is the argmax (the first one on
  ties), the targets are integer labels ``(n,)`` or class probabilities ``(n, c)`` (their argmax).
  With two classes AUC ranks ``z[:, 1] - z[:, 0]``; with more it is the macro one-vs-rest AUC of the
  softmax probabilities.
* ``mse`` and ``mae`` compare the predictions with targets of the same size per sample.

Definitions (``w`` the sample weights, 1 by default), matching scikit-learn on untied scores:
accuracy ``sum(w * correct) / sum(w)``; ``top_<k>``: the true class is among the ``k`` largest
logits, ties ranked by class index as ``argmax`` does (so ``top_1 == accuracy``; scikit-learn ranks
ties the other way); the macro metrics average over the classes present in the targets or the
predictions (every output when multi-label), and count 0 where undefined (``zero_division=0``).
``auc`` is ``nan`` where it is undefined (a single class in the targets); for multiclass and
multi-label it averages over the classes (outputs) where it is defined.

Example:
    >>> import numpy as np
    >>> from tlcore import metrics
    >>> logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.0, 2.0, 1.0]])
    >>> metrics.compute(["accuracy", "top_2", "f1_macro"], logits, np.array([0, 1, 1, 2]))
    {'accuracy': 0.5, 'top_2': 0.75, 'f1_macro': 0.5}
    >>> metrics.compute(["acuracy"], logits, np.array([0, 1, 1, 2]))
    Traceback (most recent call last):
    ...
    tlcore.metrics.MetricError: unknown metric 'acuracy'; did you mean 'accuracy'? Valid: 'accuracy', 'top_<k>' ...
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import DataError
from .losses import (BinaryCrossEntropy, CrossEntropy, LossSpec, MSE, _array, _check_targets, _finite_float,
                     as_loss, check_sample_weight)

__all__ = [
    "Accumulator",
    "METRICS",
    "MetricError",
    "accuracy",
    "auc",
    "check_metric_names",
    "compute",
    "f1_macro",
    "mae",
    "mse",
    "precision_macro",
    "recall_macro",
    "top_k",
]


class MetricError(DataError):
    """An unknown metric name, or a metric that does not apply to these predictions (a
    :class:`~tlcore.errors.DataError`)."""


#: the metric names (``"top_<k>"`` stands for ``"top_1"``, ``"top_2"``...)
METRICS = ("accuracy", "top_<k>", "f1_macro", "precision_macro", "recall_macro", "auc", "mse", "mae")
_FIXED = frozenset(METRICS) - {"top_<k>"}
_CLASSIFICATION = frozenset({"accuracy", "f1_macro", "precision_macro", "recall_macro", "auc"})
_MACRO = ("f1_macro", "precision_macro", "recall_macro")
_TOP = re.compile(r"top_([1-9][0-9]*)\Z")
#: names people often mean (only suggested, never accepted: result keys stay canonical)
_ALIASES = {"acc": "accuracy", "f1": "f1_macro", "precision": "precision_macro", "recall": "recall_macro",
            "roc_auc": "auc", "auroc": "auc", "top_k": "top_5", "mean_squared_error": "mse",
            "mean_absolute_error": "mae", "macro_f1": "f1_macro"}


def _unknown_metric_message(name: object) -> str:
    text = str(name)
    digits = re.findall(r"[0-9]+", text)
    if text.lower() in _ALIASES:
        close = [_ALIASES[text.lower()]]
    elif "top" in text.lower() and digits and int(digits[0]) >= 1:
        close = [f"top_{int(digits[0])}"]
    else:
        close = difflib.get_close_matches(text, [m for m in METRICS if m != "top_<k>"], n=1, cutoff=0.5)
    msg = f"unknown metric {name!r}"
    if close:
        msg += f"; did you mean {close[0]!r}?"
    listing = ", ".join("'top_<k>' (k >= 1, e.g. 'top_5')" if m == "top_<k>" else repr(m) for m in METRICS)
    return msg + f" Valid: {listing}, and 'loss' with a loss spec"


def check_metric_names(names: str | Iterable[str], with_loss: bool = False) -> tuple[str, ...]:
    """The metric names, validated, without repeats, in order; ``"loss"`` first when ``with_loss``.

    Args:
        names: One name or an iterable of names.
        with_loss: Whether a loss spec is given (then ``"loss"`` is computed, listed or not).

    Raises:
        MetricError: For an unknown name (with the closest valid one), ``"top_0"``, or ``"loss"``
            without a loss spec.

    Example:
        >>> check_metric_names(["top_5", "accuracy", "top_5"], with_loss=True)
        ('loss', 'top_5', 'accuracy')
        >>> check_metric_names("top5")
        Traceback (most recent call last):
        ...
        tlcore.metrics.MetricError: unknown metric 'top5'; did you mean 'top_5'? Valid: 'accuracy', 'top_<k>' ...
    """
    if isinstance(names, str):
        names = [names]
    try:
        names = list(names)
    except TypeError:
        raise MetricError(f"metric names must be a string or an iterable of strings, got {names!r}") from None
    out: list[str] = ["loss"] if with_loss else []
    for name in names:
        if not isinstance(name, str):
            raise MetricError(f"metric names are strings, got {name!r}")
        if name == "loss":
            if not with_loss:
                raise MetricError("metric 'loss' needs a loss spec: pass loss_spec=, e.g. 'cross_entropy'")
        elif name == "top_0":
            raise MetricError("top_<k> needs k >= 1, got 'top_0'")
        elif name not in _FIXED and not _TOP.match(name):
            raise MetricError(_unknown_metric_message(name))
        if name not in out:
            out.append(name)
    return tuple(out)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _binary_auc(scores: np.ndarray, positive: np.ndarray, w: np.ndarray) -> float:
    """Weighted ROC AUC (the Mann-Whitney statistic, ties counting one half); nan if one class is missing."""
    wpos = np.where(positive, w, 0.0)
    wneg = w - wpos
    total_pos, total_neg = wpos.sum(), wneg.sum()
    if not (total_pos > 0 and total_neg > 0):
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(s)) + 1))   # groups of tied scores
    gpos = np.add.reduceat(wpos[order], starts)
    gneg = np.add.reduceat(wneg[order], starts)
    neg_below = np.cumsum(gneg) - gneg
    return float((gpos * (neg_below + 0.5 * gneg)).sum() / (total_pos * total_neg))


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class Accumulator:
    """Metrics over many batches, without keeping the predictions where it can.

    It keeps sufficient statistics: weighted sums for ``accuracy``, ``top_<k>``, ``mse``, ``mae``
    and the loss, a weighted confusion matrix (or per-output true/false positive counts when
    multi-label) for the macro metrics. ``auc`` needs every score: for it the accumulator keeps the
    scores, labels and weights of every sample (one float per sample for binary tasks, one per class
    or output otherwise). :meth:`result` equals :func:`compute` on the concatenated batches (up to the
    rounding of sums in another order).

    Args:
        names: Metric names (see :func:`check_metric_names`).
        loss_spec: A loss spec or name: adds ``"loss"`` (the weighted mean of
            :meth:`tlcore.losses.LossSpec.reference`) and makes width >= 2 outputs multi-label for
            :class:`~tlcore.losses.BinaryCrossEntropy`.
        nonfinite: Logits with NaN or inf: ``"raise"`` a DataError, or ``"nan"``: count the batch and
            make every metric NaN (what ``fit(on_nonfinite="ignore")`` reports of a model trained into NaN).

    Raises:
        MetricError: For bad names, before any data is seen.

    Example:
        >>> import numpy as np
        >>> acc = Accumulator(["accuracy", "auc"], loss_spec="binary_cross_entropy")
        >>> acc.update(np.array([2.0, -1.0]), np.array([1.0, 0.0])).update(np.array([0.5]), np.array([0.0]))
        Accumulator(('loss', 'accuracy', 'auc'), 3 samples)
        >>> {k: round(v, 4) for k, v in acc.result().items()}
        {'loss': 0.4714, 'accuracy': 0.6667, 'auc': 1.0}
    """

    def __init__(self, names: str | Iterable[str], loss_spec: LossSpec | str | None = None,
                 nonfinite: str = "raise") -> None:
        if nonfinite not in ("raise", "nan"):
            raise MetricError(f"nonfinite must be 'raise' or 'nan', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.loss_spec = None if loss_spec is None else as_loss(loss_spec)
        self.names = check_metric_names(names, with_loss=self.loss_spec is not None)
        self._ks = sorted({int(m.group(1)) for m in map(_TOP.match, self.names) if m})
        self._classification = bool(self._ks) or any(n in _CLASSIFICATION for n in self.names)
        self._regression = any(n in ("mse", "mae") for n in self.names)
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen."""
        self.num_samples = 0
        self._width: int | None = None
        self._task: str | None = None
        self._s: dict[str, Any] = {"weight": 0.0}

    def __repr__(self) -> str:
        return f"Accumulator({self.names!r}, {self.num_samples} samples)"

    def _set_task(self, width: int) -> None:
        if self._width is None:
            self._width = width
            if width == 1:
                self._task = "binary"
            elif isinstance(self.loss_spec, BinaryCrossEntropy):
                self._task = "multilabel"
            else:
                self._task = "multiclass"
        elif width != self._width:
            raise DataError(f"this batch has {width} output(s) per sample but the earlier ones had {self._width}")

    def update(self, logits: Any, targets: Any, sample_weight: Any = None) -> Accumulator:
        """Add one batch.

        Args:
            logits: Predictions, shape ``(n,)`` or ``(n, outputs)`` (more dimensions: regression only).
            targets: Labels, probabilities or values, as the module docstring says.
            sample_weight: Optional weights ``(n,)``, >= 0.

        Returns:
            This accumulator, so calls can be chained.

        Raises:
            DataError: For malformed logits, targets or weights (the batch is then not added).
            MetricError: For a metric that does not apply (``top_<k>`` with fewer than ``k`` classes
                or on multi-label outputs).
        """
        z = _array(logits, "logits")
        if z.ndim == 0 or z.shape[0] == 0:
            raise DataError(f"logits is empty (shape {z.shape}); give at least one sample")
        if self.nonfinite == "nan" and not np.isfinite(z).all():
            self.num_samples += len(z)
            self._s["nonfinite"] = 1.0
            return self
        z = _finite_float(z, "logits", np.float64)
        n = len(z)
        w = check_sample_weight(sample_weight, n)
        width = 1 if z.ndim == 1 else int(np.prod(z.shape[1:]))
        previous = (self._width, self._task)
        self._set_task(width)
        try:
            delta = {"weight": float(w.sum())}
            if self.loss_spec is not None:
                delta["loss_num"], delta["loss_den"] = self.loss_spec.reference_sums(z, targets, w)
            if self._classification:
                if z.ndim > 2:
                    raise DataError(f"classification metrics take logits of shape (n,) or (n, classes), "
                                    f"got shape {z.shape}")
                delta.update(self._classification_stats(z.reshape(n, width), targets, w))
            if self._regression:
                t = _check_targets(MSE(), targets, n, width, np.float64, "targets")
                err = z.reshape(n, width) - t
                delta["sq"] = float(np.dot(w, (err * err).mean(axis=1)))
                delta["abs"] = float(np.dot(w, np.abs(err).mean(axis=1)))
        except Exception:
            if self.num_samples == 0:
                self._width, self._task = previous
            raise
        for key, value in delta.items():
            if isinstance(value, list):
                self._s.setdefault(key, []).extend(value)
            elif key in self._s:
                self._s[key] = self._s[key] + value
            else:
                self._s[key] = value
        self.num_samples += n
        return self

    def export_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The sums so far as a JSON-able record and named arrays (what a training state saves);
        :meth:`load_state` puts them back.

        Example:
            >>> acc = Accumulator(["accuracy"]).update(np.array([[2.0, 0.0]]), np.array([0]))
            >>> again = Accumulator(["accuracy"]); again.load_state(*acc.export_state()); again.result()
            {'accuracy': 1.0}
        """
        record: dict[str, Any] = {"num_samples": self.num_samples, "width": self._width, "task": self._task,
                                  "scalars": {}, "arrays": [], "lists": {}}
        arrays: dict[str, np.ndarray] = {}
        for key, value in self._s.items():
            if isinstance(value, list):
                record["lists"][key] = len(value)
                for i, parts in enumerate(value):
                    arrays.update({f"{key}/{i}/{j}": np.asarray(a) for j, a in enumerate(parts)})
            elif isinstance(value, np.ndarray):
                record["arrays"].append(key)
                arrays[key] = value
            else:
                record["scalars"][key] = float(value)
        return record, arrays

    def load_state(self, record: Any, arrays: dict[str, np.ndarray]) -> None:
        """Replace the sums with those :meth:`export_state` gave (``record`` is checked first).

        Raises:
            DataError: ``record`` or ``arrays`` malformed (nothing is changed then).
        """
        def bad(what: str) -> DataError:
            return DataError(f"malformed metric state: {what}")

        if not isinstance(record, dict):
            raise bad(f"expected an object, got {type(record).__name__}")
        n, width, task = record.get("num_samples"), record.get("width"), record.get("task")
        if not _count(n) or not (width is None or _count(width) and width > 0) or task not in (
                None, "binary", "multilabel", "multiclass"):
            raise bad("num_samples, width or task")
        scalars, keys, lists = record.get("scalars"), record.get("arrays"), record.get("lists")
        if not isinstance(scalars, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    for v in scalars.values()):
            raise bad("scalars")
        if not isinstance(keys, list) or not all(isinstance(k, str) and k in arrays for k in keys):
            raise bad("arrays")
        if not isinstance(lists, dict) or not all(_count(c) and all(f"{k}/{i}/{j}" in arrays for i in range(c)
                                                                      for j in range(3)) for k, c in lists.items()):
            raise bad("lists")
        sums: dict[str, Any] = {"weight": 0.0, **{k: float(v) for k, v in scalars.items()}}
        sums.update({k: np.asarray(arrays[k]) for k in keys})
        for k, c in lists.items():
            sums[k] = [tuple(np.asarray(arrays[f"{k}/{i}/{j}"]) for j in range(3)) for i in range(c)]
        self.num_samples, self._width, self._task, self._s = int(n), width, task, sums

    def _classification_stats(self, z: np.ndarray, targets: Any, w: np.ndarray) -> dict[str, Any]:
        n, width = z.shape
        task, names = self._task, self.names
        d: dict[str, Any] = {}
        if task == "multilabel":
            if self._ks:
                raise MetricError(f"top_{self._ks[0]} is for single-label classification, not the "
                                  f"{width} independent outputs of binary_cross_entropy")
            y = _check_targets(BinaryCrossEntropy(), targets, n, width, np.float64, "targets") > 0.5
            p = z > 0
            d["correct"] = float(np.dot(w, (p == y).mean(axis=1)))
            if any(m in names for m in _MACRO):
                d["tp"] = w @ (p & y)
                d["fp"] = w @ (p & ~y)
                d["fn"] = w @ (~p & y)
            if "auc" in names:
                d["auc"] = [(z, y, w)]
            return d
        if task == "binary":
            try:
                t = _check_targets(BinaryCrossEntropy(), targets, n, 1, np.float64, "targets")
            except DataError as e:
                raise DataError(f"single-output (binary) predictions take 0/1 labels or probabilities of "
                                f"class 1: {e}") from None
            y = (t[:, 0] > 0.5).astype(np.int64)
            pred = (z[:, 0] > 0).astype(np.int64)
            classes = 2
        else:
            y = _check_targets(CrossEntropy(), targets, n, width, np.float64, "targets")
            if y.ndim == 2:
                y = y.argmax(axis=1)
            pred = z.argmax(axis=1)
            classes = width
        too_big = [k for k in self._ks if k > classes]
        if too_big:
            raise MetricError(f"top_{too_big[0]} needs at least {too_big[0]} classes; these predictions have "
                              f"{classes}")
        correct = pred == y
        d["correct"] = float(np.dot(w, correct))
        for k in self._ks:
            if task == "binary":
                hits = correct if k == 1 else np.ones(n, dtype=bool)
            else:
                true = z[np.arange(n), y][:, None]
                ahead = (z > true) | ((z == true) & (np.arange(classes) < y[:, None]))   # argmax's order
                hits = ahead.sum(axis=1) < k
            d[f"top_{k}"] = float(np.dot(w, hits))
        if any(m in names for m in _MACRO):
            d["confusion"] = np.bincount(y * classes + pred, weights=w, minlength=classes * classes
                                         ).reshape(classes, classes)
            d["present"] = np.bincount(y, minlength=classes) + np.bincount(pred, minlength=classes)
        if "auc" in names:
            if task == "binary":
                scores = z[:, 0]
            elif classes == 2:
                scores = z[:, 1] - z[:, 0]
            else:
                scores = _softmax(z)
            d["auc"] = [(scores, y, w)]
        return d

    def result(self) -> dict[str, float]:
        """The metrics over every batch added, in the order of :attr:`names`.

        ``"loss"`` is nan when its denominator is 0 while the sample weights are not (every sample of
        a class whose ``class_weight`` is 0).

        Raises:
            DataError: No batch was added, or every sample weighs 0.
        """
        if self.num_samples == 0:
            raise DataError("no batch was added; call update(logits, targets) first")
        s = self._s
        if s.get("nonfinite"):
            return {name: float("nan") for name in self.names}
        total = s["weight"]
        if not total > 0:
            raise DataError("the sample weights sum to 0, so the weighted metrics are undefined; give some "
                            "sample a weight > 0")
        out: dict[str, float] = {}
        macro = self._macro() if any(m in self.names for m in _MACRO) else {}
        for name in self.names:
            if name == "loss":
                den = s["loss_den"]
                out[name] = s["loss_num"] / den if den > 0 else float("nan")
            elif name == "accuracy":
                out[name] = s["correct"] / total
            elif name.startswith("top_"):
                out[name] = s[name] / total
            elif name in macro:
                out[name] = macro[name]
            elif name == "auc":
                out[name] = self._auc()
            elif name == "mse":
                out[name] = s["sq"] / total
            elif name == "mae":
                out[name] = s["abs"] / total
        return out

    def _macro(self) -> dict[str, float]:
        s = self._s
        if self._task == "multilabel":
            tp, fp, fn = s["tp"], s["fp"], s["fn"]
            labels = np.ones(len(tp), dtype=bool)
        else:
            cm = s["confusion"]
            tp = np.diag(cm)
            fp = cm.sum(axis=0) - tp
            fn = cm.sum(axis=1) - tp
            labels = s["present"] > 0
        precision = _safe_div(tp, tp + fp)[labels]
        recall = _safe_div(tp, tp + fn)[labels]
        f1 = _safe_div(2 * tp, 2 * tp + fp + fn)[labels]
        return {"precision_macro": float(precision.mean()), "recall_macro": float(recall.mean()),
                "f1_macro": float(f1.mean())}

    def _auc(self) -> float:
        parts = self._s["auc"]
        scores = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        w = np.concatenate([p[2] for p in parts])
        if scores.ndim == 1:
            return _binary_auc(scores, y.astype(bool), w)
        columns = range(scores.shape[1])
        if self._task == "multilabel":
            values = [_binary_auc(scores[:, j], y[:, j], w) for j in columns]
        else:
            values = [_binary_auc(scores[:, c], y == c, w) for c in columns]
        values = [v for v in values if not np.isnan(v)]
        return float(np.mean(values)) if values else float("nan")


def compute(names: str | Iterable[str], logits: Any, targets: Any, loss_spec: LossSpec | str | None = None,
            sample_weight: Any = None) -> dict[str, float]:
    """The metrics ``names`` of ``logits`` against ``targets`` in one go.

    Args:
        names: Metric names; validated before the data.
        logits: Predictions, ``(n,)`` or ``(n, outputs)``.
        targets: Integer labels, class probabilities or values (see the module docstring).
        loss_spec: Optional loss spec or name: adds ``"loss"`` first (see :class:`Accumulator`).
        sample_weight: Optional per-sample weights ``(n,)``, >= 0.

    Returns:
        ``{name: value}`` as Python floats, in the order of the names.

    Raises:
        MetricError: For an unknown or inapplicable metric.
        DataError: For malformed logits, targets or weights.

    Example:
        >>> import numpy as np
        >>> compute(["mse", "mae"], np.array([1.0, 2.0]), np.array([0.0, 0.0]), loss_spec="huber")
        {'loss': 1.0, 'mse': 2.5, 'mae': 1.5}
    """
    return Accumulator(names, loss_spec).update(logits, targets, sample_weight).result()


def _one(name: str, logits: Any, targets: Any, sample_weight: Any, loss_spec: Any) -> float:
    return compute([name], logits, targets, loss_spec, sample_weight)[name]


def accuracy(logits: Any, targets: Any, *, sample_weight: Any = None, loss_spec: Any = None) -> float:
    """Weighted fraction of samples whose predicted class is the target's.

    Example:
        >>> import numpy as np
        >>> accuracy(np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0]]), np.array([0, 1, 1]))
        0.6666666666666666
    """
    return _one("accuracy", logits, targets, sample_weight, loss_spec)


def top_k(logits: Any, targets: Any, k: int, *, sample_weight: Any = None, loss_spec: Any = None) -> float:
    """Weighted fraction of samples whose true class is among the ``k`` largest logits (metric ``"top_<k>"``).

    Example:
        >>> import numpy as np
        >>> top_k(np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]), np.array([1, 2]), k=2)
        0.5
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise MetricError(f"top_k needs an int k >= 1, got {k!r}")
    return _one(f"top_{int(k)}", logits, targets, sample_weight, loss_spec)


def f1_macro(logits: Any, targets: Any, *, sample_weight: Any = None, loss_spec: Any = None) -> float:
    """Unweighted mean over classes of the F1 score (as ``f1_score(average="macro", zero_division=0)``).

    Example:
        >>> import numpy as np
        >>> f1_macro(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([0, 1]))   # F1: 2/3 and 0
        0.3333333333333333
    """
    return _one("f1_macro", logits, targets, sample_weight, loss_spec)


def precision_macro(logits: Any, targets: Any, *, sample_weight: Any = None, loss_spec: Any = None) -> float:
    """Unweighted mean over classes of the precision (0 for a class never predicted).

    Example:
        >>> import numpy as np
        >>> precision_macro(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([0, 1]))
        0.25
    """
    return _one("precision_macro", logits, targets, sample_weight, loss_spec)


def recall_macro(logits: Any, targets: Any, *, sample_weight: Any = None, loss_spec: Any = None) -> float:
    """Unweighted mean over classes of the recall (balanced accuracy over the classes present).

    Example:
        >>> import numpy as np
        >>> recall_macro(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([0, 1]))
        0.5
    """
    return _one("recall_macro", logits, targets, sample_weight, loss_spec)


def auc(logits: Any, targets: Any, *, sample_weight: Any = None, loss_spec: Any = None) -> float:
    """ROC AUC: binary from the single logit (or ``z[:, 1] - z[:, 0]``), else macro one-vs-rest.

    Example:
        >>> import numpy as np
        >>> auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
        0.75
    """
    return _one("auc", logits, targets, sample_weight, loss_spec)


def mse(pred: Any, targets: Any, *, sample_weight: Any = None) -> float:
    """Weighted mean over samples of the mean squared error of their outputs.

    Example:
        >>> import numpy as np
        >>> mse(np.array([[1.0, 2.0]]), np.array([[0.0, 0.0]]))
        2.5
    """
    return _one("mse", pred, targets, sample_weight, None)


def mae(pred: Any, targets: Any, *, sample_weight: Any = None) -> float:
    """Weighted mean over samples of the mean absolute error of their outputs.

    Example:
        >>> import numpy as np
        >>> mae(np.array([[1.0, -2.0]]), np.array([[0.0, 0.0]]))
        1.5
    """
    return _one("mae", pred, targets, sample_weight, None)
