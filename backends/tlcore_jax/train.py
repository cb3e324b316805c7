"""The JAX training step: one ``jax.jit``-compiled function per (model structure, freeze partition,
optimizer, loss spec, precision, batch structure and shapes, with or without sample weights), shared
by every model of the same structure and reused across batches, epochs and ``fit`` calls. A batch is
an array, a dict or a tuple of arrays (a pytree: jit keys its cache on the structure, so dict batches
compile once per shape too). The step returns the logits of its training forward pass (float32); the
core computes the loss and metrics from them in numpy.

The loss is ``tlcore.losses``' spec with PyTorch's exact semantics (:func:`weighted_loss`: class
weights, label smoothing, soft labels, ``pos_weight``, Huber's ``delta``, and per-sample weights as
``sum(w * l) / sum(w * d)``); the spec is part of the static step configuration, so its class and
positive weights are constants of the compiled step.

Frozen costs nothing: the step differentiates only the trainable parameters (the state is split
into trainable / updated-by-the-forward-pass / constant parts, and ``jax.grad`` sees only the first),
so no gradient is ever computed for a frozen tensor, the optimizer (clipping and weight decay
included) only ever sees trainable tensors, and frozen BatchNorm layers run on their moving
statistics.

The optimizer is PyTorch's, parameter by parameter (:class:`TorchRule`): each trainable parameter has
its own learning-rate multiplier and weight decay (``TrainSpec.rates()``: static constants of the
compiled step, as PyTorch's param groups), its own step count (Adam's bias correction; 0 for a
parameter unfrozen in the middle of a run, as a new param group) and its own state slots under
PyTorch's names (:class:`OptState`). The base learning rate of each step is an argument of the
compiled step (a float32 scalar: schedules never recompile); the rate each parameter got in the last
step is kept in the state (:meth:`JaxTrainer.applied_lr`). The state is exported and imported in the
framework-neutral layout of ``tlcore.backend.Trainer``, so a run continues across ``fit`` calls,
freeze changes and feature caching.

Mixed precision (``precision="bfloat16"`` or ``"float16"``) is JAX's own: inside the step the
parameters (trainable and frozen), frozen BatchNorm statistics and float inputs are cast to the
compute dtype and Flax layers compute in it (their ``dtype`` attribute, :func:`set_compute_dtype`),
so every matmul and convolution runs in it, while the loss, the gradients (cast back by the transpose
of the cast), the float32 master weights, the optimizer state and trainable BatchNorm statistics
(computed and updated in float32) stay float32. ``float16`` uses dynamic loss scaling
(:class:`LossScale`).

The non-finite guard (``TrainSpec.guard``, static in :class:`StepConfig`: an unguarded step compiles
without it) runs inside the compiled step: one finiteness reduction per gradient and the loss give an
int32 flag (:func:`_guard_flag`) carried from step to step; while it is set, the step returns the
values it was given (``jnp.where``), so the steps :meth:`JaxTrainer.epoch` dispatched after a refused
one change nothing, and the host reads the flag only when it copies a step's outputs.

Example:
    >>> trainer = model._make_trainer(TrainSpec(tl.optim.Adam(lr=1e-3)))   # doctest: +SKIP
    >>> trainer.reset(seed=0)                                               # doctest: +SKIP
    >>> logits = trainer.step(x, y, sample_weight, lr=1e-3)                 # doctest: +SKIP
    >>> trainer.compilations                                                # doctest: +SKIP
    1
"""
from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tlcore.backend import Trainer
from tlcore.data import Inputs, num_samples, take
from tlcore.errors import TlcoreError
from tlcore.losses import LossSpec, as_loss
from tlcore.optim import OptimizerSpec, TrainSpec
from tlcore.schedules import Schedule

from .cut import Path, run_until, top_layer
from .freeze import Partition, set_modes
from .inputs import attention_mask, call, cast_floats, check_call, to_device
from .layers import HeadModule

if TYPE_CHECKING:
    from .model import JaxModel

_CACHE_SIZE = 64
#: the compute dtype of each ``TrainSpec.precision``
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
#: finite float16 steps in a row after which the loss scale doubles (``torch.amp.GradScaler``'s)
LOSS_SCALE_GROWTH_INTERVAL = 2000


def rule_of(spec: OptimizerSpec) -> OptimizerSpec:
    """``spec``'s update rule alone: without its learning rate (a step argument), weight decay and
    ``lr_mult`` / ``no_decay`` (the per-parameter rates of :class:`StepConfig`), so that steps that
    differ only in those share their compilation."""
    return dataclasses.replace(spec, lr=1.0, weight_decay=0.0, lr_mult=None, no_decay=None)


def slot_names(spec: OptimizerSpec) -> tuple[str, ...]:
    """The state ``torch.optim`` keeps per parameter for ``spec`` (besides its step count)."""
    if spec.kind == "sgd":
        return ("momentum_buffer",) if spec.momentum else ()
    if spec.kind in ("adam", "adamw"):
        return ("exp_avg", "exp_avg_sq")
    if spec.kind == "rmsprop":
        return ("square_avg", *(("grad_avg",) if spec.centered else ()),
                *(("momentum_buffer",) if spec.momentum else ()))
    raise ValueError(f"unknown optimizer kind {spec.kind!r}")


class OptState(NamedTuple):
    """The optimizer state of the trainable parameters, in the step's order.

    ``lr``: float32 ``(n,)``, the learning rate each parameter got in the last step (base rate times
    its multiplier: PyTorch's ``param_group["lr"]``); ``steps``: int32 ``(n,)``, the updates each one
    got (PyTorch's ``state["step"]``); one vector each, so that the per-parameter scalars of a step
    (rates, bias corrections) cost one small fused computation, not one per parameter; ``slots``:
    PyTorch's slot name (``exp_avg``, ...) -> one array per parameter, in its dtype and layout."""

    lr: jax.Array
    steps: jax.Array
    slots: dict


def _one_minus_pow(beta: float, t: jax.Array) -> jax.Array:
    """``1 - beta ** t`` (Adam's bias correction) to float32 precision even for ``beta`` near 1,
    where ``1 - float32(beta) ** t`` loses digits: ``-expm1(t * log(beta))``, ``log`` on the host."""
    if beta == 0.0:
        return jnp.ones_like(t)
    return -jnp.expm1(t * jnp.float32(math.log(beta)))


@dataclass(frozen=True)
class TorchRule:
    """``torch.optim``'s update for a list of parameters, each with its ``(lr multiplier, weight
    decay)`` of ``rates``: the global gradient norm clipped first (``clip_grad_norm_``: a factor
    ``min(1, max_norm / (norm + 1e-6))``), then per parameter coupled L2 decay (SGD, Adam, RMSprop:
    ``g + wd * w``) or AdamW's decoupled ``w *= 1 - lr_i * wd_i`` with the parameter's own rate
    ``lr_i = lr * multiplier``, then the rule, Adam's bias correction on the parameter's own step count.

    Example:
        >>> rule = TorchRule(tl.optim.Adam(), ((1.0, 0.0), (0.5, 0.0)))          # doctest: +SKIP
        >>> state = rule.init(params, 1e-3)                                      # doctest: +SKIP
        >>> params, state = rule.update(grads, state, params, jnp.float32(1e-3))   # doctest: +SKIP
    """

    spec: OptimizerSpec
    rates: tuple[tuple[float, float], ...]
    clip_grad_norm: float | None = None

    def init(self, params: list, lr: Any) -> OptState:
        """Zero state and no steps for ``params``; ``lr``: the base rate their ``lr`` starts at."""
        return OptState(self._rates(jnp.asarray(lr, jnp.float32)), jnp.zeros((len(params),), jnp.int32),
                        {k: tuple(jnp.zeros_like(p) for p in params) for k in slot_names(self.spec)})

    def _rates(self, lr: jax.Array) -> jax.Array:
        """Each parameter's rate: the base rate ``lr`` times its multiplier (float32 constants)."""
        mults = np.array([m for m, _ in self.rates], np.float32)
        if np.all(mults == 1.0):
            return jnp.broadcast_to(lr, mults.shape)
        return lr * jnp.asarray(mults)

    def update(self, grads: list, state: OptState, params: list, lr: jax.Array) -> tuple[list, OptState]:
        """The new parameters and state after one step at base rate ``lr`` (a float32 scalar)."""
        spec, kind = self.spec, self.spec.kind
        if self.clip_grad_norm is not None and grads:
            coef = jnp.minimum(self.clip_grad_norm / (optax.tree.norm(grads) + 1e-6), 1.0)
            grads = [g * coef.astype(g.dtype) for g in grads]
        # every parameter's scalars (rate, decay factor, bias corrections on its own step count) are
        # computed together, as vectors, and each update only reads its entries: one small fusion for
        # all parameters instead of a few tiny kernels each (XLA keeps a division or a square root of a
        # scalar out of the elementwise update it feeds)
        rates, steps = self._rates(lr), state.steps + 1
        decays = np.array([wd for _, wd in self.rates], np.float32)
        if kind == "adamw" and decays.any():
            shrink = 1.0 - rates * jnp.asarray(decays)           # decoupled: w *= 1 - lr_i * wd_i
        if kind in ("adam", "adamw"):
            t = steps.astype(jnp.float32)
            step_size = rates / _one_minus_pow(spec.betas[0], t)        # torch: lr / bias_correction1
            inv_bias2_sqrt = jax.lax.rsqrt(_one_minus_pow(spec.betas[1], t))
        names = tuple(state.slots)
        new_params, slots = [], {k: [] for k in names}
        for i, (w, g, (_, wd)) in enumerate(zip(params, grads, self.rates)):
            old = {k: state.slots[k][i] for k in names}
            if kind == "adamw":
                w1 = w * shrink[i] if wd else w
            else:
                w1, g = w, (g + wd * w if wd else g)                    # coupled L2
            if kind in ("adam", "adamw"):
                new, w1 = self._adam(w1, g, old, step_size[i], inv_bias2_sqrt[i])
            elif kind == "sgd":
                new, w1 = self._sgd(w1, g, old, rates[i])
            else:
                new, w1 = self._rmsprop(w1, g, old, rates[i])
            new_params.append(w1.astype(w.dtype))
            for k in names:
                slots[k].append(new[k].astype(old[k].dtype))
        return new_params, OptState(rates, steps, {k: tuple(v) for k, v in slots.items()})

    def _sgd(self, w: jax.Array, g: jax.Array, slots: dict, lr: jax.Array) -> tuple[dict, jax.Array]:
        mom = self.spec.momentum
        if not mom:
            return slots, w - lr * g
        buf = mom * slots["momentum_buffer"] + g   # = torch's clone(g) on the first step (zero buffer)
        return {"momentum_buffer": buf}, w - lr * (g + mom * buf if self.spec.nesterov else buf)

    def _adam(self, w: jax.Array, g: jax.Array, slots: dict, step_size: jax.Array,
              inv_bias2_sqrt: jax.Array) -> tuple[dict, jax.Array]:
        beta1, beta2 = self.spec.betas
        m = slots["exp_avg"] + (1.0 - beta1) * (g - slots["exp_avg"])   # torch: exp_avg.lerp_(g, 1 - beta1)
        v = beta2 * slots["exp_avg_sq"] + (1.0 - beta2) * (g * g)
        denom = jnp.sqrt(v) * inv_bias2_sqrt + self.spec.eps     # torch: sqrt(v) / sqrt(bias_correction2)
        return {"exp_avg": m, "exp_avg_sq": v}, w - step_size * (m / denom)

    def _rmsprop(self, w: jax.Array, g: jax.Array, slots: dict, lr: jax.Array) -> tuple[dict, jax.Array]:
        spec, alpha, new = self.spec, self.spec.alpha, {}
        sq = new["square_avg"] = alpha * slots["square_avg"] + (1.0 - alpha) * (g * g)
        if spec.centered:
            ga = new["grad_avg"] = slots["grad_avg"] + (1.0 - alpha) * (g - slots["grad_avg"])   # torch: lerp_
            avg = jnp.sqrt(sq - ga * ga) + spec.eps
        else:
            avg = jnp.sqrt(sq) + spec.eps
        if spec.momentum:
            buf = new["momentum_buffer"] = spec.momentum * slots["momentum_buffer"] + g / avg
            return new, w - lr * buf
        return new, w - lr * (g / avg)


def build_optimizer(spec: OptimizerSpec, clip_grad_norm: float | None = None,
                    rates: tuple[tuple[float, float], ...] = ()) -> TorchRule:
    """The update rule of ``spec`` for the trainable parameters, one ``(lr multiplier, weight decay)``
    each (``rates``), after clipping the gradients' global norm to ``clip_grad_norm``.

    Example:
        >>> spec = tl.optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)                  # doctest: +SKIP
        >>> rule = build_optimizer(spec, clip_grad_norm=1.0, rates=((1.0, 1e-4),) * 4)    # doctest: +SKIP
    """
    slot_names(spec)  # an unknown kind is an error here
    return TorchRule(spec, tuple((float(m), float(wd)) for m, wd in rates), clip_grad_norm)


def weighted_loss(out: jax.Array, y: jax.Array, w: jax.Array | None, spec: LossSpec) -> jax.Array:
    """``spec``'s weighted mean loss with PyTorch's semantics (see ``tlcore.backend.Trainer.step``).

    The per-sample loss ``l`` is what torch's ``reduction="none"`` gives: ``F.cross_entropy`` with
    ``weight=`` and ``label_smoothing`` (``(1 - ε) * cw[y] * nll + ε / c * sum_j cw[j] * -log p_j``
    for integer labels; ``-sum_j cw[j] * q_j * log p_j`` with ``q = (1 - ε) * y + ε / c`` for class
    probabilities), ``binary_cross_entropy_with_logits`` with ``pos_weight``, ``mse_loss`` or
    ``huber_loss`` (the last three averaged over a sample's outputs); the mean is
    ``sum(w * l) / sum(w * d)`` with ``d = cw[y]`` for integer labels with class weights, else 1
    (``w = 1`` without sample weights: torch's ``reduction="mean"``). Class and positive weights are
    constants (the spec is static). Computed in ``out``'s dtype (the step passes float32).

    Example:
        >>> from tlcore.losses import CrossEntropy
        >>> z, y = jnp.zeros((2, 4)), jnp.array([0, 3])
        >>> round(float(weighted_loss(z, y, None, CrossEntropy(label_smoothing=0.1))), 6)   # log(4)
        1.386294
    """
    n = out.shape[0]
    d = None
    if spec.kind == "cross_entropy":
        logits = out.reshape(n, -1)
        c = logits.shape[1]
        cw = spec.class_weights(c)
        cw = None if cw is None else jnp.asarray(cw, logits.dtype)
        eps = spec.label_smoothing
        logp = jax.nn.log_softmax(logits, axis=1)
        if y.ndim == 1:                                   # torch's cross_entropy_loss_label_smoothing
            nll = -jnp.take_along_axis(logp, y[:, None].astype(jnp.int32), axis=1)[:, 0]
            if cw is not None:
                d = cw[y]
                nll = d * nll
            per = nll
            if eps:
                smooth = -(logp.sum(axis=1) if cw is None else (logp * cw).sum(axis=1))
                per = (1.0 - eps) * nll + (eps / c) * smooth
        else:                                             # torch's cross_entropy_loss_prob_target
            q = y.astype(logits.dtype)
            q = q * (1.0 - eps) + eps / c if eps else q
            per = -((q if cw is None else q * cw) * logp).sum(axis=1)
    else:
        z = out.reshape(y.shape)
        t = y.astype(z.dtype)
        if spec.kind == "binary_cross_entropy":
            pw = spec.pos_weights(z.reshape(n, -1).shape[1])
            softplus_neg = jax.nn.softplus(-z)            # -log(sigmoid(z)), stable for any z
            if pw is not None:                            # torch: log_weight = (pos_weight - 1) * t + 1
                softplus_neg = ((jnp.asarray(pw, z.dtype).reshape(z.shape[1:]) - 1.0) * t + 1.0) * softplus_neg
            elem = (1.0 - t) * z + softplus_neg
        elif spec.kind == "huber":
            delta = spec.delta
            diff = z - t
            a = jnp.abs(diff)
            elem = jnp.where(a < delta, 0.5 * diff * diff, delta * (a - 0.5 * delta))
        elif spec.kind == "mse":
            elem = jnp.square(z - t)
        else:
            raise ValueError(f"unknown loss kind {spec.kind!r}")
        per = elem.reshape(n, -1).mean(axis=1)
    if w is None and d is None:
        return per.mean()
    s = jnp.ones_like(per) if w is None else w.astype(per.dtype)
    return (s * per).sum() / (s.sum() if d is None else (s * d).sum())


@dataclass(frozen=True)
class StepConfig:
    """The static part of a training step besides the module's :class:`LeafSplit` (hashable):
    ``optimizer`` is the update rule alone (:func:`rule_of`), ``rates`` the per-parameter constants."""

    optimizer: OptimizerSpec
    loss: LossSpec
    clip_grad_norm: float | None
    frozen_bn: frozenset
    precision: str = "float32"
    #: ``(lr multiplier, weight decay)`` of each trainable parameter, in the step's order
    rates: tuple[tuple[float, float], ...] = ()
    #: ``TrainSpec.guard``: the step checks its loss and gradients (see :func:`_train_step`); a
    #: separate compilation, so that an unguarded step does not pay for the check
    guard: bool = True

    @property
    def rule(self) -> TorchRule:
        return build_optimizer(self.optimizer, self.clip_grad_norm, self.rates)


class FrozenBatchNormUpdated(TlcoreError, RuntimeError):
    """A frozen BatchNorm layer computed batch statistics during training (its caller overrides
    ``use_running_average``)."""


@dataclass(frozen=True)
class LeafSplit:
    """Where the three parts of a step sit among the leaves of a module's pytree, for one structure
    (``treedef``) and freeze partition.

    The step takes the module as leaves (flattening costs far less than ``nnx.split`` and
    ``nnx.update``: about 0.3 ms against 8 ms per ``fit`` for ResNet-18). Each part lists the leaf
    positions of its variables; a variable reached twice (tied weights) is listed once, and
    ``owner[i]`` says which listed variable leaf ``i`` holds, so both places share its value and its
    gradient sums both uses.
    """

    treedef: Any
    trainable: tuple[int, ...]
    mutable: tuple[int, ...]
    const: tuple[int, ...]
    owner: tuple[int, ...]            # leaf position -> index into trainable + mutable + const
    paths: tuple[Path, ...]           # native path of each listed variable, in that order

    def leaves(self, trainable: list, mutable: list, const: list) -> list:
        values = [*trainable, *mutable, *const]
        return [values[o] for o in self.owner]


def leaf_split(module: nnx.Module, treedef: Any, part: Partition) -> LeafSplit:
    """The :class:`LeafSplit` of ``module`` (whose pytree structure is ``treedef``) for ``part``."""
    variables = _variables(module)
    path_of = {id(v): tuple(p) for p, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)}
    if len(variables) != treedef.num_leaves:
        odd = [".".join(map(str, path_of[id(v)])) for v in variables if len(jax.tree.leaves(v.get_raw_value())) != 1]
        raise TlcoreError(f"the variables {odd} of {type(module).__name__} do not hold exactly one array each; "
                          "tlcore's JAX trainer needs one array per nnx.Variable (store None or a tuple as a "
                          "plain attribute, or one Variable per array)")
    first: dict[int, int] = {}
    for i, v in enumerate(variables):
        first.setdefault(id(v), i)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for i in first.values():
        path = path_of[id(variables[i])]
        parts[0 if path in part.trainable else 1 if path in part.mutable else 2].append(i)
    listed = [i for p in parts for i in p]
    index = {i: n for n, i in enumerate(listed)}
    owner = tuple(index[first[id(v)]] for v in variables)
    return LeafSplit(treedef, *map(tuple, parts), owner, tuple(path_of[id(variables[i])] for i in listed))


def _variables(module: nnx.Module) -> list[nnx.Variable]:
    """The module's variables in pytree leaf order (a tied variable once per place it is reached)."""
    return jax.tree.leaves(module, is_leaf=lambda v: isinstance(v, nnx.Variable))


class LossScale(NamedTuple):
    """float16's dynamic loss scale, with ``torch.amp.GradScaler``'s rule: the loss is multiplied by
    ``scale`` (from 2**16) before differentiation and the gradients divided by it; a step whose
    gradients are not finite is skipped (weights, optimizer state and BatchNorm statistics keep their
    values) and halves the scale (not below 1); 2000 finite steps in a row double it.

    Example:
        >>> s = LossScale.initial()
        >>> float(s.adjust(jnp.bool_(False)).scale)
        32768.0
    """

    scale: jax.Array          # float32
    good_steps: jax.Array     # int32: finite steps since the scale last changed

    @classmethod
    def initial(cls) -> LossScale:
        return cls(jnp.float32(2.0**16), jnp.int32(0))

    def adjust(self, finite: jax.Array) -> LossScale:
        """The scale after a step whose gradients were (not) ``finite``."""
        grow = finite & (self.good_steps + 1 >= LOSS_SCALE_GROWTH_INTERVAL)
        scale = jnp.where(finite, jnp.where(grow, self.scale * 2, self.scale), jnp.maximum(self.scale / 2, 1.0))
        return LossScale(scale.astype(jnp.float32), jnp.where(finite & ~grow, self.good_steps + 1, 0).astype(jnp.int32))


def set_compute_dtype(module: nnx.Module, dtype: Any) -> None:
    """Flax's convention for mixed precision: a layer's ``dtype`` attribute is the dtype it computes
    in (``param_dtype`` the one it stores). Set it on every submodule whose ``dtype`` is None or a
    float dtype (e.g. ``nnx.BatchNorm`` would otherwise promote to its float32 statistics); its
    statistics stay float32 (Flax computes them in at least float32). Called on the copy a compiled
    step builds, never on the user's module."""
    for _, sub in nnx.iter_modules(module):
        current = vars(sub).get("dtype", False)
        if current is None or (isinstance(current, (type, np.dtype)) and jnp.issubdtype(current, jnp.floating)):
            sub.dtype = dtype


def _as_dtype(value: jax.Array, dtype: Any) -> jax.Array:
    return value if value.dtype == dtype else value.astype(dtype)


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.array([jnp.isfinite(g).all() for g in jax.tree.leaves(tree)]))


#: the guard's flag (an int32 scalar carried from step to step): every step so far was finite
FLAG_OK = -1
#: the guard's flag when the loss was not finite; ``i + 1``: the gradient of trainable parameter ``i``
FLAG_LOSS = 0


def _guard_flag(flag: jax.Array, loss: jax.Array, grads: list | None) -> jax.Array:
    """The guard's flag after a step (see :data:`FLAG_OK`): ``flag`` when it was already set (sticky),
    else :data:`FLAG_LOSS` for a non-finite ``loss``, else ``i + 1`` for the first of ``grads`` (None:
    not checked) that is not finite, else :data:`FLAG_OK`. One reduction per gradient, to a bool
    vector whose first False is found on the device (a few scalars: no host sync)."""
    code = jnp.int32(FLAG_OK)
    if grads:
        finite = jnp.stack([jnp.isfinite(g).all() for g in grads])
        code = jnp.where(finite.all(), code, 1 + jnp.argmin(finite).astype(jnp.int32))
    code = jnp.where(jnp.isfinite(loss), code, jnp.int32(FLAG_LOSS))
    return jnp.where(flag == FLAG_OK, code, flag)


def _train_step(split: LeafSplit, cfg: StepConfig, traces: list[int], trainable: list, mutable: list,
                const: list, opt_state: OptState, scale: LossScale | None, flag: jax.Array | None, x: Inputs,
                y: jax.Array, w: jax.Array | None, lr: jax.Array):
    """One step (traced under ``jax.jit``): gradient of the weighted mean loss (:func:`weighted_loss`,
    sample weights ``w`` or None) with respect to ``trainable`` only, optimizer update of
    ``trainable`` at base learning rate ``lr`` (a float32 scalar), the new ``mutable`` state from the
    forward pass; returns ``(trainable, mutable, opt_state, scale, flag, outputs)``, the outputs
    (logits) of the forward pass in float32. ``const`` is never written. Under mixed precision the
    forward and backward pass compute in ``cfg.precision`` (``scale``: float16's :class:`LossScale`,
    else None).

    ``cfg.guard``: ``flag`` is the guard's int32 flag (:func:`_guard_flag`; None without the guard).
    A step that sets it, or that finds it set, keeps every value it was given (weights, optimizer
    state and counts, loss scale, and the whole ``mutable`` state: BatchNorm statistics, RNG counts);
    the rates in the state are the step's, as torch sets its param groups' lr first. Under float16
    only the loss is checked: an overflowing gradient is the loss scale's business (skipped, as
    below)."""
    traces[0] += 1  # runs once per trace, i.e. once per compilation
    tx = cfg.rule
    dtype = COMPUTE_DTYPES[cfg.precision]
    mixed = dtype != jnp.float32
    if mixed:  # mutable state (trainable BatchNorm statistics, RNG) is updated in its own dtype
        x, const = cast_floats(x, dtype), cast_floats(const, dtype)

    def loss_fn(params: list):
        # unflattened here: new Variables at this trace level, so that the forward pass may update them
        params = cast_floats(params, dtype) if mixed else params
        model = jax.tree.unflatten(split.treedef, split.leaves(params, mutable, const))
        set_modes(model, training=True, frozen_bn=cfg.frozen_bn)
        if mixed:
            set_compute_dtype(model, dtype)
        frozen_stats = [(p, v, v.get_raw_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
                        if tuple(p[:-1]) in cfg.frozen_bn]
        out = call(model, x)
        moved = [".".join(map(str, p)) for p, v, before in frozen_stats if v.get_raw_value() is not before]
        if moved:
            raise FrozenBatchNormUpdated(
                f"frozen BatchNorm statistics {moved} were updated in a training step: the model's __call__ "
                "passes use_running_average=False to a BatchNorm explicitly. Leave it unset (None) so that "
                "tlcore can run frozen BatchNorm layers on their moving statistics")
        leaves = jax.tree.leaves(model)
        # in their own dtype (a layer may write a statistic in the compute dtype), so steps never retrace
        new_mutable = [_as_dtype(leaves[i], old.dtype) for i, old in zip(split.mutable, mutable)]
        out = out.astype(jnp.float32)  # the loss in float32
        mean = weighted_loss(out, y, w, cfg.loss)
        return mean if scale is None else mean * scale.scale, (out, new_mutable, mean)

    grads, (out, new_mutable, mean) = jax.grad(loss_fn, has_aux=True)(trainable)
    if scale is not None:
        grads = jax.tree.map(lambda g: g / scale.scale, grads)
    new_trainable, new_opt_state = tx.update(grads, opt_state, trainable, lr)
    if cfg.guard:
        flag = _guard_flag(flag, mean, grads if scale is None else None)
        if scale is None:
            finite = flag == FLAG_OK
        else:  # the guard refuses the step, else the loss scale decides; neither changes the scale then
            finite_grads = _all_finite(grads)
            finite = (flag == FLAG_OK) & finite_grads
            scale = jax.tree.map(lambda n, o: jnp.where(flag == FLAG_OK, n, o), scale.adjust(finite_grads), scale)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        kept = keep(new_opt_state, opt_state)._replace(lr=new_opt_state.lr)
        if scale is None:  # refused: nothing the forward pass wrote is kept (RNG counts included)
            new_mutable = keep(new_mutable, mutable)
        else:  # refused: nothing kept; skipped by the loss scale: the float state (statistics) kept
            new_mutable = [jnp.where(flag == FLAG_OK, n, o) if not jnp.issubdtype(o.dtype, jnp.floating) else
                           jnp.where(finite, n, o) for n, o in zip(new_mutable, mutable)]
        return keep(new_trainable, trainable), new_mutable, kept, scale, flag, out
    if scale is None:
        return new_trainable, new_mutable, new_opt_state, None, None, out
    finite = _all_finite(grads)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_mutable = [keep(n, o) if jnp.issubdtype(o.dtype, jnp.floating) else n for n, o in zip(new_mutable, mutable)]
    # a skipped step keeps the weights, moments and step counts (as GradScaler skips optimizer.step());
    # the rates are the step's, as torch sets its param groups' lr before
    kept = keep(new_opt_state, opt_state)._replace(lr=new_opt_state.lr)
    return keep(new_trainable, trainable), new_mutable, kept, scale.adjust(finite), None, out


@dataclass
class CompiledStep:
    """A jitted step, how many times it was traced (= compiled) so far, and the jitted optimizer
    initialisation (one dispatch instead of one small eager op per parameter at every fit)."""

    fn: Callable
    traces: list[int]
    init: Callable


_STEPS: OrderedDict[tuple, CompiledStep] = OrderedDict()


def compiled_step(split: LeafSplit, cfg: StepConfig, plan: Any = None) -> CompiledStep:
    """The shared jitted step for a model structure, partition and configuration (the last 64 are kept).

    ``plan``: a data-parallel :class:`tlcore_jax.distributed.ShardingPlan` (hashable, part of the key),
    whose ``jit_step`` / ``jit_init`` compile the step with the batch sharded over its mesh and
    everything else replicated; None: one device."""
    key = (split, cfg, plan)
    if key in _STEPS:
        _STEPS.move_to_end(key)
        return _STEPS[key]
    traces = [0]
    fn = functools.partial(_train_step, split, cfg, traces)
    step = _STEPS[key] = (CompiledStep(jax.jit(fn), traces, jax.jit(cfg.rule.init)) if plan is None else
                          CompiledStep(plan.jit_step(fn), traces, plan.jit_init(cfg.rule.init)))
    while len(_STEPS) > _CACHE_SIZE:
        _STEPS.popitem(last=False)
    return step


def _infer(module: nnx.Module, x: Inputs, stop: str | None = None) -> jax.Array:
    """Inference-mode output of ``module`` on ``x``, or with ``stop`` the input of its top-level
    layer ``stop``, pooled (with the attention mask) when that layer is a head built by tlcore."""
    set_modes(module, training=False)  # on the copy jit unflattens, never on the caller's module
    if stop is None:
        return call(module, x)
    features = call(run_until(module, stop), x)
    head = top_layer(module, stop)
    return head.pool(features, attention_mask(x)) if isinstance(head, HeadModule) else features


#: inference-mode forward pass (up to the top-level layer ``stop`` when given), the module passed as
#: the leaves of its pytree: flattening costs far less than ``nnx.split``, and jit's cache is keyed on
#: the tree's structure (and on the batch's: an array, a dict or a tuple of arrays)
_infer_leaves = jax.jit(lambda leaves, x, treedef, stop: _infer(jax.tree.unflatten(treedef, leaves), x, stop),
                        static_argnames=("treedef", "stop"))


def infer_batches(module: nnx.Module, x: Inputs, batch_size: int, stop: str | None = None) -> np.ndarray:
    """The inference-mode forward pass over batches of ``x``, the module flattened once for all of
    them (flattening ResNet-18 costs about 0.6 ms, 3 % of a batch of 64 at 32x32)."""
    check_call(module, x)
    x = to_device(x)
    leaves, treedef = jax.tree.flatten(module)
    return np.concatenate([np.asarray(_infer_leaves(leaves, take(x, slice(i, i + batch_size)), treedef=treedef,
                                                    stop=stop))
                           for i in range(0, num_samples(x), batch_size)])


def clear_cache() -> None:
    """Forget every compiled training step and forward pass (the next use compiles again)."""
    _STEPS.clear()
    _infer_leaves.clear_cache()


def reseed(module: nnx.Module, streams: list[tuple[str, tuple]], seed: int, prefix: str = "") -> None:
    """Give every RNG stream a key derived from ``seed`` and its full tlcore name, and a zero count.

    The name includes ``prefix`` (the head's name when training a head on cached features), so a
    stream draws the same keys whether or not the layers before it run in the same step.
    """
    for name, path in streams:
        stream = _get(module, path)
        old = stream.key.get_value()
        key = jax.random.fold_in(jax.random.key(seed, impl=jax.random.key_impl(old)),
                                 zlib.crc32((prefix + name).encode()) & 0x7FFFFFFF)
        if old.shape != ():
            key = jax.random.split(key, old.shape)
        stream.key.set_value(key)
        stream.count.set_value(jnp.zeros(stream.count.get_value().shape, jnp.uint32))


def _get(node: Any, path: tuple) -> Any:
    for seg in path:
        node = node[seg] if isinstance(seg, int) or isinstance(node, (dict, list, tuple)) else getattr(node, seg)
    return node


class JaxTrainer(Trainer):
    """Training steps for one model, freeze partition and spec: the module flattened, its leaves
    stepped by the shared compiled function and written back to its variables by :meth:`finish`.

    Made not started: :meth:`reset` starts a run (zero optimizer state, reseeded RNG streams),
    :meth:`resume` continues one (the state kept, the module's current values read again);
    :meth:`import_state` / :meth:`export_state` carry the optimizer state to and from another trainer.
    A trainer stepped without either (outside the core) starts with ``reset(spec.seed)``.

    ``compilations`` counts the traces of the shared step during this trainer's steps since the last
    reset or resume: 1 for the first batch shape ever seen for this configuration, 0 when an earlier
    fit compiled it already. Learning rates never compile: the step takes the base rate as an argument.

    Example:
        >>> trainer = model._make_trainer(TrainSpec(tl.optim.SGD(lr=0.1)))   # doctest: +SKIP
        >>> trainer.reset(0); logits = trainer.step(x, y); trainer.finish()    # doctest: +SKIP
        >>> trainer.compilations, trainer.applied_lr()["head.out.weight"]      # doctest: +SKIP
        (1, 0.1)
    """

    #: :meth:`epoch` dispatches this many steps ahead of the outputs it copies to the host, so the
    #: device never waits for a copy (and at most this many batches of outputs wait on the device)
    PIPELINE_DEPTH = 2

    def __init__(self, model: JaxModel, spec: TrainSpec, part: Partition, cache: dict, plan: Any = None):
        self.module = model.native
        #: the data-parallel sharding plan of the step (see ``tlcore_jax.distributed``); None: one device
        self.plan = plan
        self.streams, self.rng_prefix = model.layout.rng_streams, model.rng_prefix
        self.spec = spec
        treedef = jax.tree.structure(self.module)
        # ``cache`` is this model's partition's: its leaf split by structure, compiled steps by
        # (structure, config), so a fit hashes no split
        if treedef not in cache:
            cache[treedef] = leaf_split(self.module, treedef, part)
        self.split = cache[treedef]
        name_of = {path: name for name, path in model.layout.path_of.items()}
        #: tlcore names of the trainable parameters, in the step's order
        self.names = [name_of[path] for path in self.split.paths[:len(self.split.trainable)]]
        self.cfg = StepConfig(rule_of(spec.optimizer), as_loss(spec.loss), spec.clip_grad_norm, part.frozen_bn,
                              spec.precision, param_rates(spec, self.names, model.rng_prefix), spec.guard)
        key = (treedef, self.cfg, plan)
        if key not in cache:
            cache[key] = compiled_step(self.split, self.cfg, plan)
        self.compiled = cache[key]
        self.schedule = spec.optimizer.schedule
        self.constant_lr = None if isinstance(spec.optimizer.lr, Schedule) else float(spec.optimizer.lr)
        self.trainable = self.mutable = self.const = None
        self.opt_state: OptState | None = None
        self.loss_scale: LossScale | None = None
        #: the guard's flag on the device (see :func:`_guard_flag`), carried from step to step; None
        #: without the guard. The host reads it when it copies a step's outputs (:attr:`nonfinite`)
        self.flag: jax.Array | None = None
        self.updates = 0   # steps applied since the last reset (the schedule's step when no lr is given)
        self.started, self._dirty = False, False
        #: flags of dispatched steps the host has not read yet (:meth:`_check_flags`)
        self._unread: list[jax.Array] = []

    # ------------------------------------------------------------------ runs
    def reset(self, seed: int) -> None:
        """Start a run from the module's current values: reseeded RNG streams, zero optimizer state
        (every step count at 0), the initial loss scale."""
        reseed(self.module, self.streams, seed, self.rng_prefix)
        self._read_module()
        self.updates = 0
        self.opt_state = self.compiled.init(self.trainable, np.float32(self._base_lr(None)))
        self.loss_scale = LossScale.initial() if self.cfg.precision == "float16" else None
        self._clear_flag()
        self.compilations = 0
        self.started = True

    def resume(self) -> None:
        """Continue a run: the module's current values read again (weights loaded since, RNG streams
        as :meth:`finish` left them), the optimizer state, step counts and loss scale kept (zero state
        for a trainer that never ran: :meth:`import_state` sets it)."""
        self._read_module()
        if self.opt_state is None:
            self.opt_state = self.compiled.init(self.trainable, np.float32(self._base_lr(None)))
        if self.cfg.precision == "float16" and self.loss_scale is None:
            self.loss_scale = LossScale.initial()
        self._clear_flag()
        self.compilations = 0
        self.started = True

    def _clear_flag(self) -> None:
        """No step refused (a new or continued run): :attr:`nonfinite` None, the device flag clear."""
        self.nonfinite, self._unread = None, []
        self.flag = jnp.int32(FLAG_OK) if self.cfg.guard else None

    def _read_module(self) -> None:
        leaves = jax.tree.leaves(self.module)
        self.trainable, self.mutable, self.const = ([leaves[i] for i in idx] for idx in
                                                    (self.split.trainable, self.split.mutable, self.split.const))
        self._dirty = False

    def _ensure_started(self) -> None:
        if not self.started:
            self.reset(self.spec.seed)

    def finish(self) -> None:
        self._check_flags(self._unread)  # steps dispatched but not read (an epoch interrupted)
        if self._dirty:
            variables = _variables(self.module)
            for i, value in zip((*self.split.trainable, *self.split.mutable), (*self.trainable, *self.mutable)):
                variables[i].set_value(self._module_value(value))
            self._dirty = False

    def _module_value(self, value: jax.Array) -> jax.Array:
        """What :meth:`finish` writes into the module's variable for a step's ``value``: the value."""
        return value

    # ------------------------------------------------------------------ optimizer state
    def export_state(self) -> dict:
        """``{"slots": {name: {slot: float32 array}}, "steps": {name: int}}`` of the trainable
        parameters; a parameter with no step yet has no slots (as ``torch.optim``'s empty state)."""
        if self.opt_state is None:
            return {"slots": {n: {} for n in self.names}, "steps": dict.fromkeys(self.names, 0)}
        steps, slots = jax.device_get((self.opt_state.steps, self.opt_state.slots))
        steps = [int(n) for n in steps]
        out: dict = {"slots": {}, "steps": {}}
        for i, name in enumerate(self.names):
            out["steps"][name] = steps[i]
            out["slots"][name] = {k: np.array(v[i], dtype=np.float32) for k, v in slots.items()} if steps[i] else {}
        return out

    def import_state(self, state: dict) -> None:
        """Set the state of the trainable parameters from ``state`` (as :meth:`export_state` gives it,
        from any backend); a parameter absent from it gets zero slots and no steps (just unfrozen)."""
        if not self.started:
            self.resume()
        given_slots, given_steps = state.get("slots", {}), state.get("steps", {})
        names = tuple(self.opt_state.slots)
        slots: dict[str, list] = {k: [] for k in names}
        steps = []
        for i, (name, p) in enumerate(zip(self.names, self.trainable)):
            given = given_slots.get(name)
            steps.append(0 if given is None else int(given_steps.get(name, 0)))
            for k in names:
                value = None if given is None else given.get(k)
                if value is None:
                    slots[k].append(jnp.zeros_like(self.opt_state.slots[k][i]))
                    continue
                value = np.asarray(value)
                if value.shape != tuple(p.shape):
                    raise TlcoreError(f"optimizer state {k!r} of {name!r} has shape {value.shape}, the tensor "
                                      f"{tuple(p.shape)}")
                slots[k].append(jnp.asarray(value, dtype=self.opt_state.slots[k][i].dtype))
        self.opt_state = OptState(self.opt_state.lr, jnp.asarray(np.array(steps, np.int32)),
                                  {k: tuple(v) for k, v in slots.items()})

    def applied_lr(self) -> dict[str, float]:
        """``{tensor name: learning rate}`` of the last step, read from the optimizer state."""
        if self.opt_state is None:
            return {}
        return {name: float(v) for name, v in zip(self.names, jax.device_get(self.opt_state.lr))}

    def optimizer_state_bytes(self) -> int:
        state = self.opt_state
        if state is None:  # not started: the state it would hold
            leaves = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in
                      (jax.tree.leaves(self.module)[i] for i in self.split.trainable)]
            state = jax.eval_shape(self.compiled.init, leaves, np.float32(0))
        return int(sum(np.dtype(leaf.dtype).itemsize * math.prod(leaf.shape) for leaf in jax.tree.leaves(state)))

    # ------------------------------------------------------------------ steps
    @property
    def trainable_paths(self) -> list[Path]:
        """Native paths of the variables the step differentiates and optimizes."""
        return list(self.split.paths[:len(self.split.trainable)])

    def _base_lr(self, lr: float | None) -> float:
        """The base rate of the next step: ``lr``, else the optimizer's constant rate or its schedule
        at the steps this trainer dispatched."""
        if lr is not None:
            return lr
        return self.constant_lr if self.constant_lr is not None else float(self.schedule.lr_at(self.updates))

    def step(self, x: Inputs, y: np.ndarray, w: np.ndarray | None = None, lr: float | None = None) -> np.ndarray:
        """Train on one batch at base rate ``lr``; return the logits of its training forward pass
        (float32 numpy)."""
        out = np.asarray(self.dispatch(x, y, w, lr))
        self._check_flags(self._unread)
        return out

    def dispatch(self, x: Inputs, y: np.ndarray, w: np.ndarray | None = None, lr: float | None = None) -> jax.Array:
        """:meth:`step` without waiting: the outputs stay on the device, on their way to the host."""
        self._ensure_started()
        check_call(self.module, x)
        out = self._dispatch(to_device(x), _labels(y), _weights(w), np.float32(self._base_lr(lr)))
        out.copy_to_host_async()
        return out

    def collect(self, handle: jax.Array) -> np.ndarray:
        out = np.asarray(handle)
        self._check_flags(self._unread[:1])  # this step's flag (none once a step was refused)
        return out

    def epoch(self, x: Inputs, y: np.ndarray, w: np.ndarray | None, batches: list,
              on_step: Callable[[int], Any] = lambda n: None, lrs: list[float] | None = None) -> list[np.ndarray]:
        """The core's epoch, on ``x``, ``y`` and ``w`` checked and converted for the device once, at the
        base rates ``lrs``; each step's outputs are copied to the host while later steps run (see
        :attr:`PIPELINE_DEPTH`)."""
        self._ensure_started()
        check_call(self.module, x)
        x, y, w = to_device(x), _labels(y), _weights(w)
        rates = None if lrs is None else np.asarray(lrs, dtype=np.float32)
        outs: list[np.ndarray] = []
        pending: deque[jax.Array] = deque()
        self._check_flags(self._unread)
        for i, b in enumerate(batches):
            if self.nonfinite is not None and i:  # a step was refused (see below): stop dispatching
                break
            lr = np.float32(self._base_lr(None)) if rates is None else rates[i]
            out = self._dispatch(take(x, b), y[b], None if w is None else w[b], lr)
            out.copy_to_host_async()
            pending.append(out)
            on_step(1)
            if len(pending) > self.PIPELINE_DEPTH:
                outs.append(np.asarray(pending.popleft()))
                self._check_flags(self._unread[:1])
        while pending and not (self.nonfinite is not None and outs):
            outs.append(np.asarray(pending.popleft()))
            self._check_flags(self._unread[:1])
        # the steps dispatched after the refused one changed nothing (the flag is sticky on the device)
        self._check_flags(self._unread)
        return outs

    def _check_flags(self, flags: list[jax.Array]) -> None:
        """Read the flags of the oldest dispatched steps (``flags``, the start of ``_unread``, already
        on their way to the host); at the first that is set, name the tensor in :attr:`nonfinite` and
        uncount it and every step dispatched after it from :attr:`updates` (they changed nothing)."""
        for flag in list(flags):
            self._unread.pop(0)
            if self.nonfinite is None and int(flag) != FLAG_OK:
                code = int(flag)
                self.nonfinite = "loss" if code == FLAG_LOSS else self.names[code - 1]
                self.updates -= 1 + len(self._unread)
                self._unread = []
                return

    def _dispatch(self, x: Inputs, y: np.ndarray, w: np.ndarray | None, lr: np.float32) -> jax.Array:
        """Run the compiled step on a converted batch; its outputs stay on the device."""
        before = self.compiled.traces[0]
        self.trainable, self.mutable, self.opt_state, self.loss_scale, self.flag, out = self.compiled.fn(
            self.trainable, self.mutable, self.const, self.opt_state, self.loss_scale, self.flag, x, y, w, lr)
        self.compilations += self.compiled.traces[0] - before
        self._dirty = True
        if self.flag is not None:
            if self.nonfinite is not None:  # refused on the device too (sticky): not counted, nothing to read
                return out
            self.flag.copy_to_host_async()
            self._unread.append(self.flag)
        self.updates += 1
        return out

    def _args(self, x: Inputs, y: np.ndarray, w: np.ndarray | None = None) -> tuple:
        self._ensure_started()
        check_call(self.module, x)
        return (self.trainable, self.mutable, self.const, self.opt_state, self.loss_scale, self.flag,
                to_device(x), _labels(y), _weights(w), np.float32(self._base_lr(None)))

    def jaxpr(self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> jax.extend.core.ClosedJaxpr:
        """The step's jaxpr for one batch, traced afresh (not counted as a compilation); to inspect
        what a step computes, e.g. that no gradient is taken for a frozen tensor."""
        fn = functools.partial(_train_step, self.split, self.cfg, [0])
        return jax.make_jaxpr(fn)(*self._args(x, y, w))

    def compiled_text(self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> str:
        """The optimized HLO that XLA runs for one batch of this shape (compiled on demand; for
        inspection, e.g. counting the convolutions a frozen step really runs)."""
        return self.compiled.fn.lower(*self._args(x, y, w)).compile().as_text()


def param_rates(spec: TrainSpec, names: list[str], prefix: str = "") -> tuple[tuple[float, float], ...]:
    """``(lr multiplier, weight decay)`` of each of ``names`` from ``spec.rates()``, (1, the optimizer's
    weight decay) for a name it does not list. ``prefix``: the module's name inside the model the
    plan was made for (a head trained on cached features: ``"head."``), tried first."""
    rates, default = spec.rates(), (1.0, float(spec.optimizer.weight_decay))
    out = []
    for name in names:
        m, wd = rates.get(prefix + name if prefix and prefix + name in rates else name, default)
        out.append((float(m), float(wd)))
    return tuple(out)


def _labels(y: np.ndarray) -> np.ndarray:
    """Targets for the device: int64 labels as int32 (JAX's default integers; the core checked their
    range against the head), class probabilities and values as float32."""
    y = np.asarray(y)
    if y.dtype == np.int64:
        return y.astype(np.int32)
    return y if y.dtype.kind in "iu" or y.dtype == np.float32 else y.astype(np.float32)


def _weights(w: np.ndarray | None) -> np.ndarray | None:
    """Sample weights as float32 (the core gives float64 or float32), or None."""
    return None if w is None else np.asarray(w, dtype=np.float32)
