"""The abstract :class:`Model` every backend implements, and :class:`History`.

The core owns everything that is the same on every backend: checking inputs before any weight is
touched, resolving freeze policies, the epoch/batch loop, feature caching, evaluation metrics and the
summary. A backend implements a handful of primitives (the ``_``-prefixed abstract methods).

Example:
    >>> import tlcore as tl                                                    # doctest: +SKIP
    >>> m = tl.wrap(torch_model)                                               # doctest: +SKIP
    >>> ft = tl.finetune(m, cut=tl.LayerCut(at="layer3"), head=tl.Head.linear(5))  # doctest: +SKIP
    >>> ft.fit(x, y, epochs=3).history["loss"]                                 # doctest: +SKIP
"""
from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from . import data
from .errors import CheckpointError, TlcoreError
from .freeze import FreezePolicy, Resolved, TensorInfo, in_layer
from .head import Head
from .optim import Adam, OptimizerSpec, TrainSpec, check_loss

log = logging.getLogger("tlcore")

#: samples per batch of the frozen-feature pass (small CNN, 2 cores: 128 -> 136 ms, 512 -> 159 ms per 512 samples)
FEATURE_BATCH = 128


class FeatureCacheRefused(TlcoreError, ValueError):
    """``fit(cache_features=True)`` was asked for but the frozen part is not cacheable."""


@dataclass
class History:
    """Per-epoch metrics of one ``fit`` (``history["loss"]``, ``["accuracy"]``, ``["val_loss"]``...)
    and facts about the run in ``info`` (``compilations``, ``cache_features``, ``seconds``...)."""

    history: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> list[float]:
        return self.history[key]

    @property
    def epochs(self) -> int:
        return len(self.history.get("loss", []))

    def append(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.history.setdefault(k, []).append(float(v))


class Trainer(abc.ABC):
    """One prepared (compiled, where the framework compiles) training step."""

    #: how many times the step was compiled (traced) so far; 0 where nothing compiles
    compilations: int = 0

    @abc.abstractmethod
    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        """Train on one batch; return (summed loss, number correct) as framework scalars."""

    def epoch(self, x: np.ndarray, y: np.ndarray, batches: list, on_step: Callable[[int], Any] = lambda n: None
              ) -> list[tuple[Any, Any]]:
        """Train on ``x[b], y[b]`` for each ``b`` of ``batches`` in turn, calling ``on_step(steps
        done)``; return each step's (summed loss, number correct). A trainer may run the whole
        epoch in one compiled call instead."""
        outs = []
        for b in batches:
            outs.append(self.step(x[b], y[b]))
            on_step(1)
        return outs

    def finish(self) -> None:
        """Called after the last step of a ``fit`` (e.g. to write state back); may be called twice."""

    @abc.abstractmethod
    def optimizer_state_bytes(self) -> int:
        """Bytes held by the optimizer's state (moments, counters)."""


@dataclass
class Summary:
    """What ``Model.summary()`` returns; ``str()`` gives the table."""

    rows: list[tuple[str, str, str, int, str]]
    total_params: int
    trainable_params: int
    non_trainable_params: int
    title: str = ""

    def __str__(self) -> str:
        head = ("Layer", "Kind", "Output shape", "Params", "Trainable")
        cells = [head] + [(n, k, s, f"{p:,}", t) for n, k, s, p, t in self.rows]
        widths = [max(len(str(r[i])) for r in cells) for i in range(5)]
        line = "-" * (sum(widths) + 8)
        fmt = lambda r: "  ".join(str(c).ljust(w) if i != 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        out = [self.title, line, fmt(head), line] + [fmt(r) for r in cells[1:]] + [line]
        out += [f"Total params: {self.total_params:,}", f"Trainable params: {self.trainable_params:,}",
                f"Non-trainable params: {self.non_trainable_params:,}"]
        return "\n".join(x for x in out if x)

    __repr__ = __str__


class Model(abc.ABC):
    """A network wrapped by a backend: layers to cut at, state to check, fit/predict/evaluate."""

    backend: ClassVar[str] = ""

    def __init__(self, *, input_shape: tuple[int, ...] | None = None, head: str | None = None,
                 head_spec: Head | None = None, policy: FreezePolicy | None = None,
                 meta: dict | None = None):
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.head_spec = head_spec
        self.meta: dict[str, Any] = dict(meta or {})
        self._head = head
        self._infos: list[TensorInfo] | None = None
        self._loss = "cross_entropy"
        self._resolved: Resolved | None = None
        self.freeze(policy or FreezePolicy.none())

    # ------------------------------------------------------------------ backend primitives
    @property
    @abc.abstractmethod
    def native(self) -> Any:
        """The framework object itself (``nn.Module``, ``keras.Model``, ``nnx.Module``)."""

    @abc.abstractmethod
    def _layer_names(self) -> list[str]:
        """Cut points in forward order; a container comes before its (dotted) children."""

    @abc.abstractmethod
    def _layer_kinds(self) -> dict[str, str]:
        """``{layer: class name}`` for the summary."""

    @abc.abstractmethod
    def _tensor_infos(self) -> list[TensorInfo]:
        """Every tensor of ``state()``, in forward order."""

    @abc.abstractmethod
    def _read_state(self) -> dict[str, np.ndarray]:
        """Every tensor as a numpy array (copies)."""

    @abc.abstractmethod
    def _write_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Overwrite the named tensors (names and shapes already checked)."""

    @abc.abstractmethod
    def _apply_freeze(self, resolved: Resolved) -> None:
        """Make the native model train exactly ``resolved.mask``'s tensors."""

    @abc.abstractmethod
    def _forward(self, x: np.ndarray) -> np.ndarray:
        """Inference-mode outputs for one batch."""

    @abc.abstractmethod
    def _make_trainer(self, spec: TrainSpec) -> Trainer:
        """A training step for the current policy and ``spec``."""

    @abc.abstractmethod
    def _cut(self, last: str | None) -> Model:
        """A new model (its own copy of the weights) keeping layers up to ``last`` (all if None)."""

    @abc.abstractmethod
    def _with_head(self, head: Head, name: str, seed: int) -> Model:
        """A model with ``head`` attached as layer ``name`` (may reuse ``self``, already a copy)."""

    def _output_shapes(self) -> dict[str, tuple]:
        """``{layer: per-sample output shape}`` when ``input_shape`` is known; optional."""
        return {}

    def _stochastic_layers(self) -> list[str]:
        """Layers that are random while training (dropout); used to decide feature caching."""
        return []

    def _features(self, x: np.ndarray) -> np.ndarray:
        """Inference-mode output of everything before the head, for one batch."""
        raise NotImplementedError

    def _head_model(self) -> Model:
        """The attached head as a :class:`Model` sharing its weights with this one."""
        raise NotImplementedError

    # ------------------------------------------------------------------ structure and state
    @property
    def layers(self) -> list[str]:
        """Cut points in forward order (dotted names reach into sequential containers)."""
        return self._layer_names()

    @property
    def tensors(self) -> list[TensorInfo]:
        if self._infos is None:
            self._infos = self._tensor_infos()
        return self._infos

    @property
    def head(self) -> str | None:
        """The name of the head layer attached by ``tl.finetune`` (None if there is none)."""
        return self._head

    @property
    def policy(self) -> FreezePolicy:
        return self._resolved.policy

    def state(self) -> dict[str, np.ndarray]:
        """Every tensor: trainable weights and non-trainable state (BatchNorm statistics, counters)."""
        return self._read_state()

    def load_state(self, arrays: dict[str, np.ndarray], strict: bool = True) -> Model:
        """Overwrite tensors from ``{name: array}`` (names and shapes as in ``state()``).

        Everything is checked before anything is written: unknown names, missing names (when
        ``strict``) and shape mismatches raise :class:`tl.CheckpointError` listing each one.
        """
        current = self.state()
        problems = [f"unexpected tensor {k!r}" for k in arrays if k not in current]
        if strict:
            problems += [f"missing tensor {k!r}" for k in current if k not in arrays]
        problems += [f"{k}: checkpoint shape {tuple(np.shape(v))} != model shape {current[k].shape}"
                     for k, v in arrays.items() if k in current and tuple(np.shape(v)) != current[k].shape]
        if problems:
            raise CheckpointError(f"{len(problems)} tensor(s) do not fit this model:\n  " + "\n  ".join(problems))
        self._write_state({k: np.asarray(v, dtype=current[k].dtype) for k, v in arrays.items()})
        return self

    def trainable_mask(self) -> dict[str, bool]:
        """``{name: can training change it?}`` for every name in ``state()``."""
        return dict(self._resolved.mask)

    def freeze(self, policy: FreezePolicy) -> Model:
        """Apply ``policy`` (to the part kept from the original model); takes effect at the next fit.

        Example:
            >>> ft.freeze(tl.FreezePolicy.none())   # unfreeze everything  # doctest: +SKIP
        """
        if not isinstance(policy, FreezePolicy):
            raise TypeError(f"freeze() takes a tl.FreezePolicy, got {type(policy).__name__}")
        resolved = policy.resolve(self.tensors, self.layers, head=self._head)
        self._apply_freeze(resolved)
        self._resolved = resolved
        return self

    def unfreeze(self) -> Model:
        """Shorthand for ``freeze(FreezePolicy.none())``."""
        return self.freeze(FreezePolicy.none())

    def count_params(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; BatchNorm statistics and buffers are not parameters."""
        shapes = {k: v.size for k, v in self.state().items()}
        params = [t for t in self.tensors if t.kind in ("param", "bn_param")]
        return (sum(shapes[t.name] for t in params if self._resolved.mask[t.name]),
                sum(shapes[t.name] for t in params))

    # ------------------------------------------------------------------ inference
    def _num_outputs(self) -> int | None:
        if self.head_spec is not None:
            return self.head_spec.num_classes
        shapes = self._output_shapes()
        last = self.layers[-1] if self.layers else None
        if last in shapes and shapes[last] is not None:
            return int(np.prod(shapes[last]))
        return None

    def predict(self, x, batch_size: int = 256) -> np.ndarray:
        """Inference-mode outputs (logits for classifiers); numpy in, numpy out."""
        x = data.as_inputs(x, self.input_shape)
        batch_size = data.check_positive_int("batch_size", batch_size)
        return self._predict_batches(x, batch_size)

    def _predict_batches(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        """:meth:`_forward` over batches (a backend may prepare once for all of them)."""
        return np.concatenate([np.asarray(self._forward(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])

    def evaluate(self, x, y, batch_size: int = 256, loss: str | None = None) -> dict[str, float]:
        """``{"loss": ..., "accuracy": ...}`` (accuracy for classification losses only)."""
        loss = check_loss(loss or self._loss)
        x = data.as_inputs(x, self.input_shape)
        y = data.as_targets(y, len(x), loss, self._num_outputs())
        return data.loss_and_metrics(self.predict(x, batch_size), y, loss)

    # ------------------------------------------------------------------ training
    def fit(self, x, y, epochs: int = 1, batch_size: int = 32, optimizer: OptimizerSpec | None = None,
            loss: str = "cross_entropy", validation_data: tuple | None = None, shuffle: bool = True,
            seed: int = 0, clip_grad_norm: float | None = None, progress: bool = True,
            cache_features: bool | str = "auto") -> History:
        """Train the trainable tensors; frozen ones stay bit-identical.

        Args:
            optimizer: a ``tl.optim`` spec (default ``Adam(lr=1e-3)``).
            loss: ``"cross_entropy"`` (integer labels), ``"binary_cross_entropy"`` or ``"mse"``.
            clip_grad_norm: clip the global L2 norm of the gradients to this value.
            cache_features: ``"auto"`` computes the frozen part's features once and trains only the
                head when that gives the same result (everything before the head frozen, no active
                dropout there); ``True`` insists (error if not possible); ``False`` never caches.

        Example:
            >>> hist = ft.fit(x, y, epochs=2, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9))  # doctest: +SKIP
        """
        optimizer = optimizer if optimizer is not None else Adam(lr=1e-3)
        if not isinstance(optimizer, OptimizerSpec):
            raise TypeError(f"optimizer must be a tl.optim spec (e.g. tl.optim.Adam(lr=1e-3)), got {optimizer!r}")
        loss = check_loss(loss)
        epochs = data.check_positive_int("epochs", epochs)
        batch_size = data.check_positive_int("batch_size", batch_size)
        if clip_grad_norm is not None and not (np.isfinite(clip_grad_norm) and clip_grad_norm > 0):
            raise data.DataError(f"clip_grad_norm must be a finite number > 0 or None, got {clip_grad_norm!r}")
        if cache_features not in ("auto", True, False):
            raise data.DataError(f"cache_features must be 'auto', True or False, got {cache_features!r}")
        x = data.as_inputs(x, self.input_shape)
        y = data.as_targets(y, len(x), loss, self._num_outputs())
        val = None
        if validation_data is not None:
            xv = data.as_inputs(validation_data[0], self.input_shape, "validation x")
            val = (xv, data.as_targets(validation_data[1], len(xv), loss, self._num_outputs(), "validation y"))
        self._loss = loss
        spec = TrainSpec(optimizer, loss, clip_grad_norm, int(seed))

        refusal = self._cache_refusal() if cache_features else ""
        if cache_features is True and refusal:
            raise FeatureCacheRefused(f"cannot cache features: {refusal}")
        if cache_features and not refusal:
            log.info("fit: caching frozen features (everything before %r is frozen and deterministic)", self._head)
            return self._fit_cached(x, y, val, epochs, batch_size, spec, shuffle, progress)
        log.info("fit: not caching features (%s)", "cache_features=False" if not cache_features else refusal)
        hist = self._fit_loop(x, y, val, epochs, batch_size, spec, shuffle, progress)
        hist.info["cache_features"] = "off" if not cache_features else f"refused: {refusal}"
        return hist

    def _fit_loop(self, x, y, val, epochs, batch_size, spec, shuffle, progress) -> History:
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        trainer = self._make_trainer(spec)
        rng = np.random.default_rng(spec.seed)
        hist = History()
        steps = -(-len(x) // batch_size)
        bar = tqdm(total=epochs * steps, disable=None if progress else True,  # None: no bar without a TTY
                   unit="step", leave=False, desc=f"fit [{self.backend}]")
        try:
            for _ in range(epochs):
                outs = trainer.epoch(x, y, list(data.batch_slices(len(x), batch_size, shuffle, rng)), bar.update)
                metrics = {"loss": sum(float(o[0]) for o in outs) / len(x)}
                if spec.loss != "mse":
                    metrics["accuracy"] = sum(float(o[1]) for o in outs) / len(x)
                if val is not None:
                    trainer.finish()
                    metrics.update({f"val_{k}": v for k, v in
                                    data.loss_and_metrics(self.predict(val[0]), val[1], spec.loss).items()})
                hist.append(metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        finally:
            trainer.finish()
            bar.close()
        hist.info.update(compilations=trainer.compilations, steps=epochs * steps,
                         optimizer_state_bytes=trainer.optimizer_state_bytes(),
                         seconds=time.perf_counter() - t0)
        return hist

    def _cache_refusal(self) -> str:
        """Why feature caching is not possible now ('' when it is)."""
        if self._head is None:
            return "the model has no head attached by tl.finetune"
        base = [t for t in self.tensors if not in_layer(t.layer, self._head) and t.kind != "rng"]
        moving = [t.name for t in base if self._resolved.mask[t.name]]
        if moving:
            return f"{len(moving)} tensor(s) before the head are trainable (e.g. {moving[0]!r})"
        random = [n for n in self._stochastic_layers() if not in_layer(n, self._head)]
        if random:
            return f"layers before the head are random while training: {random}"
        return ""

    def _fit_cached(self, x, y, val, epochs, batch_size, spec, shuffle, progress) -> History:
        t0 = time.perf_counter()
        feats = self._batched_features(x)
        head = self._head_model()
        head_val = None if val is None else (self._batched_features(val[0]), val[1])
        hist = head._fit_loop(feats, y, head_val, epochs, batch_size, spec, shuffle, progress)
        hist.info.update(cache_features="used", seconds=time.perf_counter() - t0)
        return hist

    def _batched_features(self, x: np.ndarray, batch_size: int = FEATURE_BATCH) -> np.ndarray:
        """The frozen features of ``x``, computed ``batch_size`` samples at a time (a backend may prepare
        once for all batches)."""
        return np.concatenate([np.asarray(self._features(x[i:i + batch_size]))
                               for i in range(0, len(x), batch_size)])

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Save weights, non-trainable state and how the model was built (safetensors + JSON
        metadata, atomic). Zoo models load on any backend with ``tl.load(path, backend=...)``."""
        from .checkpoint import save

        save(self, path)

    # ------------------------------------------------------------------ display
    def summary(self) -> Summary:
        """Layers with kind, output shape (when ``input_shape`` is known), parameter count and
        whether they train; totals like Keras' ``model.summary()``. ``print(m.summary())``."""
        sizes = {k: v.size for k, v in self.state().items()}
        mask, kinds, shapes = self._resolved.mask, self._layer_kinds(), self._output_shapes()
        rows = []
        for layer in self.layers:
            own = [t for t in self.tensors if in_layer(t.layer, layer) and t.kind in ("param", "bn_param")]
            n = sum(sizes[t.name] for t in own)
            flags = {mask[t.name] for t in own}
            status = "-" if not own else "yes" if flags == {True} else "frozen" if flags == {False} else "partly"
            shape = shapes.get(layer)
            indent = "  " * layer.count(".")
            rows.append((indent + layer, kinds.get(layer, ""), "" if shape is None else str(tuple(shape)), n, status))
        trainable, total = self.count_params()
        state_total = sum(sizes.values())
        return Summary(rows, total, trainable, state_total - trainable,
                       title=f"{type(self).__name__} (backend={self.backend!r}, policy={self.policy.mode!r})")

    def __repr__(self) -> str:
        trainable, total = self.count_params()
        return (f"<{type(self).__name__} backend={self.backend!r} layers={len(self.layers)} "
                f"params={total:,} trainable={trainable:,} head={self._head!r}>")
