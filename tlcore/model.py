"""The :class:`Model` every backend implements, :class:`History` and :class:`Summary`.

The core owns everything that is the same on every backend: checking inputs before any weight is
touched, resolving freeze policies, building a head when its first batch arrives, reusing trainers,
the epoch/batch loop, feature caching, evaluation metrics and the summary. A backend implements the
primitives declared in :mod:`tlcore.backend`.

Example:
    >>> import tlcore as tl                                                    # doctest: +SKIP
    >>> m = tl.wrap(torchvision.models.resnet18())                             # doctest: +SKIP
    >>> ft = tl.finetune(m, cut=tl.LayerCut(at="layer3"), head=tl.Head.linear(5))  # doctest: +SKIP
    >>> ft.fit(x, y, epochs=3).history["loss"]                                 # doctest: +SKIP
"""
from __future__ import annotations

import functools
import logging
import numbers
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from . import data, distribute, groups, losses, sources, training
from .backend import ModelPrimitives, Trainer
from .callbacks import Callback, check_callbacks
from .cut import in_layer
from .errors import (CheckpointError, FitInProgressError, OptimizerConfigError, TlcoreError, TrainingDiverged,
                     unknown_name_message)
from .freeze import FreezePolicy, Resolved, TensorInfo
from .recipes import UnfreezeSchedule
from .head import Head, HeadPlan, initial_values, plan_head
from .metrics import Accumulator, check_metric_names
from .optim import PRECISIONS, Adam, OptimizerSpec, TrainSpec

if TYPE_CHECKING:
    from .adapters import Adapter, AdapterState

log = logging.getLogger("tlcore")

#: samples per batch of the frozen-feature pass (small CNN, 2 cores: 128 -> 136 ms, 512 -> 159 ms per 512 samples)
FEATURE_BATCH = 128
#: trainers (compiled steps) kept per model, least recently used dropped first
MAX_TRAINERS = 4
#: what fit does at a non-finite loss or gradient
NONFINITE = ("raise", "warn", "ignore")
#: tensor kinds that are parameters (the rest is state: BatchNorm statistics, buffers, RNG)
PARAM_KINDS = ("param", "bn_param")


class FeatureCacheRefused(TlcoreError, ValueError):
    """``fit(cache_features=True)`` was asked for but the frozen part is not cacheable."""


class HeadNotBuiltError(TlcoreError, RuntimeError):
    """The head waits for its first batch (its input width is not known yet), so what was asked
    for (its tensors) does not exist yet."""


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

    def plot(self, keys: Sequence[str] | None = None):
        """A matplotlib figure of the metrics per epoch: one panel per metric (``val_`` drawn with it),
        ``lr`` in its own panel. Returns the figure (``fig.savefig(...)``).

        Example:
            >>> fig = History({"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "lr": [0.1, 0.05]}).plot()
            >>> [ax.get_title() for ax in fig.axes]
            ['loss', 'lr']
        """
        import matplotlib

        if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [k for k in (keys or self.history) if not k.startswith("val_")]
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], names):
            epochs = range(1, len(self.history[name]) + 1)
            ax.plot(epochs, self.history[name], marker="o", label=name)
            if f"val_{name}" in self.history:
                ax.plot(epochs, self.history[f"val_{name}"], marker="o", label=f"val_{name}")
                ax.legend()
            ax.set(title=name, xlabel="epoch")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig


@dataclass
class Summary:
    """What ``Model.summary()`` returns; ``str()`` gives the table. ``total_params`` =
    ``trainable_params`` + ``non_trainable_params``; ``buffers`` counts the values that are not
    parameters (BatchNorm statistics, constant buffers)."""

    rows: list[tuple[str, str, str, str, str]]
    total_params: int
    trainable_params: int
    non_trainable_params: int
    buffers: int = 0
    title: str = ""
    note: str = ""

    def __str__(self) -> str:
        head = ("Layer", "Kind", "Output shape", "Params", "Trainable")
        cells = [head] + list(self.rows)
        widths = [max(len(str(r[i])) for r in cells) for i in range(5)]
        line = "-" * (sum(widths) + 8)
        fmt = lambda r: "  ".join(str(c).ljust(w) if i != 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        out = [self.title, line, fmt(head), line] + [fmt(r) for r in cells[1:]] + [line]
        out += [f"Total params: {self.total_params:,}", f"Trainable params: {self.trainable_params:,}",
                f"Non-trainable params: {self.non_trainable_params:,}",
                f"Buffers (BatchNorm statistics and other state): {self.buffers:,}", self.note]
        return "\n".join(x for x in out if x)

    __repr__ = __str__


@dataclass(frozen=True)
class Run:
    """What one ``fit`` trains with, checked: the step's spec, the metrics, epochs, progress, and how
    a stream's batches are checked."""

    spec: TrainSpec
    metrics: tuple[str, ...]
    epochs: int
    progress: str
    check: Callable
    on_nonfinite: str = "raise"


class RunState:
    """What carries over from one ``fit`` to the next: the step, the shuffling RNG, the last trainer
    (whose optimizer state a new trainer imports), and what must match to continue (``key``)."""

    def __init__(self, key: TrainSpec, rng: np.random.Generator):
        self.key, self.rng = key, rng
        self.step, self.seed, self.started = 0, key.seed, False
        self.live: tuple[Trainer, Model] | None = None
        self.kept: tuple[dict, bool] | None = None
        self.folder: Any = None  # where its training state is written (fit(checkpoint_dir=...))

    @classmethod
    def resumed(cls, key: TrainSpec, point: Any) -> RunState:
        """The run a saved :class:`~tlcore.resume.ResumePoint` describes, at the start of its epoch
        (its optimizer state waits in ``kept`` for the first trainer)."""
        state = cls(key, point.generator())
        state.step, state.seed, state.started = point.step, point.seed, True
        state.kept = (point.optimizer, False)
        return state

    def optimizer_state(self, head: str | None) -> dict:
        """The live trainer's optimizer state (or the kept one), in this model's tensor names."""
        if self.live is not None:
            trainer, owner = self.live
            trainer.finish()
            state = trainer.export_state()
            return self.rename(state, head, to_head=False) if owner._is_head_view else state
        return self.carried_state(head)

    def keep_state(self) -> None:
        """Export the live trainer's optimizer state before it is replaced (a new policy, or a stage
        trained on cached features after one that was not)."""
        if self.live is not None:
            trainer, owner = self.live
            self.kept = (trainer.export_state(), owner._is_head_view)
            self.live = None

    def carried_state(self, head: str | None) -> dict:
        """The last trainer's optimizer state, in this model's tensor names."""
        self.keep_state()
        if self.kept is None:
            return {"slots": {}, "steps": {}}
        state, from_head = self.kept
        return self.rename(state, head, to_head=False) if from_head else state

    @staticmethod
    def rename(state: dict, head: str | None, to_head: bool) -> dict:
        """``state``'s tensor names moved into (``to_head``) or out of the head's namespace."""
        if head is None:
            return state
        prefix = f"{head}."
        if to_head:
            move = {n: n[len(prefix):] for n in state["slots"] if n.startswith(prefix)}
        else:
            move = {n: prefix + n for n in state["slots"]}
        return {"slots": {move[n]: v for n, v in state["slots"].items() if n in move},
                "steps": {move[n]: v for n, v in state["steps"].items() if n in move}}


def _rows(hist: History) -> list[dict[str, float]]:
    """``hist``'s epochs as one dict each (the training state's JSON)."""
    return [{k: v[i] for k, v in hist.history.items() if i < len(v)} for i in range(hist.epochs)]


@dataclass(frozen=True)
class PendingHead:
    """A head asked for by ``tl.finetune`` whose input width is not known yet."""

    spec: Head
    name: str
    seed: int


def exclusive(method: Callable) -> Callable:
    """``method`` runs in one thread at a time per model: a second thread gets
    :class:`~tlcore.errors.FitInProgressError` at once (training from two threads would interleave
    steps on the same weights)."""

    @functools.wraps(method)
    def run(self: Model, *args, **kwargs):
        if not self._busy.acquire(blocking=False):
            raise FitInProgressError(f"{method.__name__} is already running on this model in another thread; "
                                     "train one model from one thread at a time (wait for it, or train a copy)")
        try:
            return method(self, *args, **kwargs)
        finally:
            self._busy.release()
    return run


class Model(ModelPrimitives):
    """A network wrapped by a backend: layers to cut at, state to check, fit/predict/evaluate."""

    backend: ClassVar[str] = ""

    def __init__(self, *, input_shape: tuple[int | None, ...] | None = None, head: str | None = None,
                 head_spec: Head | None = None, policy: FreezePolicy | None = None, meta: dict | None = None):
        self.input_shape = data.check_input_shape(input_shape)
        self.head_spec = head_spec
        self.meta: dict[str, Any] = dict(meta or {})
        self._head = head
        self._pending: PendingHead | None = None
        self._infos: list[TensorInfo] | None = None
        self._loss: losses.LossSpec = losses.CrossEntropy()
        self._resolved: Resolved | None = None
        self._trainers: OrderedDict[tuple, Trainer] = OrderedDict()
        self._head_view: Model | None = None
        self._run: RunState | None = None
        self._resume_point: Any = None  # a saved run to continue (set by tl.resume)
        self._is_head_view = False
        self._adapter: AdapterState | None = None  # LoRA adapters (tlcore.adapters)
        self._rank = 0  # this process's replica under a data-parallel strategy (tlcore.distribute)
        #: the strategy of the running fit when it runs on several replicas (``_features`` then
        #: computes each replica's shard); None otherwise
        self._strategy: Any = None
        self._busy = threading.Lock()
        self.freeze(policy or FreezePolicy.none())

    # ------------------------------------------------------------------ structure and state
    @property
    def layers(self) -> list[str]:
        """Cut points in forward order (dotted names reach into containers)."""
        return self._layer_names()

    @property
    def tensors(self) -> list[TensorInfo]:
        """Every tensor of ``state()`` with its owning layer and kind."""
        self._require_head("tensors")
        return self._base_tensors()

    def _base_tensors(self) -> list[TensorInfo]:
        if self._infos is None:
            self._infos = self._tensor_infos()
        return self._infos

    @property
    def head(self) -> str | None:
        """The name of the head layer attached by ``tl.finetune`` (None if there is none)."""
        return self._pending.name if self._pending else self._head

    @property
    def head_built(self) -> bool:
        """False while the head waits for its first batch (see :meth:`build`)."""
        return self._pending is None

    @property
    def policy(self) -> FreezePolicy:
        return self._resolved.policy

    def _require_head(self, what: str) -> None:
        if self._pending is not None:
            raise HeadNotBuiltError(
                f"cannot give {what}: the head {self._pending.name!r} is built on the first batch that reaches "
                f"it, because the width of its input is not known without data. Call fit/predict/evaluate, "
                f"or model.build(x) with a sample batch, or pass input_shape=(...) to tl.finetune")

    def state(self) -> dict[str, np.ndarray]:
        """Every tensor: trainable weights and non-trainable state (BatchNorm statistics, counters)."""
        self._require_head("state()")
        return self._read_state()

    def load_state(self, arrays: dict[str, np.ndarray], strict: bool = True) -> Model:
        """Overwrite tensors from ``{name: array}`` (names and shapes as in ``state()``).

        Everything is checked before anything is written: unknown names, missing names (when
        ``strict``), shape mismatches and values the tensor would not hold as given (NaN or inf,
        complex, too large for its dtype, fractions for an integer tensor: see
        :func:`tlcore.data.state_value`) raise :class:`tl.CheckpointError` listing each one.
        """
        if not isinstance(arrays, Mapping):
            raise CheckpointError(f"load_state takes a dict {{tensor name: array}} as state() gives, got "
                                  f"{type(arrays).__name__}")
        current = self.state()
        problems = [f"unexpected tensor {k!r}" for k in arrays if k not in current]
        if strict:
            problems += [f"missing tensor {k!r}" for k in current if k not in arrays]
        converted = {}
        for k, v in arrays.items():
            if k not in current:
                continue
            if tuple(np.shape(v)) != current[k].shape:
                problems.append(f"{k}: shape {tuple(np.shape(v))} != model shape {current[k].shape}")
                continue
            converted[k], why = data.state_value(v, current[k])
            if why:
                problems.append(f"{k} {why}")
        if problems:
            shown = "; ".join(problems[:10]) + (f"; ... ({len(problems) - 10} more)" if len(problems) > 10 else "")
            raise CheckpointError(f"{len(problems)} tensor(s) cannot be loaded, so none was: {shown}")
        self._write_state(converted)
        return self

    def _state_and_mask(self) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
        """The state and mask of what exists now (without a head that waits for its first batch)."""
        return self._read_state(), dict(self._resolved.mask)

    def trainable_mask(self) -> dict[str, bool]:
        """``{name: can training change it?}`` for every name in ``state()``."""
        self._require_head("trainable_mask()")
        return dict(self._resolved.mask)

    def freeze(self, policy: FreezePolicy) -> Model:
        """Apply ``policy`` (to the part kept from the original model); takes effect at the next fit.

        Example:
            >>> ft.freeze(tl.FreezePolicy.none())   # unfreeze everything  # doctest: +SKIP
        """
        if not isinstance(policy, FreezePolicy):
            raise TypeError(f"freeze() takes a tl.FreezePolicy, got {type(policy).__name__}")
        adapters = frozenset(self._adapter.tensor_names()) if self._adapter else frozenset()
        resolved = policy.resolve(self._base_tensors(), self.layers, head=self._head, adapters=adapters)
        self._apply_freeze(resolved)
        self._resolved = resolved
        self._changed()
        return self

    def unfreeze(self) -> Model:
        """Shorthand for ``freeze(FreezePolicy.none())``."""
        return self.freeze(FreezePolicy.none())

    def _changed(self) -> None:
        """What trains changed: trainers and the cached head view no longer apply."""
        self._trainers.clear()
        self._head_view = None

    # ------------------------------------------------------------------ LoRA adapters
    @property
    def adapter(self) -> Adapter | None:
        """The LoRA adapter spec attached by ``tl.finetune(..., adapter=...)`` (None if there is none),
        its ``targets`` listing the adapted modules."""
        return self._adapter.spec if self._adapter and not self._adapter.merged else None

    def merge(self, keep_base: bool = True) -> Model:
        """Fold the LoRA adapters into their kernels, ``W + (alpha / rank) * B @ A`` in float32, in place
        (as PEFT's ``merge_and_unload``): the model becomes a plain one, with no adapter layers or
        tensors, and is returned. ``keep_base`` keeps a copy of the kernels, so :meth:`unmerge`
        restores them bit for bit.

        Example:
            >>> merged = ft.merge()            # deploy it, save() it...        # doctest: +SKIP
            >>> restored = merged.unmerge()    # the adapters back, the base bit-exact   # doctest: +SKIP
        """
        from .adapters import merge

        return merge(self, keep_base)

    def unmerge(self) -> Model:
        """Undo :meth:`merge`, in place: the kernels from the stored copy (bit-exact, never by
        subtraction) and the adapters as they were. Returns the model."""
        from .adapters import unmerge

        return unmerge(self)

    def save_adapter(self, path) -> Path:
        """Write only the LoRA adapters and the head, with the base's fingerprint, atomically; load
        them onto the same base, on any backend, with ``tl.load_adapter(base, path)``."""
        from .adapters import save_adapter

        return save_adapter(self, path)

    def count_params(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; BatchNorm statistics and buffers are not parameters."""
        self._require_head("count_params()")
        return self._param_counts()

    def _param_counts(self) -> tuple[int, int]:
        sizes = {k: v.size for k, v in self._read_state().items()}
        params = [t for t in self._base_tensors() if t.kind in PARAM_KINDS]
        mask = self._resolved.mask
        return sum(sizes[t.name] for t in params if mask[t.name]), sum(sizes[t.name] for t in params)

    # ------------------------------------------------------------------ the head
    def _request_head(self, spec: Head, name: str, seed: int) -> None:
        """Attach ``spec`` as layer ``name`` now if its input width is known, else on the first batch."""
        self._pending = PendingHead(spec, name, seed)
        self.head_spec = spec
        shape = self._feature_shape(None)
        plan = None if shape is None else plan_head(spec, shape, self.channels_last)
        if plan is not None:
            self._build_head(plan)
        else:
            log.info("head %r is built on the first batch (feature shape %s)", name, shape)

    def _attach_native(self, head: Any, name: str) -> None:
        """Attach the user's own head module as layer ``name`` (see ``_attach_native_head``)."""
        self._attach_native_head(name, head)
        self._head, self._infos, self.head_spec = name, None, None
        self.freeze(self.policy)

    def _build_head(self, plan: HeadPlan) -> None:
        pending = self._pending
        self._attach_head(plan, pending.name, initial_values(plan, pending.seed))
        self._pending, self._head, self._infos = None, pending.name, None
        steps = self.meta.get("steps")
        if steps and steps[-1].get("head_name") == pending.name:
            steps[-1]["head_width"] = plan.width
        self.freeze(self.policy)

    def build(self, x=None, input_shape: tuple[int, ...] | None = None) -> Model:
        """Build a head that waits for its first batch, from a sample batch ``x`` or a per-sample
        ``input_shape``; does nothing when the head is built. Returns the model.

        Example:
            >>> ft = tl.finetune(tl.wrap(resnet), cut=tl.LayerCut(at="layer3"), head=tl.Head.linear(4))  # doctest: +SKIP
            >>> ft.build(x[:1]).summary()                                                               # doctest: +SKIP
        """
        if self._pending is None:
            return self
        if x is None:
            if input_shape is None:
                raise TypeError("build() takes a sample batch x or a per-sample input_shape")
            shape = data.check_input_shape(input_shape)
            if any(d is None for d in shape):
                raise data.DataError(f"build(input_shape=...) needs every size, got {shape}")
            x = np.zeros((1, *shape), np.float32)
        self._ensure_head(self._inputs(x))
        return self

    def _ensure_head(self, x: np.ndarray) -> None:
        if self._pending is None:
            return
        shape = self._feature_shape(data.take(x, slice(0, 1)))
        plan = plan_head(self._pending.spec, shape, self.channels_last)
        if plan is None:  # cannot happen for a real batch: every size is known
            raise data.DataError(f"cannot size the head from features of shape {shape}")
        self._build_head(plan)

    # ------------------------------------------------------------------ inputs and sources
    def _inputs(self, x: Any, name: str = "x") -> data.Inputs:
        """``x`` checked and converted (``tlcore.data.as_inputs``), and checked against what the model takes."""
        x = data.as_inputs(x, self.input_shape, name, hint=self.meta.get("input_hint", ""))
        self._check_inputs(x)
        return x

    def _source(self, x: Any, y: Any, sample_weight: Any, spec: losses.LossSpec | None, *, batch_size: int,
                shuffle: bool = False, steps_per_epoch: int | None = None, name: str = "x") -> sources.Source:
        """A checked source of batches: arrays (inputs, targets for ``spec`` and weights checked now), or
        a loader or generator (its first batch checked now, every batch as it comes; every batch of a
        list of batches, which is in memory)."""
        shuffle = data.check_bool("shuffle", shuffle)
        if sources.is_source(x):
            source = sources.as_source(x, y, sample_weight, batch_size=batch_size, shuffle=shuffle,
                                       steps_per_epoch=steps_per_epoch)
            self._check_batch(source.first(), 0, spec, source.describe())
            if isinstance(x, list):
                for i, batch in enumerate(source.batches(np.random.default_rng(0))):
                    self._check_batch(batch, i, spec, source.describe())
            return source
        factor = None
        if isinstance(x, sources.Scaled):
            factor, x = x.factor, x.x
        if data.any_uint8(x) and factor is None and spec is not None:
            warnings.warn(f"{name} is uint8: the model trains on pixel values 0-255; divide by 255, or pass "
                          f"tl.data.scale({name}, 1 / 255) to scale batch by batch", UserWarning, stacklevel=3)
        xs = self._inputs(x, name)
        n = data.num_samples(xs)
        if spec is not None and y is None:
            raise data.DataError(f"fit and evaluate need targets: give y, or a source of (x, y) batches "
                                 f"(a DataLoader, a tf.data.Dataset, a generator)")
        ys = None if y is None else losses.check_targets(spec or losses.as_loss(self._loss), y, n, self._num_outputs(),
                                                         "y" if name == "x" else f"{name[:-1]}y")
        ws = None if sample_weight is None else losses.check_sample_weight(sample_weight, n)
        if factor is not None:
            return sources._ScaledArrays(factor, xs, ys, ws, batch_size, shuffle, True)
        return sources.Arrays(xs, ys, ws, batch_size, shuffle)

    def _check_batch(self, batch: sources.Batch, index: int, spec: losses.LossSpec | None,
                     where: str = "", replicas: int = 1) -> sources.Batch:
        """One batch of a stream, checked as arrays are (inputs, targets for ``spec``, weights, and
        that it splits over ``replicas`` under a data-parallel strategy)."""
        what = f"batch {index}" + (f" of {where}" if where else "")
        x = data.as_inputs(batch.x, self.input_shape, f"x of {what}", hint=self.meta.get("input_hint", ""))
        self._check_inputs(x)
        n = data.num_samples(x)
        if replicas > 1:
            distribute.check_split(n, replicas, what)
        y = batch.y
        if spec is not None:
            if y is None:
                raise data.DataError(f"{what} has no targets; a training batch is (x, y) or (x, y, sample_weight)")
            y = losses.check_targets(spec, y, n, self._num_outputs(), f"y of {what}")
        w = None if batch.w is None else losses.check_sample_weight(batch.w, n, f"sample_weight of {what}")
        return sources.Batch(x, y, w)

    # ------------------------------------------------------------------ inference
    def _num_outputs(self) -> int | None:
        if self.head_spec is not None:
            return self.head_spec.num_classes
        shapes = self._output_shapes(self.input_shape) if data.fully_known(self.input_shape) else {}
        last = self.layers[-1] if self.layers else None
        if last in shapes and shapes[last] is not None and all(d is not None for d in shapes[last]):
            return int(np.prod(shapes[last]))
        return None

    def predict(self, x, batch_size: int = 256) -> np.ndarray:
        """Inference-mode outputs (logits for classifiers) of arrays or a source; numpy out."""
        batch_size = data.check_positive_int("batch_size", batch_size)
        source = self._source(x, None, None, None, batch_size=batch_size)
        if type(source) is sources.Arrays and source.converted:
            self._ensure_head(source.x)
            return self._predict_batches(source.x, batch_size)
        self._ensure_head(source.first().x)
        return np.concatenate([np.asarray(self._forward(b.x)) for b in
                               training.checked_batches(source, np.random.default_rng(0),
                                                        lambda b, i: self._check_batch(b, i, None))])

    def _predict_batches(self, x: data.Inputs, batch_size: int) -> np.ndarray:
        """:meth:`_forward` over batches (a backend may prepare once for all of them)."""
        n = data.num_samples(x)
        return np.concatenate([np.asarray(self._forward(data.take(x, slice(i, i + batch_size))))
                               for i in range(0, n, batch_size)])

    def evaluate(self, x, y=None, batch_size: int = 256, loss: str | losses.LossSpec | None = None,
                 metrics: Sequence[str] | None = None, sample_weight=None) -> dict[str, float]:
        """``{"loss": ..., <metric>: ...}`` on arrays or a source of (x, y) batches, computed in numpy
        from the predictions (the same on every backend). ``metrics`` default: ``accuracy`` for
        classification losses."""
        spec = losses.as_loss(loss) if loss is not None else self._loss
        names = self._metric_names(metrics, spec)
        batch_size = data.check_positive_int("batch_size", batch_size)
        source = self._source(x, y, sample_weight, spec, batch_size=batch_size)
        self._ensure_head(source.first().x if not isinstance(source, sources.Arrays) else source.x)
        forward = lambda xb: np.asarray(self._forward(xb))  # noqa: E731
        return training.evaluate_source(forward, source, names, spec, lambda b, i: self._check_batch(b, i, spec))

    @staticmethod
    def _metric_names(metrics: Sequence[str] | None, spec: losses.LossSpec) -> tuple[str, ...]:
        if metrics is None:
            metrics = ("accuracy",) if spec.kind in ("cross_entropy", "binary_cross_entropy") else ()
        if isinstance(metrics, str):
            metrics = (metrics,)
        return check_metric_names(metrics)

    # ------------------------------------------------------------------ training
    @exclusive
    def fit(self, x, y=None, epochs: int = 1, batch_size: int = 32, optimizer: OptimizerSpec | None = None,
            loss: str | losses.LossSpec = "cross_entropy", metrics: Sequence[str] | None = None,
            validation_data: Any = None, shuffle: bool = True, seed: int = 0, clip_grad_norm: float | None = None,
            progress: bool | str = True, cache_features: bool | str = "auto", precision: str = "float32",
            sample_weight: Any = None, class_weight: Any = None, steps_per_epoch: int | None = None,
            freeze: FreezePolicy | UnfreezeSchedule | None = None, callbacks: Sequence[Callback] = (),
            reset: bool = False, on_nonfinite: str = "raise", checkpoint_dir: str | os.PathLike | None = None,
            checkpoint_every: int | str | None = None, resume: bool | str = "auto", strategy: Any = None) -> History:
        """Train the trainable tensors; frozen ones stay bit-identical.

        A ``fit`` continues where the last one stopped (as Keras' ``fit`` does): the optimizer state,
        the optimizer step (so schedules go on) and the shuffling and dropout RNGs carry over, so two
        ``fit(epochs=1)`` equal one ``fit(epochs=2)``. A different optimizer spec, loss, clipping or
        precision starts afresh, as ``reset=True`` does; ``seed`` seeds a run that starts afresh. A
        tensor unfrozen since the last fit starts with zero optimizer state.

        Args:
            x, y: arrays (numpy, tensors, memmaps; dicts or tuples of them) with targets, or a source of
                ``(x, y)`` / ``(x, y, sample_weight)`` batches: a torch ``DataLoader`` or ``Dataset``, a
                ``tf.data.Dataset``, a generator (function); see ``tlcore.sources``.
            optimizer: a ``tl.optim`` spec (default ``Adam(lr=1e-3)``); its ``lr`` may be a
                ``tl.schedules`` schedule, ``lr_mult`` layer-wise rates, ``no_decay`` exempt parameters.
            loss: a ``tl.losses`` spec or name: ``"cross_entropy"`` (integer labels or class
                probabilities), ``"binary_cross_entropy"``, ``"mse"``, ``"huber"``.
            metrics: names computed in numpy every epoch (``tl.metrics``; default ``accuracy`` for
                classification); ``History`` keeps each per epoch, ``val_`` ones for ``validation_data``,
                and ``lr``, the rate of the epoch's last step.
            validation_data: ``(x, y)``, ``(x, y, sample_weight)`` or a source of batches.
            clip_grad_norm: clip the global L2 norm of the gradients to this value.
            progress: ``True`` (a bar on a terminal, a line per epoch otherwise), ``"bar"``, ``"epoch"``
                or ``False``.
            cache_features: ``"auto"`` computes the frozen part's features once and trains only the
                head when that gives the same result (everything before the head frozen, no active
                dropout there, a deterministic source: arrays, or ``tl.data.Deterministic(loader)``);
                ``True`` insists (error if not possible); ``False`` never caches. With an
                ``UnfreezeSchedule``, decided stage by stage.
            precision: ``"float32"``, or mixed precision ``"bfloat16"`` / ``"float16"`` with each
                framework's own mechanism (torch autocast, a Keras dtype policy, the JAX computation's
                dtype); weights stay float32 (frozen ones bit-identical, as always).
            sample_weight: one weight >= 0 per sample (arrays); the loss is ``sum(w * l) / sum(w)``.
            class_weight: ``{class: weight}`` for ``cross_entropy`` (as PyTorch's ``weight=``).
            steps_per_epoch: batches per epoch of a source (required for an endless one).
            freeze: a ``tl.FreezePolicy`` applied before training, or a ``tl.UnfreezeSchedule`` of
                stages inside this fit.
            callbacks: ``tl.callbacks`` objects (``EarlyStopping``, ``ModelCheckpoint``, your own).
            reset: start afresh: new optimizer state, step 0, RNGs seeded from ``seed``.
            on_nonfinite: at the first step whose loss or a gradient is not finite, ``"raise"``
                :class:`tl.TrainingDiverged` (epoch, step, first non-finite tensor), or ``"warn"`` and
                return; either way the model keeps the last finite step's weights. ``"ignore"``: train
                on (NaN goes into the weights).
            checkpoint_dir: a folder to write the training state to (atomically), so that a killed run
                continues with ``tl.resume(folder)`` and the same ``fit`` call (see ``tlcore.resumable``).
            checkpoint_every: optimizer steps between writes, or ``"epoch"`` (default); the state is
                also written when the fit ends.
            resume: ``"auto"``: a model from ``tl.resume`` continues its run, after checking that the
                data, optimizer and recipe are the saved ones; ``"force"``: continue even if they differ;
                ``False``: start afresh (overwriting ``checkpoint_dir``'s state).
            strategy: ``tl.distribute.DataParallel()``: train on the framework's own data-parallel
                engine (``batch_size`` is the global batch); under ``torchrun`` only rank 0 shows
                progress and writes checkpoints, and ``History`` is the same on every rank.

        Example:
            >>> hist = ft.fit(x, y, epochs=2, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9))  # doctest: +SKIP
            >>> hist = ft.fit(torch_loader, epochs=5, metrics=["accuracy", "f1_macro"])       # doctest: +SKIP
        """
        optimizer = optimizer if optimizer is not None else Adam(lr=1e-3)
        if not isinstance(optimizer, OptimizerSpec):
            raise TypeError(f"optimizer must be a tl.optim spec (e.g. tl.optim.Adam(lr=1e-3)), got {optimizer!r}")
        spec_loss = losses.with_class_weight(losses.as_loss(loss), class_weight)
        names = self._metric_names(metrics, spec_loss)
        epochs = data.check_positive_int("epochs", epochs)
        batch_size = data.check_positive_int("batch_size", batch_size)
        if steps_per_epoch is not None:
            steps_per_epoch = data.check_positive_int("steps_per_epoch", steps_per_epoch)
        seed = data.check_seed(seed)
        mode = training.resolve_progress(progress)
        if clip_grad_norm is not None and (isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, numbers.Real)
                                           or not (np.isfinite(clip_grad_norm) and clip_grad_norm > 0)):
            raise data.DataError(f"clip_grad_norm must be a finite number > 0 or None, got {clip_grad_norm!r}")
        if precision not in PRECISIONS:
            raise OptimizerConfigError(unknown_name_message("precision", precision, PRECISIONS))
        if cache_features not in ("auto", True, False):
            raise data.DataError(f"cache_features must be 'auto', True or False, got {cache_features!r}")
        if freeze is not None and not isinstance(freeze, (FreezePolicy, UnfreezeSchedule)):
            raise TypeError(f"freeze takes a tl.FreezePolicy or a tl.UnfreezeSchedule, got {type(freeze).__name__}")
        replicas = self._strategy_replicas(strategy)
        source = self._source(x, y, sample_weight, spec_loss, batch_size=batch_size, shuffle=shuffle,
                              steps_per_epoch=steps_per_epoch)
        if replicas.count > 1:
            distribute.check_batches(batch_size, replicas.count, source.n if isinstance(source, sources.Arrays) else None)
            mode = mode if replicas.rank == 0 else training.resolve_progress(False)
        if getattr(source, "once", False) and epochs > 1 and steps_per_epoch is None:
            raise data.DataError("a generator can be read only once, but fit asks for several epochs: pass a "
                                 "generator function (called once per epoch), or steps_per_epoch=... to read it on")
        val = self._validation_source(validation_data, spec_loss)
        self._ensure_head(source.x if isinstance(source, sources.Arrays) else source.first().x)
        stages = freeze.stages if isinstance(freeze, UnfreezeSchedule) else ((0, freeze or self.policy),)
        for _, policy in stages:  # every stage's policy resolves on this model, before anything trains
            policy.resolve(self._base_tensors(), self.layers, head=self._head)
        plan = None
        if optimizer.lr_mult is not None or optimizer.no_decay is not None:
            plan = groups.plan_params(optimizer, self)
        keys = ["loss", *names, "lr"] + ([f"val_{k}" for k in ("loss", *names)] if val is not None else [])
        callbacks = check_callbacks(callbacks, keys)
        if on_nonfinite not in NONFINITE:
            raise OptimizerConfigError(unknown_name_message("on_nonfinite", on_nonfinite, NONFINITE))
        if resume not in ("auto", "force", False):
            raise CheckpointError(f"resume must be 'auto', 'force' or False, got {resume!r}")
        if checkpoint_every is not None and checkpoint_dir is None:
            raise CheckpointError("checkpoint_every needs checkpoint_dir=<folder> to write to")
        spec = TrainSpec(optimizer, spec_loss, None if clip_grad_norm is None else float(clip_grad_norm), seed,
                         precision, plan, guard=on_nonfinite != "ignore",
                         strategy=strategy if replicas.count > 1 else None)
        point = self._continue_from(source, spec, resume, reset, checkpoint_dir, checkpoint_every, batch_size=batch_size,
                                    shuffle=shuffle, freeze=freeze, metrics=names, cache_features=cache_features,
                                    steps_per_epoch=steps_per_epoch)
        self._verify_native()
        self._loss = spec_loss
        run = Run(spec, names, epochs, mode, lambda b, i: self._check_batch(b, i, spec_loss, replicas=replicas.count),
                  on_nonfinite)
        if cache_features is True:
            for _, policy in stages[:1]:
                refusal = self._cache_refusal(source, policy)
                if refusal:
                    raise FeatureCacheRefused(f"cannot cache features: {refusal}")
        saver, point = point
        if point is not None:
            self._resume_point = None
        self._strategy = spec.strategy
        try:
            return self._train(source, val, run, stages, callbacks, cache_features, reset, saver, point)
        finally:
            self._strategy = None
            self._fit_ended()

    def _strategy_replicas(self, strategy: Any) -> distribute.Replicas:
        if strategy is None:
            return distribute.Replicas(1, 0)
        if not isinstance(strategy, distribute.DataParallel):
            raise TypeError(f"strategy takes a tl.distribute.DataParallel(), got {type(strategy).__name__}")
        replicas = self._replicas(strategy)
        self._rank = replicas.rank
        return replicas

    def _continue_from(self, source: sources.Source, spec: TrainSpec, resume: bool | str, reset: bool,
                       folder: Any, every: Any, **recipe: Any) -> tuple[Any, Any]:
        """The fit's checkpoint writer (None without ``checkpoint_dir``) and the saved run it continues
        (None: none), its fingerprints checked."""
        from . import resumable

        point = None if reset or resume is False else self._resume_point
        saver = None
        if folder is not None or point is not None:
            prints = resumable.fingerprints(source, spec, **recipe)
            if folder is not None:
                saver = resumable.Checkpointer(folder, every if every is not None else "epoch", prints)
                ours = self._run is not None and self._run.folder == saver.folder.resolve()
                if point is None and resume is not False and saver.path.exists() and not ours:
                    raise CheckpointError(
                        f"{str(folder)!r} holds the training state of another run; continue it with "
                        f"tl.resume({str(folder)!r}) and this fit, or fit(..., resume=False) to start afresh over it")
            if point is not None:
                point.check(prints, force=resume == "force")
        return saver, point

    def _validation_source(self, validation_data: Any, spec: losses.LossSpec) -> sources.Source | None:
        if validation_data is None:
            return None
        if sources.is_source(validation_data):
            return self._source(validation_data, None, None, spec, batch_size=256, name="validation x")
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
            raise data.DataError("validation_data must be (x, y), (x, y, sample_weight) or a source of batches, "
                                 f"got {type(validation_data).__name__}")
        w = validation_data[2] if len(validation_data) == 3 else None
        return self._source(validation_data[0], validation_data[1], w, spec, batch_size=256, name="validation x")

    def _start_run(self, spec: TrainSpec, reset: bool) -> RunState:
        """The state a fit starts from: the last fit's when it can continue, else a fresh one."""
        key = replace(spec, seed=0)
        last = self._run
        if reset or last is None or last.key != key:
            return RunState(key, np.random.default_rng(spec.seed))
        return last

    def _trainer_for(self, owner: Model, run: RunState) -> Trainer:
        """The trainer of ``owner`` (this model or its head view) for ``run``: reused from ``owner``'s
        cache, or made, then started afresh (``reset``) or continued (``resume``, optimizer state carried
        over from the run's last trainer, re-keyed between this model's and its head's tensor names)."""
        key = self._spec_for(owner, run.key)
        trainer = owner._trainers.pop(key, None)
        if trainer is None:
            trainer = owner._make_trainer(replace(key, seed=run.seed))
        owner._trainers[key] = trainer
        while len(owner._trainers) > MAX_TRAINERS:
            owner._trainers.popitem(last=False)
        if not run.started:
            trainer.reset(run.seed)
            run.started = True
        elif run.live is not None and run.live[0] is trainer:
            trainer.resume()
        else:
            carried = run.carried_state(self._head)
            trainer.resume()
            trainer.import_state(run.rename(carried, self._head, to_head=True) if owner is not self else carried)
        run.live = (trainer, owner)
        return trainer

    def _spec_for(self, owner: Model, spec: TrainSpec) -> TrainSpec:
        """``spec`` (seed 0) for ``owner``: the head view's trainer gets the plan in the head's own names."""
        spec = replace(spec, seed=0)
        if owner is self or spec.params is None or self._head is None:
            return spec
        prefix = f"{self._head}."
        entries = tuple((n[len(prefix):], g, m, wd) for n, g, m, wd in spec.params.entries if n.startswith(prefix))
        return replace(spec, params=replace(spec.params, entries=entries))

    def _train(self, source: sources.Source, val: sources.Source | None, run: Run, stages: tuple,
               callbacks: list[Callback], cache_features: bool | str, reset: bool, saver: Any = None,
               point: Any = None) -> History:
        t0 = time.perf_counter()
        if point is not None:  # a saved run (tl.resume) continues
            state = self._run = RunState.resumed(replace(run.spec, seed=0), point)
        else:
            state = self._start_run(run.spec, reset)
            state.seed = run.spec.seed
        hist, lr_steps, steps, first, skip = History(), [], 0, 0, 0
        if point is not None:
            for logs in point.history:
                hist.append(logs)
            lr_steps, steps = list(point.info.get("lr_steps", [])), int(point.info.get("steps", 0))
            first, skip = point.epoch, point.batch
            if "stopped_epoch" in point.info:  # the run had stopped early: nothing left to train
                hist.info["stopped_epoch"], first = point.info["stopped_epoch"], run.epochs
        if saver is not None:
            state.folder = saver.folder.resolve()
        per_epoch = source.steps
        progress = training.Progress(run.progress, None if per_epoch is None else run.epochs * per_epoch,
                                     f"fit [{self.backend}]")
        schedule = run.spec.optimizer.schedule
        feats = head_val = None
        trainer, stage, info_cache, diverged = None, None, [], None
        interrupt = training.DeferredInterrupt()

        def save(epoch: int, batch: int, rng: dict, acc: Accumulator | None, applied: list[float]) -> None:
            if run.spec.strategy is not None:
                if state.live is not None:  # its write-back may be a collective: every process, together
                    state.live[0].finish()
                if self._rank != 0:
                    return  # rank 0 (the chief) writes the run's state
            saver.save(self, state.optimizer_state(self._head), epoch=epoch, batch=batch,
                       step=state.step + len(applied), seed=state.seed, rng=rng, history=_rows(hist),
                       info={"lr_steps": lr_steps + applied, "steps": steps + len(applied), **(
                           {"stopped_epoch": hist.info["stopped_epoch"]} if "stopped_epoch" in hist.info else {})},
                       acc=acc)

        for cb in callbacks:
            cb.on_train_begin(self)
        try:
            with interrupt:
                for epoch in range(first, run.epochs):
                    e0 = time.perf_counter()
                    index = max(i for i, (start, _) in enumerate(stages) if start <= epoch)
                    if index != stage:
                        stage = index
                        policy = stages[index][1]
                        if trainer is not None:
                            trainer.finish()
                            state.keep_state()
                        if policy != self.policy:
                            self.freeze(policy)
                        refusal = self._cache_refusal(source) if cache_features else "cache_features=False"
                        cached = not refusal
                        info_cache.append("used" if cached else ("off" if not cache_features else f"refused: {refusal}"))
                        if cached and feats is None:
                            feats = training.cache_features(self._features, source, np.random.default_rng(0),
                                                            run.check, FEATURE_BATCH)
                            head_val = None if val is None else training.cache_features(
                                self._features, val, np.random.default_rng(0), run.check, 256)
                        owner = self.head_model() if cached else self
                        trainer = self._trainer_for(owner, state)
                    epoch_source = feats if owner is not self else source
                    epoch_val = head_val if owner is not self else val
                    check = (lambda b, i: b) if owner is not self else run.check
                    start = skip if epoch == first else 0
                    epoch_rng = state.rng.bit_generator.state  # a resumed epoch replays its order from here
                    lrs = training.LearningRates(schedule, state.step)
                    nonfinite = "raise" if run.spec.guard else "nan"  # "ignore" reports NaN metrics, trains on
                    acc = Accumulator(run.metrics, run.spec.loss, nonfinite)
                    if start:
                        point.restore_metrics(acc)
                    ticks = [0]

                    def on_step(n: int) -> None:
                        progress.step(n)
                        ticks[0] += n
                        interrupt.check()

                    boundary = None if saver is None else (lambda done: save(epoch, done, epoch_rng, acc, lrs.applied))
                    try:
                        with interrupt.steps():
                            training.run_epoch(trainer, epoch_source, state.rng, acc, check, on_step, lrs, start,
                                               None if saver is None else saver.every_steps, boundary)
                    except KeyboardInterrupt:
                        state.step += ticks[0]  # the steps completed before it
                        raise
                    steps += len(lrs.applied)
                    state.step += len(lrs.applied)
                    lr_steps += lrs.applied
                    if trainer.nonfinite is not None:
                        diverged = TrainingDiverged(epoch, state.step, trainer.nonfinite)
                        break
                    logs = acc.result()
                    if epoch_val is not None:
                        trainer.finish()
                        forward = (lambda xb: np.asarray(owner._forward(xb)))
                        logs.update({f"val_{k}": v for k, v in training.evaluate_source(
                            forward, epoch_val, run.metrics, run.spec.loss, check, nonfinite).items()})
                    # the rate of the epoch's last step (of the run's last one when a resumed epoch had none left)
                    logs["lr"] = lrs.applied[-1] if lrs.applied else float(schedule.lr_at(max(state.step - 1, 0)))
                    hist.append(logs)
                    progress.epoch(epoch, run.epochs, logs, time.perf_counter() - e0)
                    trainer.finish()
                    stop = any([bool(cb.on_epoch_end(epoch, dict(logs), self)) for cb in callbacks])
                    if stop:
                        hist.info["stopped_epoch"] = epoch
                    if saver is not None and (stop or saver.every == "epoch" or epoch == run.epochs - 1):
                        save(epoch + 1, 0, state.rng.bit_generator.state, None, [])
                    if stop:
                        break
        finally:
            if trainer is not None:
                trainer.finish()
            progress.close()
            for cache in (feats, head_val):
                if isinstance(cache, training.FeatureCache):
                    cache.close()
            self._run = state
        for cb in callbacks:
            cb.on_train_end(self)
        hist.info.update(steps=steps, lr_steps=lr_steps, seconds=time.perf_counter() - t0)
        if trainer is not None:
            hist.info.update(compilations=trainer.compilations, optimizer_state_bytes=trainer.optimizer_state_bytes(),
                             cache_features=info_cache[0] if len(set(info_cache)) == 1 else info_cache)
        if saver is not None:
            hist.info["checkpoint_writes"] = saver.writes
        if diverged is not None:
            hist.info["diverged"] = {"epoch": diverged.epoch, "step": diverged.step, "tensor": diverged.tensor}
            if run.on_nonfinite == "raise":
                raise diverged
            warnings.warn(str(diverged), RuntimeWarning, stacklevel=3)
        return hist

    def _cache_refusal(self, source: sources.Source | None = None, policy: FreezePolicy | None = None) -> str:
        """Why feature caching is not possible now, or under ``policy`` ('' when it is)."""
        if self._head is None:
            return "the model has no head attached by tl.finetune"
        resolved = self._resolved if policy is None else policy.resolve(self._base_tensors(), self.layers, head=self._head)
        base = [t for t in self.tensors if not in_layer(t.layer, self._head) and t.kind != "rng"]
        moving = [t.name for t in base if resolved.mask[t.name]]
        if moving:
            return f"{len(moving)} tensor(s) before the head are trainable (e.g. {moving[0]!r})"
        random = [n for n in self._stochastic_layers() if not in_layer(n, self._head)]
        if random:
            return f"layers before the head are random while training: {random}"
        if source is not None and not source.deterministic:
            return (f"{source.describe()} may give other batches every epoch (random augmentation, shuffling); "
                    "declare tl.data.Deterministic(source) if it does not")
        return ""

    def describe_groups(self, optimizer: OptimizerSpec) -> str:
        """A table of ``optimizer``'s parameter groups on this model: layers, tensors, lr multiplier and
        weight decay (the same on every backend for the same model).

        Example:
            >>> print(ft.describe_groups(tl.optim.AdamW(lr=1e-3, lr_mult=tl.LayerDecay(0.75, groups))))  # doctest: +SKIP
        """
        self._require_head("describe_groups()")
        plan = groups.plan_params(optimizer, self)
        layers_of = {t.name: t.layer for t in self._base_tensors()}
        return groups.describe(plan, self._resolved.mask, layers_of)

    def head_model(self) -> Model:
        """The head alone, sharing its weights with this model; it takes :meth:`features`' output."""
        self._require_head("head_model()")
        if self._head is None:
            raise TlcoreError("this model has no head attached by tl.finetune")
        if self._head_view is None:
            self._head_view = self._head_model()
            self._head_view._is_head_view = True
        return self._head_view

    def features(self, x, batch_size: int = FEATURE_BATCH) -> np.ndarray:
        """The head's input for ``x`` (inference mode): ``head_model().predict(features(x))`` equals
        ``predict(x)``."""
        x = self._inputs(x)
        self._ensure_head(x)
        return self._batched_features(x, data.check_positive_int("batch_size", batch_size))

    def _batched_features(self, x: data.Inputs, batch_size: int = FEATURE_BATCH) -> np.ndarray:
        """The head's input for ``x``, computed ``batch_size`` samples at a time (a backend may prepare
        once for all batches)."""
        return np.concatenate([np.asarray(self._features(data.take(x, slice(i, i + batch_size))))
                               for i in range(0, data.num_samples(x), batch_size)])

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Save weights, non-trainable state and how the model was built (safetensors + JSON
        metadata, atomic). Zoo models load on any backend with ``tl.load(path, backend=...)``."""
        from .workflow import save

        self._require_head("a checkpoint")
        save(self, path)

    # ------------------------------------------------------------------ display
    def summary(self, input_shape: tuple[int, ...] | None = None) -> Summary:
        """Layers with kind, output shape, parameter count and whether they train; totals like
        Keras' ``model.summary()``. Output shapes are shown for ``input_shape`` (per sample), the
        model's own, or the zoo's default size. ``print(m.summary())``.

        A head that waits for its first batch is built from ``input_shape`` when given; otherwise its
        row says "(built on first batch)" and the totals leave it out (and say so).
        """
        shape = data.check_input_shape(input_shape) if input_shape is not None else (
            self.input_shape if data.fully_known(self.input_shape) else data.check_input_shape(
                self.meta.get("default_input_shape")))
        if input_shape is not None:
            self.build(input_shape=shape)
        state = self._read_state()
        sizes = {k: v.size for k, v in state.items()}
        mask, kinds = self._resolved.mask, self._layer_kinds()
        shapes = self._output_shapes(shape) if data.fully_known(shape) else {}
        infos = self._base_tensors()
        rows = []
        for layer in self.layers:
            own = [t for t in infos if in_layer(t.layer, layer) and t.kind in PARAM_KINDS]
            n = sum(sizes[t.name] for t in own)
            flags = {mask[t.name] for t in own}
            status = "-" if not own else "yes" if flags == {True} else "frozen" if flags == {False} else "partly"
            out = shapes.get(layer)
            rows.append(("  " * layer.count(".") + layer, kinds.get(layer, ""),
                         "" if out is None else str(tuple(out)), f"{n:,}", status))
        note = ""
        if self._pending is not None:
            rows.append((self._pending.name, "Head", "(built on first batch)", "?", "yes"))
            note = (f"The head {self._pending.name!r} is not built yet: its parameters are not counted "
                    "(call build(x) or summary(input_shape=...)).")
        if self.adapter is not None:
            lora = sum(sizes[n] for n in self._adapter.tensor_names())
            note = "\n".join(x for x in (note, f"LoRA adapters: rank {self.adapter.rank}, scale {self.adapter.scale:g}, on "
                                              f"{len(self.adapter.targets)} dense layers ({lora:,} params, trainable)") if x)
        trainable, total = self._param_counts()
        buffers = sum(sizes[t.name] for t in infos if t.kind in ("bn_stat", "buffer"))
        return Summary(rows, total, trainable, total - trainable, buffers, note=note,
                       title=f"{type(self).__name__} (backend={self.backend!r}, policy={self.policy.mode!r})")

    def __repr__(self) -> str:
        trainable, total = self._param_counts()
        pending = " (head built on first batch)" if self._pending is not None else ""
        return (f"<{type(self).__name__} backend={self.backend!r} layers={len(self.layers)} "
                f"params={total:,} trainable={trainable:,} head={self.head!r}{pending}>")
