"""Real data that is available offline: scikit-learn's bundled handwritten digits (8x8, grey).

Example:
    >>> from tlcore.datasets import digits
    >>> (x, y), _ = digits(classes=(5, 6, 7, 8, 9), seed=0)
    >>> x.shape[1:], sorted(set(y.tolist()))
    ((8, 8, 1), [0, 1, 2, 3, 4])
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .data import check_fraction, check_positive_int, check_seed
from .errors import DataError

#: the digits' classes
DIGITS = tuple(range(10))


def digits(classes: Sequence[int] = tuple(range(10)), test_fraction: float = 0.3,
           seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``(x_train, y_train), (x_test, y_test)`` of the chosen digit classes, stratified and seeded.

    Images are NHWC float32 in [0, 1] (``(n, 8, 8, 1)``); labels are re-indexed ``0..len(classes)-1``
    in the order of ``classes``.

    Raises:
        DataError: ``classes`` empty, repeated or not digits 0-9, ``test_fraction`` not in (0, 1), or a
            bad ``seed`` (checked before anything is loaded).
    """
    seed = check_seed(seed)
    test_fraction = check_fraction("test_fraction", test_fraction)
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or not classes:
        raise DataError(f"classes must be a non-empty sequence of digits 0-9, got {classes!r}")
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c not in DIGITS]
    if bad:
        raise DataError(f"classes must be digits 0-9 (ints), got the class {bad[0]!r} in {tuple(classes)!r}")
    if len(set(classes)) != len(classes):
        raise DataError(f"classes names a digit twice: {tuple(classes)!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits data set needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    classes = [int(c) for c in classes]
    keep = np.isin(bunch.target, classes)
    x = (bunch.images[keep] / 16.0).astype(np.float32)[..., None]
    y = np.array([classes.index(t) for t in bunch.target[keep]], dtype=np.int64)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(len(classes)):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_fraction))
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    train, test = rng.permutation(train), rng.permutation(test)
    return (x[train], y[train]), (x[test], y[test])


def few_shot(x: np.ndarray, y: np.ndarray, shots: int, seed: int = 0,
             class_names: Sequence[object] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``shots`` samples per class, seeded. Raises :class:`DataError` when a class has fewer, or for a
    bad ``shots``, ``seed`` or labels (checked before anything is drawn)."""
    shots = check_positive_int("shots", shots)
    rng = np.random.default_rng(check_seed(seed))
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x) or (y.size and y.min() < 0):
        raise DataError(f"few_shot takes integer labels >= 0, one per sample of x ({len(x)}), got {y.dtype} of "
                        f"shape {y.shape}")
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if shots > len(idx):
            name = class_names[c] if class_names is not None else c
            raise DataError(f"shots={shots} is more than the {len(idx)} training images of class {name}; "
                            f"use at most {min(np.bincount(y))}")
        picked += rng.choice(idx, size=shots, replace=False).tolist()
    picked = rng.permutation(picked)
    return x[picked], y[picked]
