"""The whole backend contract in one place: :class:`Backend` (one per framework), the
:class:`ModelPrimitives` a backend's :class:`tlcore.Model` subclass implements, and :class:`Trainer`
(one prepared training step).

Everything that is the same on every backend lives in the core (``tlcore.model``, ``tlcore.workflow``):
checking inputs, resolving freeze policies and cuts, planning heads and drawing their initial values,
reusing trainers, the epoch loop, feature caching, metrics, summaries and checkpoints. A backend
translates those decisions into its framework through the abstract methods below; each of them is
called by a core code path, so none is optional. Some hooks have a default a backend may keep
(``_verify_native`` and ``_check_inputs``: nothing to check; ``_output_shapes``: no shapes in the summary;
``_fit_ended``: nothing to release; ``_replicas``: one replica only).

Example:
    >>> from tlcore.backend import Backend, ModelPrimitives, Trainer
    >>> sorted(ModelPrimitives.__abstractmethods__)[:4]
    ['_add_lora', '_apply_freeze', '_attach_head', '_attach_native_head']
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .errors import DistributedError

if TYPE_CHECKING:
    from .adapters import LoraTarget
    from .distribute import Replicas
    from .freeze import Resolved, TensorInfo
    from .head import HeadPlan
    from .model import Model
    from .optim import TrainSpec


class Backend(abc.ABC):
    """One framework's entry point; its module imports the framework at its top."""

    name: ClassVar[str]

    @abc.abstractmethod
    def owns(self, obj: object) -> bool:
        """True when ``obj`` is a model this backend can wrap."""

    @abc.abstractmethod
    def wrap(self, native: Any, input_shape: tuple[int | None, ...] | None = None) -> Model:
        """Wrap a native model as a :class:`Model` (sharing it, not copying it)."""

    @abc.abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions of the framework packages, for checkpoints and benchmark reports."""

    @abc.abstractmethod
    def reference_model(self, seed: int = 0, variant: str = "sequential") -> Model:
        """A conformance-suite network, built natively and wrapped, on 8x8 RGB images in the
        backend's own layout. Tensor names start with their layer's name.

        ``"sequential"``: layers ``conv1`` (3->8, 3x3, same), ``bn1``, ``relu1``, ``conv2`` (8->16,
        3x3, same), ``bn2``, ``relu2``, ``pool`` (global average), ``dropout`` (0.25), ``fc`` (16->4),
        in the framework's sequential container.

        ``"custom"``: the framework's own way of writing a model by hand (a subclassed
        ``nn.Module``/``keras.Model``/``nnx.Module``, not a sequential container) with layers
        ``conv1``, ``bnact1`` (a custom layer doing BatchNorm + ReLU that reads the training flag
        itself, as timm's ``BatchNormAct2d``), ``conv2``, ``bnact2``, ``pool``, ``fc`` (16->4).

        ``"tokens"``: a model taking ``{"input_ids": int (N, 6), "attention_mask": (N, 6)}`` with
        layers ``embed`` (Embedding(20, 8)) and ``proj`` (dense 8->8), whose output is token features
        (N, 6, 8).
        """

    @abc.abstractmethod
    def zoo_model(self, name: str, config: dict) -> Model:
        """Build zoo architecture ``name`` natively (see ``tlcore.zoo.archs``), with canonical state:
        PyTorch's tensor names and layouts, NHWC numpy input. Initial values do not matter: the zoo
        overwrites them."""


class Trainer(abc.ABC):
    """One prepared (compiled, where the framework compiles) training step for a fixed trainable set
    and optimizer spec. The core keeps trainers per model, starts each run with :meth:`reset` and
    continues one with :meth:`resume` (and :meth:`import_state` when the trainable set changed).

    Learning rates: the core computes the base rate of every step from the optimizer's schedule and
    passes it (``lr``); the trainer applies ``lr * multiplier`` and its weight decay to each parameter
    as ``spec.rates()`` says (PyTorch's per-group ``lr`` / ``weight_decay``: AdamW's decoupled decay
    scales with the parameter's rate)."""

    #: how many times the step was compiled (traced) since the last reset; 0 where nothing compiles
    compilations: int = 0
    #: set by a guarded step (``spec.guard``) whose loss or a gradient was not finite: ``"loss"`` or the
    #: name of the first parameter whose gradient was not; None otherwise (reset by reset/resume)
    nonfinite: str | None = None

    @abc.abstractmethod
    def step(self, x: Any, y: np.ndarray, w: np.ndarray | None = None, lr: float | None = None) -> Any:
        """Train on one batch and return the outputs (logits) of its training forward pass, from which
        the core computes the loss and metrics.

        ``x``: an array, or a dict or tuple of arrays; ``y``: the targets of ``spec.loss`` (int64 labels
        or float32 class probabilities for cross entropy, float32 values otherwise); ``w``: float32
        sample weights or None. The step minimises ``spec.loss``'s weighted mean with PyTorch's
        semantics: ``sum_i w_i * l_i / sum_i w_i * d_i``, ``l_i`` the per-sample loss as PyTorch's
        ``reduction="none"`` gives it (class weights, label smoothing and ``pos_weight`` included; the
        mean over outputs for binary cross entropy, MSE and Huber), ``d_i`` the class weight of sample
        ``i``'s label (cross entropy with integer labels and class weights) or 1
        (``tlcore.losses`` holds the numpy reference). ``lr``: this step's base learning rate (None:
        the optimizer's ``lr`` when it is a number).

        With ``spec.guard``, a step whose loss or a gradient is not finite changes nothing (weights,
        optimizer state and counters, BatchNorm statistics and other state the forward pass writes
        stay as before it; random state may advance) and sets :attr:`nonfinite`; once it is set,
        later steps change nothing either until the next ``reset``/``resume``. A step interrupted by
        Ctrl-C (``KeyboardInterrupt``) leaves the model as the last completed step did."""

    def dispatch(self, x: Any, y: np.ndarray, w: np.ndarray | None = None, lr: float | None = None) -> Any:
        """Start :meth:`step` on one batch and return a handle that :meth:`collect` turns into its
        outputs; the core collects handles in the order it dispatched them, at most a few behind, so
        that an asynchronous framework overlaps reading the next batch with the step. :attr:`nonfinite`
        is known once a step's handle is collected. Default: the step at once."""
        return self.step(x, y, w, lr)

    def collect(self, handle: Any) -> Any:
        """The outputs of the dispatched step ``handle`` (see :meth:`dispatch`)."""
        return handle

    def epoch(self, x: Any, y: np.ndarray, w: np.ndarray | None, batches: list,
              on_step: Callable[[int], Any] = lambda n: None, lrs: list[float] | None = None) -> list[Any]:
        """Train on the rows ``b`` of ``x``, ``y`` and ``w`` for each ``b`` of ``batches`` in turn, at
        the base rates ``lrs``, calling ``on_step(steps done)``; return each step's outputs, stopping
        after a step that set :attr:`nonfinite`. A trainer may run the whole epoch in one compiled call
        instead."""
        from .data import take

        outs = []
        for i, b in enumerate(batches):
            outs.append(self.step(take(x, b), y[b], None if w is None else w[b], None if lrs is None else lrs[i]))
            on_step(1)
            if self.nonfinite is not None:
                break
        return outs

    @abc.abstractmethod
    def reset(self, seed: int) -> None:
        """Start a new run from the model's current weights: zero optimizer state (every counter at
        0), random layers reseeded from ``seed``, ``compilations`` back to 0."""

    @abc.abstractmethod
    def resume(self) -> None:
        """Continue a run: read the model's current weights (they may have been loaded since), keep
        the optimizer state and counters, and the random layers' state as the last :meth:`finish` left
        it (a framework-global generator is restored from the model); ``compilations`` back to 0."""

    def finish(self) -> None:
        """Called after steps (the end of an epoch or fit): write what the trainer holds back to the
        model (weights, random state); may be called twice."""

    @abc.abstractmethod
    def export_state(self) -> dict:
        """The optimizer state of the parameters this trainer trains, framework-neutral:
        ``{"slots": {tensor name: {slot: array}}, "steps": {tensor name: updates it got}}`` with
        PyTorch's slot names (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``; ``square_avg``,
        ``grad_avg``) in the tensors' ``state()`` layouts, float32."""

    @abc.abstractmethod
    def import_state(self, state: dict) -> None:
        """Set the optimizer state of the parameters it trains from ``state`` (as :meth:`export_state`
        gives it); a parameter absent from it starts at zero, with no steps (just unfrozen)."""

    def applied_lr(self) -> dict[str, float]:
        """``{tensor name: learning rate}`` as the framework's optimizer holds it after the last step
        (to check that schedules and multipliers are what they should be)."""
        raise NotImplementedError

    @abc.abstractmethod
    def optimizer_state_bytes(self) -> int:
        """Bytes held by the optimizer's state (moments, counters)."""


class ModelPrimitives(abc.ABC):
    """What a backend's :class:`tlcore.Model` subclass implements (the ``_``-prefixed methods).

    Conventions: ``x`` is a numpy batch in the model's own input layout: one array, a dict of arrays
    (named inputs; call the model with them as keyword arguments where the framework does that) or a
    tuple of arrays (positional inputs), see ``tlcore.data.as_inputs``; a *name* is a tlcore name
    (layers and tensors, dotted); ``state`` arrays are numpy copies.
    """

    #: the per-sample layout of the features a head receives: channels last (NHWC) or first (NCHW)
    channels_last: ClassVar[bool] = True

    @property
    @abc.abstractmethod
    def native(self) -> Any:
        """The framework object itself (``nn.Module``, ``keras.Model``, ``nnx.Module``)."""

    # ---- structure and state
    @abc.abstractmethod
    def _layer_names(self) -> list[str]:
        """Cut points in forward order; a container comes before its (dotted) children."""

    @abc.abstractmethod
    def _layer_kinds(self) -> dict[str, str]:
        """``{layer: class name}`` for the summary."""

    @abc.abstractmethod
    def _tensor_infos(self) -> list[TensorInfo]:
        """Every tensor of the state, in forward order, with its owning layer and kind."""

    @abc.abstractmethod
    def _read_state(self) -> dict[str, np.ndarray]:
        """Every tensor as a numpy array (copies)."""

    @abc.abstractmethod
    def _write_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Overwrite the named tensors (names, shapes and dtypes already checked by the core)."""

    @abc.abstractmethod
    def _apply_freeze(self, resolved: Resolved) -> None:
        """Make the native model train exactly ``resolved.mask``'s tensors, with the BatchNorm layers
        of ``resolved.frozen_bn_units`` in inference mode while training."""

    def _verify_native(self) -> None:
        """Called at the start of every ``fit``: raise a named error if the native model was changed
        behind tlcore's back (e.g. its trainable flags) so that it no longer matches the mask."""

    def _random_state(self) -> dict[str, np.ndarray]:
        """Random-number state kept outside ``state()`` (PyTorch's generators), as uint8 arrays, for a
        resumable training state (``tl.resume``); default: none (it is in ``state()``)."""
        return {}

    def _set_random_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`_random_state` gave (the next fit continues with it)."""

    def _check_inputs(self, x: Any) -> None:
        """Called on every ``x`` given to fit/predict/evaluate/features/build, before anything runs:
        raise :class:`tlcore.DataError` naming what the model needs that ``x`` lacks (a named input
        missing from a dict, an unknown one, too many positional ones). Default: nothing to check."""

    # ---- inference
    @abc.abstractmethod
    def _forward(self, x: np.ndarray) -> np.ndarray:
        """Inference-mode outputs for one batch; changes no state."""

    @abc.abstractmethod
    def _features(self, x: np.ndarray) -> np.ndarray:
        """Inference-mode input of the head (what :meth:`_head_model` takes) for one batch."""

    @abc.abstractmethod
    def _head_model(self) -> Model:
        """The attached head as a :class:`Model` sharing its weights with this one; it takes the
        output of :meth:`_features`. The core calls this once per structure and caches it."""

    @abc.abstractmethod
    def _stochastic_layers(self) -> list[str]:
        """Layers that are random while training (dropout with a rate > 0, noise); feature caching
        is refused when one of them is before the head."""

    def _output_shapes(self, input_shape: tuple[int, ...]) -> dict[str, tuple]:
        """``{layer: per-sample output shape}`` for per-sample ``input_shape``, for the summary;
        layers a backend cannot tell are left out."""
        return {}

    # ---- training
    @abc.abstractmethod
    def _make_trainer(self, spec: TrainSpec) -> Trainer:
        """A new training step for the current policy and ``spec``, not started: the core calls its
        ``reset(seed)`` or ``resume()`` next (and reuses it for later fits with the same spec and policy)."""

    # ---- structure changes
    @abc.abstractmethod
    def _cut(self, last: str | None, layers: list[str]) -> Model:
        """A new model with its own copy of the weights, computing this one's output at layer ``last``
        (None: the whole model); ``layers`` are the cut points it keeps (see ``tlcore.cut.kept_layers``)."""

    @abc.abstractmethod
    def _feature_shape(self, x: np.ndarray | None) -> tuple[int | None, ...] | None:
        """Per-sample shape of this model's output (what a head appended now would receive), computed
        on the batch ``x``; with ``x=None``, without data where possible (a known input shape, or a
        width known statically), else None: the head then waits for the first batch."""

    @abc.abstractmethod
    def _attach_native_head(self, name: str, head: Any) -> None:
        """Append the user's own head module (an ``nn.Module``, a Keras layer or model, an NNX module)
        as layer ``name``, in place; it takes this model's output as it is (no pooling) and trains.
        Raise :class:`tlcore.UnsupportedModelError` for an object of another framework."""

    # ---- data parallel (tlcore.distribute)
    def _replicas(self, strategy: Any) -> Replicas:
        """The replicas ``strategy`` (a ``tl.distribute`` spec) runs on here, checked before training:
        raise :class:`tlcore.DistributedError` naming what is missing (no process group outside
        ``torchrun``, fewer devices than asked) or a strategy this backend cannot run. When the count
        is above 1, the core passes the strategy in ``TrainSpec.strategy``: :meth:`_make_trainer`
        then builds a step on the framework's own engine that trains on each replica's shard of the
        global batch and returns the outputs of the whole global batch (identical on every process),
        and :meth:`_features` computes each replica's shard. Default: one replica only."""
        from .distribute import Replicas

        if getattr(strategy, "devices", None) not in (None, 1):
            raise DistributedError(f"the {self.backend} backend cannot run {strategy!r}")
        return Replicas(1, 0)

    def _fit_ended(self) -> None:
        """Called when a fit ends, however it ends: release what the backend kept for it (e.g. the
        replicated weights of a data-parallel feature pass). Default: nothing."""

    # ---- adapters (tlcore.adapters)
    @abc.abstractmethod
    def _lora_targets(self) -> list[LoraTarget]:
        """Every dense layer (``nn.Linear``, Keras ``Dense``, ``nnx.Linear``) outside the head, in
        forward order, as :class:`tlcore.adapters.LoraTarget` records; adapted or not."""

    @abc.abstractmethod
    def _add_lora(self, target: LoraTarget, scale: float, dropout: float, a: np.ndarray, b: np.ndarray) -> None:
        """Adapt ``target`` in place: its output (before any activation of its own) becomes
        ``base(x) + scale * drop(x) @ a.T @ b.T``, ``drop`` a dropout of rate ``dropout`` on the
        adapter's input, active only while training. ``a`` (rank, in) and ``b`` (out, rank), float32,
        become trainable tensors ``<module>.lora_A`` / ``<module>.lora_B`` of ``state()`` in these
        layouts (kind ``param``, owned by the layer that owns the kernel); the core resets its tensor
        list and applies the freeze policy after. A copy made by :meth:`_cut` keeps the adapters.
        Random state of the dropout may be further ``<module>.lora_*`` tensors (kind ``rng``)."""

    @abc.abstractmethod
    def _remove_lora(self, module: str) -> None:
        """Undo :meth:`_add_lora` on ``module`` in place: it computes ``base(x)`` again and its adapter
        tensors leave ``state()``."""

    @abc.abstractmethod
    def _attach_head(self, plan: HeadPlan, name: str, values: dict[str, np.ndarray]) -> None:
        """Append the head of ``plan`` as layer ``name`` to this model, in place, with the initial
        ``values`` (``{"out.weight": ...}``, PyTorch's layout). Its tensors are named
        ``<name>.<layer>.weight`` / ``.bias`` (canonical, on every backend) and its layers after
        ``plan.spec.layers()``."""
