"""Framework-free reference of one training step: PyTorch's optimizers, losses and a dense layer's gradients.

Only numpy and the standard library are used (never torch, tensorflow or jax), so the conformance kit
can check every backend against the same numbers. Everything is computed in float64. The rules are
``torch.optim``'s and ``torch.nn.functional``'s exactly (dampening 0, ``maximize=False``,
``amsgrad=False``, ``reduction="mean"``); see :mod:`tlcore.optim`.

Example:
    >>> import numpy as np
    >>> import tlcore as tl
    >>> from tlcore.testing.reference import ReferenceOptimizer, linear_head_grads
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(8, 4)), rng.integers(0, 3, size=8)
    >>> params = {"weight": np.zeros((3, 4)), "bias": np.zeros(3)}
    >>> loss, grads = linear_head_grads(x, params["weight"], params["bias"], y, "cross_entropy")
    >>> round(loss, 6)   # log(3): all logits are 0
    1.098612
    >>> params = ReferenceOptimizer(tl.optim.SGD(lr=0.1)).step(params, grads)
    >>> bool(np.allclose(params["bias"], -0.1 * grads["bias"]))
    True
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from tlcore.errors import OptimizerConfigError
from tlcore.errors import unknown_name_message
from tlcore.optim import OPTIMIZERS, OptimizerSpec

__all__ = [
    "ReferenceOptimizer",
    "accuracy",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_grad",
    "cross_entropy",
    "cross_entropy_grad",
    "linear_head_grads",
    "mse",
    "mse_grad",
]

#: torch.nn.utils.clip_grad_norm_'s guard against a zero norm
_CLIP_EPS = 1e-6


class ReferenceOptimizer:
    """An optimizer spec from :mod:`tlcore.optim` applied exactly as ``torch.optim`` applies it.

    Each :meth:`step` clips the gradients it is given (if ``clip_grad_norm`` is set, as
    ``torch.nn.utils.clip_grad_norm_`` does: one global L2 norm over them all), then updates the
    parameters that have a gradient. Frozen tensors are simply not given a gradient: they get no
    decay and no state.

    Attributes:
        spec: The optimizer spec.
        clip_grad_norm: The maximum global gradient norm, or None for no clipping.
        state: Per parameter name, torch's state for it: ``"step"`` (updates this parameter got) and
            float64 arrays named as in ``torch.optim`` (``"momentum_buffer"``; ``"exp_avg"``,
            ``"exp_avg_sq"``; ``"square_avg"``, ``"grad_avg"``).
        steps: How many times :meth:`step` was called.

    Example:
        >>> import numpy as np
        >>> import tlcore as tl
        >>> opt = ReferenceOptimizer(tl.optim.SGD(lr=0.5, momentum=0.9))
        >>> p = {"w": np.array([1.0, 2.0], dtype=np.float32)}
        >>> p = opt.step(p, {"w": np.array([1.0, -1.0])})
        >>> p["w"], p["w"].dtype
        (array([0.5, 2.5], dtype=float32), dtype('float32'))
        >>> p = opt.step(p, {"w": np.array([1.0, -1.0])})   # buffer: 0.9 * 1 + 1
        >>> p["w"], opt.state["w"]["momentum_buffer"], opt.steps
        (array([-0.45,  3.45], dtype=float32), array([ 1.9, -1.9]), 2)
    """

    def __init__(self, spec: OptimizerSpec, clip_grad_norm: float | None = None) -> None:
        """Build the optimizer.

        Args:
            spec: One of :class:`tlcore.optim.SGD`, ``Adam``, ``AdamW`` or ``RMSprop``.
            clip_grad_norm: Clip the gradients' global L2 norm to this (> 0) before each update.

        Raises:
            OptimizerConfigError: For an unknown spec or a clip norm that is not a finite number > 0.
        """
        if not isinstance(spec, OptimizerSpec) or OPTIMIZERS.get(spec.kind) is not type(spec):
            raise OptimizerConfigError(f"ReferenceOptimizer: not an optimizer spec of tlcore.optim: {spec!r}")
        if clip_grad_norm is not None and (
                isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float))
                or not math.isfinite(clip_grad_norm) or clip_grad_norm <= 0):
            raise OptimizerConfigError(
                f"ReferenceOptimizer: clip_grad_norm must be a finite number > 0 or None, got {clip_grad_norm!r}")
        self.spec = spec
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.state: dict[str, dict[str, Any]] = {}
        self.steps = 0

    def __repr__(self) -> str:
        return f"ReferenceOptimizer({self.spec!r}, clip_grad_norm={self.clip_grad_norm!r})"

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Apply one update and return the new parameters.

        Args:
            params: Parameter arrays by name (floating point).
            grads: Gradients by name, for the trainable parameters only: a parameter without a
                gradient is returned unchanged (the same object) and gets no state.

        Returns:
            A new dict with every name of ``params``: updated arrays (computed in float64, returned in
            each parameter's dtype) for those with a gradient, the given arrays for the others.

        Raises:
            KeyError: A gradient names no parameter.
            TypeError: A parameter with a gradient is not floating point.
            ValueError: A gradient's shape differs from its parameter's.

        Example:
            >>> import numpy as np
            >>> import tlcore as tl
            >>> opt = ReferenceOptimizer(tl.optim.Adam(lr=0.1), clip_grad_norm=1.0)
            >>> frozen = np.ones(2)
            >>> new = opt.step({"w": np.zeros(2), "frozen": frozen}, {"w": np.array([3.0, 4.0])})
            >>> new["w"].round(6).tolist(), new["frozen"] is frozen, sorted(opt.state)
            ([-0.1, -0.1], True, ['w'])
        """
        unknown = sorted(set(grads) - set(params))
        if unknown:
            raise KeyError(f"gradients for unknown parameters: {unknown}")
        g64: dict[str, np.ndarray] = {}
        for name, grad in grads.items():
            p = np.asarray(params[name])
            if not np.issubdtype(p.dtype, np.floating):
                raise TypeError(f"parameter {name!r} has dtype {p.dtype}; only floating point ones can be trained")
            g = np.array(grad, dtype=np.float64)
            if g.shape != p.shape:
                raise ValueError(f"gradient of {name!r} has shape {g.shape}, its parameter {p.shape}")
            g64[name] = g
        if self.clip_grad_norm is not None:
            g64 = _clip_grad_norm(g64, self.clip_grad_norm)
        self.steps += 1
        new = dict(params)
        for name, g in g64.items():
            p = np.asarray(params[name])
            state = self.state.setdefault(name, {"step": 0})
            state["step"] += 1
            w = self._update(state, p.astype(np.float64), g)
            new[name] = w.astype(p.dtype, copy=False)
        return new

    def _update(self, state: dict[str, Any], w: np.ndarray, g: np.ndarray) -> np.ndarray:
        spec, kind = self.spec, self.spec.kind
        lr, wd = spec.lr, spec.weight_decay
        if kind == "adamw":
            w = w * (1.0 - lr * wd)                      # decoupled decay, before the Adam update
        elif wd != 0:
            g = g + wd * w                               # coupled L2
        if kind == "sgd":
            mom = spec.momentum
            if mom != 0:
                buf = state.get("momentum_buffer")
                buf = g.copy() if buf is None else mom * buf + g   # torch: clone(g) on the first step
                state["momentum_buffer"] = buf
                g = g + mom * buf if spec.nesterov else buf
            return w - lr * g
        if kind in ("adam", "adamw"):
            beta1, beta2 = spec.betas
            step = state["step"]
            m = state.get("exp_avg", np.zeros_like(w))
            v = state.get("exp_avg_sq", np.zeros_like(w))
            m = m + (1.0 - beta1) * (g - m)              # torch: exp_avg.lerp_(g, 1 - beta1)
            v = beta2 * v + (1.0 - beta2) * g * g
            state["exp_avg"], state["exp_avg_sq"] = m, v
            bias1 = 1.0 - beta1 ** step
            bias2 = 1.0 - beta2 ** step
            denom = np.sqrt(v) / math.sqrt(bias2) + spec.eps
            return w - (lr / bias1) * (m / denom)
        # rmsprop
        alpha = spec.alpha
        sq = alpha * state.get("square_avg", np.zeros_like(w)) + (1.0 - alpha) * g * g
        state["square_avg"] = sq
        if spec.centered:
            ga = state.get("grad_avg", np.zeros_like(w))
            ga = ga + (1.0 - alpha) * (g - ga)           # torch: grad_avg.lerp_(g, 1 - alpha)
            state["grad_avg"] = ga
            avg = np.sqrt(sq - ga * ga)
        else:
            avg = np.sqrt(sq)
        avg = avg + spec.eps
        if spec.momentum > 0:
            buf = spec.momentum * state.get("momentum_buffer", np.zeros_like(w)) + g / avg
            state["momentum_buffer"] = buf
            return w - lr * buf
        return w - lr * (g / avg)


def _clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> dict[str, np.ndarray]:
    """``torch.nn.utils.clip_grad_norm_``: scale all by ``min(1, max_norm / (norm + 1e-6))``."""
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    coef = min(max_norm / (norm + _CLIP_EPS), 1.0)
    return {name: g * coef for name, g in grads.items()}


def _float64(name: str, a: np.ndarray, ndim: int | None = None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return a


def _logits_labels(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = _float64("logits", logits, ndim=2)
    y = np.asarray(labels)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.shape != z.shape[:1]:
        raise ValueError(f"labels must have shape ({z.shape[0]},) for logits of shape {z.shape}, got {y.shape}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must be in [0, {z.shape[1]}), got {y.min()}..{y.max()}")
    return z, y


def _same_shape(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _float64(a_name, a), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{a_name} has shape {a.shape} but {b_name} {b.shape}")
    return a, b


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Softmax cross-entropy, mean over the batch (``torch.nn.functional.cross_entropy``).

    Args:
        logits: Shape ``(n, c)``.
        labels: Integer class indices, shape ``(n,)``.

    Returns:
        The mean loss.

    Example:
        >>> import numpy as np
        >>> round(cross_entropy(np.array([[0.0, 0.0], [10.0, 0.0]]), np.array([0, 0])), 6)
        0.346596
    """
    z, y = _logits_labels(logits, labels)
    return float(-_log_softmax(z)[np.arange(len(y)), y].mean())


def cross_entropy_grad(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Gradient of :func:`cross_entropy` with respect to the logits: ``(softmax - one_hot) / n``.

    Example:
        >>> import numpy as np
        >>> cross_entropy_grad(np.zeros((2, 2)), np.array([0, 1])).tolist()
        [[-0.25, 0.25], [0.25, -0.25]]
    """
    z, y = _logits_labels(logits, labels)
    grad = np.exp(_log_softmax(z))
    grad[np.arange(len(y)), y] -= 1.0
    return grad / len(y)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))                               # never overflows
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def binary_cross_entropy_with_logits(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sigmoid binary cross-entropy, mean over all elements (``binary_cross_entropy_with_logits``).

    Computed as ``max(x, 0) - x * t + log1p(exp(-|x|))``, so any finite logit is safe.

    Args:
        logits: Any shape.
        targets: Probabilities in [0, 1], the shape of ``logits``.

    Returns:
        The mean loss.

    Example:
        >>> import numpy as np
        >>> round(binary_cross_entropy_with_logits(np.array([0.0, 1000.0]), np.array([1.0, 0.0])), 6)
        500.346574
    """
    x, t = _same_shape("logits", logits, "targets", targets)
    return float((np.maximum(x, 0.0) - x * t + np.log1p(np.exp(-np.abs(x)))).mean())


def binary_cross_entropy_with_logits_grad(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Gradient of :func:`binary_cross_entropy_with_logits` w.r.t. the logits: ``(sigmoid(x) - t) / size``.

    Example:
        >>> import numpy as np
        >>> binary_cross_entropy_with_logits_grad(np.array([0.0, -1000.0]), np.array([1.0, 0.0])).tolist()
        [-0.25, 0.0]
    """
    x, t = _same_shape("logits", logits, "targets", targets)
    return (_sigmoid(x) - t) / x.size


def mse(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean squared error, mean over all elements (``torch.nn.functional.mse_loss``).

    Example:
        >>> import numpy as np
        >>> mse(np.array([[1.0, 2.0]]), np.array([[0.0, 0.0]]))
        2.5
    """
    p, t = _same_shape("pred", pred, "target", target)
    return float(((p - t) ** 2).mean())


def mse_grad(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Gradient of :func:`mse` with respect to ``pred``: ``2 * (pred - target) / size``.

    Example:
        >>> import numpy as np
        >>> mse_grad(np.array([[1.0, 2.0]]), np.array([[0.0, 0.0]])).tolist()
        [[1.0, 2.0]]
    """
    p, t = _same_shape("pred", pred, "target", target)
    return 2.0 * (p - t) / p.size


_LOSSES = {
    "cross_entropy": (cross_entropy, cross_entropy_grad),
    "binary_cross_entropy": (binary_cross_entropy_with_logits, binary_cross_entropy_with_logits_grad),
    "mse": (mse, mse_grad),
}


def linear_head_grads(features: np.ndarray, weight: np.ndarray, bias: np.ndarray, targets: np.ndarray,
                      loss: str) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and parameter gradients of a dense layer ``logits = features @ weight.T + bias``.

    Args:
        features: Shape ``(n, d)``.
        weight: Shape ``(out, d)`` (torch's ``nn.Linear`` layout).
        bias: Shape ``(out,)``.
        targets: Integer labels ``(n,)`` for ``"cross_entropy"``; floats ``(n, out)`` for
            ``"binary_cross_entropy"`` (logits in, as ``binary_cross_entropy_with_logits``) and ``"mse"``.
        loss: ``"cross_entropy"``, ``"binary_cross_entropy"`` or ``"mse"``.

    Returns:
        The mean loss and ``{"weight": dW, "bias": db}``, computed in float64 and returned in the
        dtypes of ``weight`` and ``bias``.

    Raises:
        OptimizerConfigError: For an unknown loss name.
        ValueError: For inconsistent shapes or bad labels.

    Example:
        >>> import numpy as np
        >>> x = np.array([[1.0, 2.0], [3.0, 4.0]])
        >>> value, g = linear_head_grads(x, np.zeros((1, 2)), np.zeros(1), np.ones((2, 1)), "mse")
        >>> value, g["weight"].tolist(), g["bias"].tolist()
        (1.0, [[-4.0, -6.0]], [-2.0])
    """
    if loss not in _LOSSES:
        raise OptimizerConfigError(unknown_name_message("loss", loss, list(_LOSSES)))
    value_fn, grad_fn = _LOSSES[loss]
    x = _float64("features", features, ndim=2)
    w = np.asarray(weight)
    b = np.asarray(bias)
    if w.ndim != 2 or w.shape[1] != x.shape[1] or b.shape != w.shape[:1]:
        raise ValueError(f"features {x.shape}, weight {w.shape} and bias {b.shape} do not make a dense layer "
                         "(need (n, d), (out, d), (out,))")
    logits = x @ w.astype(np.float64).T + b.astype(np.float64)
    value = value_fn(logits, targets)
    dlogits = grad_fn(logits, targets)
    return value, {"weight": (dlogits.T @ x).astype(w.dtype, copy=False),
                   "bias": dlogits.sum(axis=0).astype(b.dtype, copy=False)}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose largest logit is at the label (ties: the first, as ``argmax``).

    Example:
        >>> import numpy as np
        >>> accuracy(np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0]]), np.array([0, 1, 1]))
        0.6666666666666666
    """
    z, y = _logits_labels(logits, labels)
    return float((z.argmax(axis=1) == y).mean())
