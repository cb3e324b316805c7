"""The Keras training step: ``tlcore.optim`` specs as Keras optimizers with PyTorch's exact update
rules, ``tlcore.losses`` specs with PyTorch's exact formulas (:func:`weighted_loss`), and a compiled
``tf.function`` step per trainable set that returns the outputs of its forward pass.

Optimizers. Keras' built-in optimizers differ from the rules in ``tlcore/optim.py`` (Adam adds
``epsilon`` to ``sqrt(v)`` before bias correction, RMSprop adds it inside the square root, and their
``weight_decay`` is always decoupled), so each spec becomes a small ``keras.optimizers.Optimizer``
subclass that implements ``update_step`` with PyTorch's formulas: coupled L2 (``g + wd * w``) for
SGD, Adam and RMSprop, decoupled decay (``w *= 1 - lr * wd``) for AdamW, and global-norm clipping
of the trainable gradients before the update (``g *= min(1, max_norm / (norm + 1e-6))``). The
optimizer is built on the trainable variables only, so frozen ones get no state and no decay.
SGD (without Nesterov) runs its rule as TensorFlow's fused ``ResourceApplyMomentum`` /
``ResourceApplyGradientDescent`` kernels, which compute the same operations in the same order (same
values, one op per variable instead of ~10: resnet18 full fine-tuning was ~2 ms a step slower than
Keras' own SGD before).

Rates and state, as PyTorch's param groups. The core passes each step's base rate (from the
optimizer's schedule) as a float32 argument of the compiled step, which assigns it to the optimizer's
``learning_rate`` inside the graph (no eager assign per step); each variable's ``(lr multiplier,
weight decay)`` (``TrainSpec.rates()``, a ``LayerDecay``/``Discriminative`` plan and ``no_decay``) are
constants of the step. AdamW's decoupled decay uses the variable's own rate. Step counts are per
variable (Keras' ``iterations`` plus a per-variable offset), so a variable unfrozen mid-run gets
Adam's bias corrections from its own first step, as a new PyTorch param group. The state leaves and
enters a trainer framework-neutral (``export_state``/``import_state``: PyTorch's slot names, the
tensors' ``state()`` layouts, a canonical model's kernels transposed like its weights).

Which step. Measured with ``benchmarks/keras_step.py`` on this machine (2 CPU cores, TensorFlow
2.21, Keras 3.15), median ms per step over 7 interleaved repeats, first call (trace/compile) in
brackets; full results in ``benchmarks/results/keras_step.json``:

==========================================  ============  ==============  =============  ============
workload (mode)                             Keras fit     train_on_batch  tf.function    + XLA
==========================================  ============  ==============  =============  ============
reference + MLP head, 8x8x3, b16 (full)     6.73 (1.7 s)  3.35 (1.1 s)    2.96 (0.6 s)   2.11 (2.3 s)
reference + MLP head, 8x8x3, b16 (frozen)   2.81 (0.7 s)  2.18 (0.5 s)    1.59 (0.2 s)   1.22 (1.1 s)
small CNN 32-64-128-256, 32x32x3, b64 full  65.1 (2.0 s)  56.0 (1.3 s)    55.1 (0.6 s)   78.4 (2.6 s)
small CNN, frozen backbone                  20.8 (0.6 s)  14.1 (0.4 s)    13.0 (0.2 s)   13.4 (0.7 s)
==========================================  ============  ==============  =============  ============

``fit`` with ``jit_compile=True`` was no better (3.57, 2.72, 88.4, 21.3 ms). So the step is a
``tf.function`` without XLA (tlcore's own step measured 2.95, 1.65, 56.8, 13.5 ms: the same path).
XLA only wins on the tiny reference net, by under 1 ms a step, after 2 s more compilation (about
2000 steps to break even, and XLA compiles again for a shorter last batch); on the realistic CNN it
is 42% slower with full fine-tuning. ``autograph=False``: the step has no Python control flow on
tensors, and tracing is quicker without the conversion.

Inputs and precision. The step takes a batch as the model is called (one array, a list of its
inputs in order, or a dict; ``inputs.py``), traced once per structure of per-sample shapes and
dtypes. ``precision="bfloat16"``/``"float16"`` traces it with Keras' mixed dtype policies on the
model's layers (:func:`mixed_precision`: 16-bit computation on the float32 variables, which stay the
master weights; the loss in float32), restored right after tracing, so predictions stay float32;
float16 adds Keras' dynamic loss scaling (``LossScaleOptimizer``: a step whose gradients overflow is
skipped and the scale halved). An operation with no 16-bit version raises
:class:`PrecisionNotSupportedError` before anything is trained.

The non-finite guard (``TrainSpec.guard``; without it, the step is traced without the check) is
part of the compiled steps: one sum per gradient and the loss give an int32 flag
(:func:`guard_flag`), kept in a variable by :class:`KerasTrainer` (the update runs under ``tf.cond``;
a refused step assigns back what its forward pass wrote) and carried through the graph loop by
:class:`SharedStepTrainer` (``tf.where`` keeps every value).

A compiled step belongs to one trainable set: ``KerasModel`` reuses it across fits only while the
policy and the optimizer spec are unchanged, and builds a new one as soon as what trains changes, so
changing ``trainable`` after compiling (the stale-compile pitfall, keras#6405) cannot happen.

Shared across models. The whole-model step captures no variable: every one it reads or writes (the
model's, the optimizer's, the guard's flag) is an argument of its concrete function, so one trace
serves every model with the same structure (:func:`shared.step_structure`: layers and wiring,
``trainable`` flags, dtype policies, variable shapes), trainable set, spec (:func:`shared_step_key`:
the rates are constants, the base rate an argument) and batch structure; the process keeps the last
:data:`MAX_STEPS`. A new model of a structure seen before (the next stage of an ``UnfreezeSchedule``
on a second model, a sweep over seeds) compiles nothing, as on JAX, and computes exactly what its own
trace would (the same graph). A trace that captured a variable anyway (one outside the model's
list) stays its model's own. The step is called with its inputs already flat (``_keras.call_flat``):
the batch as tensors, the variables as their handles.

Example:
    >>> trainer = KerasTrainer(model, trainable_tensors, rng_vars, TrainSpec(tl.optim.Adam(lr=1e-3)))  # doctest: +SKIP
    >>> trainer.reset(seed=0)                                                                         # doctest: +SKIP
    >>> logits = trainer.step(x_batch, y_batch, sample_weight_batch, lr=1e-3)                         # doctest: +SKIP
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np

from tlcore.backend import Trainer
from tlcore.losses import LossSpec
from tlcore.optim import OptimizerSpec, TrainSpec

from . import PrecisionNotSupportedError
from ._keras import (InputLayer, call_flat, flatten_layers, in_stateless_scope, keras, own_variables, tf,
                     variable_index)
from .inputs import signature as signature_of
from .inputs import structure_key
from .shared import shared, step_structure

ops = keras.ops

#: compile the step with XLA (``jit_compile=True``); chosen by measurement, see the table above
JIT_COMPILE = False


def dense(grads: list) -> list:
    """Gradients as dense tensors: an ``Embedding`` (a ``tf.gather``) yields ``IndexedSlices``, which
    PyTorch's rules (``nn.Embedding(sparse=False)``) treat as a dense gradient that is zero on the rows
    not looked up, so moments and decay reach every row."""
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]


def clip_by_global_norm(grads: list, max_norm: float) -> list:
    """PyTorch's ``clip_grad_norm_``: scale every gradient by ``min(1, max_norm / (norm + 1e-6))``."""
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in present]))
    coef = tf.minimum(max_norm / (norm + 1e-6), 1.0)
    return [None if g is None else g * tf.cast(coef, g.dtype) for g in grads]


class Rate(NamedTuple):
    """What the update of one variable uses this step (tensors of the step, float32): its learning rate
    ``lr`` (the base rate times its multiplier), its weight decay ``wd`` (a constant), and for Adam
    the step size ``lr / (1 - beta1 ** step)``, ``sqrt(1 - beta2 ** step)`` and AdamW's decoupled
    factor ``1 - lr * wd``, computed in float64 from the variable's own step count, as PyTorch computes
    them in Python floats."""

    lr: Any
    wd: float
    step_size: Any = None
    bias2_sqrt: Any = None
    decay: Any = None


class TorchRuleOptimizer(keras.optimizers.Optimizer):
    """Base of the optimizers below: a ``tlcore.optim`` spec on Keras' optimizer machinery.

    Each subclass defines its update as a pure function, :meth:`rule`, which ``update_step`` (the
    stateful Keras path) and :class:`SharedStepTrainer` (a step that takes and returns values) share.
    ``clip_grad_norm`` clips the global norm of the gradients passed to ``apply`` first.

    Rates, as PyTorch's param groups: ``rates`` gives each variable (in the order the optimizer is
    built on) its ``(lr multiplier, weight decay)`` (default: ``(1, spec.weight_decay)``); they are
    constants of the traced step. The base rate is Keras' ``learning_rate`` variable (the trainer
    assigns each step's rate to it inside its compiled step); each step computes the rate of every
    multiplier group from it, in float64, and keeps it in :attr:`group_lr` (what :meth:`applied_lr`
    reads). Step counts are per variable, as PyTorch's per-parameter ``step``: Keras' ``iterations``
    plus the variable's ``step_offsets`` entry (set when optimizer state is imported: a variable
    unfrozen mid-run starts at 0 while the others go on).
    """

    def __init__(self, spec: OptimizerSpec, clip_grad_norm: float | None = None,
                 rates: list[tuple[float, float]] | None = None, name: str | None = None):
        super().__init__(learning_rate=float(spec.schedule.lr_at(0)), name=name or f"tlcore_{spec.kind}")
        self.spec = spec
        self.clip_grad_norm = clip_grad_norm
        if rates is not None:
            self._set_rates(rates)

    def _set_rates(self, rates) -> None:
        rates = tuple((float(m), float(wd)) for m, wd in rates)
        multipliers = tuple(dict.fromkeys(m for m, _ in rates)) or (1.0,)
        self.__dict__.update(  # plain attributes (not tracked by Keras)
            rates=rates, multipliers=multipliers, group_of=tuple(multipliers.index(m) for m, _ in rates))

    def slot_names(self) -> tuple[str, ...]:
        """Names of the per-variable state tensors (zeros at the start): PyTorch's."""
        return ()

    def rule(self, w, g, slots: dict, rate: Rate) -> tuple:
        """``(new w, {slot: new value})`` from weight ``w``, gradient ``g``, ``slots`` and the variable's
        :class:`Rate`; pure (tensors in, tensors out)."""
        raise NotImplementedError

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        if "rates" not in self.__dict__:
            self._set_rates([(1.0, self.spec.weight_decay)] * len(var_list))
        if len(self.rates) != len(var_list):
            raise ValueError(f"{len(self.rates)} rates for {len(var_list)} variables")
        self._state = {name: self.add_optimizer_variables(var_list, name) for name in self.slot_names()}
        self.step_offsets = self.add_variable((len(var_list),), dtype="int64", name="step_offsets")
        with tf.init_scope():
            lr0 = float(self.spec.schedule.lr_at(0))
            self.__dict__["group_lr"] = tf.Variable(np.asarray(self.multipliers) * lr0, dtype=tf.float64,
                                                    trainable=False, name="group_lr")

    #: whether :meth:`rule` uses the step count (Adam's bias corrections)
    uses_step = False
    #: whether every variable has the same step count: a step traced so computes its step-dependent
    #: terms once for all (set by the trainer before it traces; see :meth:`rates_of`)
    same_steps = True

    def rates_of(self, learning_rate, iterations, offsets, same_steps: bool = True) -> tuple:
        """``(group rates, [Rate per variable])`` for the base rate ``learning_rate`` (float32) and the
        step counts ``iterations + offsets`` before this step; the group rates are float64 (one per
        multiplier), what :meth:`applied_lr` reports. Pure.

        Computed once per step for all variables: per multiplier group (and decay) when every variable
        has the same step count (``same_steps``: the usual case; the offsets are then all 0 and not
        read), else with one vector operation per term over all variables (after a variable was
        unfrozen mid-run). A multiplier of 1 uses the float32 rate as it is."""
        lr32 = tf.cast(ops.convert_to_tensor(learning_rate), tf.float32)
        base = tf.cast(lr32, tf.float64)
        group = tf.reshape(base, (1,)) if self.multipliers == (1.0,) else \
            base * tf.constant(self.multipliers, tf.float64)
        by_group = [base if m == 1.0 else base * m for m in self.multipliers]
        lrs = [lr32 if m == 1.0 else tf.cast(by_group[g], tf.float32) for g, m in enumerate(self.multipliers)]
        n, wds = len(self.rates), [wd for _, wd in self.rates]
        decoupled = getattr(self, "decoupled", False)
        if not self.uses_step:
            return group, [Rate(lrs[g], wd) for g, wd in zip(self.group_of, wds)]
        b1, b2 = (tf.constant(b, tf.float64) for b in self.spec.betas)
        iterations = ops.convert_to_tensor(iterations)
        if same_steps:
            step = tf.cast(iterations + 1, tf.float64)
            bias1, bias2_sqrt = 1.0 - tf.pow(b1, step), tf.cast(tf.sqrt(1.0 - tf.pow(b2, step)), tf.float32)
            sizes = [tf.cast(lr / bias1, tf.float32) for lr in by_group]
            decays = {(g, wd): tf.cast(1.0 - by_group[g] * wd, tf.float32)
                      for g, wd in dict.fromkeys(zip(self.group_of, wds)) if decoupled and wd}
            return group, [Rate(lrs[g], wd, sizes[g], bias2_sqrt, decays.get((g, wd)))
                           for g, wd in zip(self.group_of, wds)]
        per_var = tf.gather(group, self.group_of)
        steps = tf.cast(iterations + 1 + ops.convert_to_tensor(offsets), tf.float64)
        bias1, bias2_sqrt = 1.0 - tf.pow(b1, steps), tf.sqrt(1.0 - tf.pow(b2, steps))
        sizes = tf.unstack(tf.cast(per_var / bias1, tf.float32), num=n)
        bias2_sqrt = tf.unstack(tf.cast(bias2_sqrt, tf.float32), num=n)
        decays = tf.unstack(tf.cast(1.0 - per_var * tf.constant(wds, tf.float64), tf.float32), num=n) \
            if decoupled and any(wds) else [None] * n
        return group, [Rate(lrs[g], wd, s, b, d)
                       for g, wd, s, b, d in zip(self.group_of, wds, sizes, bias2_sqrt, decays)]

    def apply(self, grads, trainable_variables=None):
        grads = dense(list(grads))
        if self.clip_grad_norm is not None:
            grads = clip_by_global_norm(list(grads), self.clip_grad_norm)
        self.__dict__["_per_apply"] = {}  # tensors made once per apply, see _once (untracked attribute)
        return super().apply(grads, trainable_variables)

    def _once(self, key, make):
        """``make()``, made once per :meth:`apply` (traced graph) and shared by all its variables."""
        cache = self.__dict__.setdefault("_per_apply", {})
        key = (tf.compat.v1.get_default_graph(), key)  # never reuse a tensor of another graph
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _rate(self, index: int, learning_rate) -> Rate:
        """The :class:`Rate` of variable ``index`` this step (all variables' made at the first one)."""
        def make():
            group, rates = self.rates_of(learning_rate, self.iterations, self.step_offsets, self.same_steps)
            self.group_lr.assign(group)  # what applied_lr reads: the rates this step computed
            return rates
        return self._once("rates", make)[index]

    def update_step(self, gradient, variable, learning_rate):
        index = variable_index(self, variable)
        slots = {name: self._state[name][index] for name in self.slot_names()}
        new_w, new_slots = self.rule(ops.convert_to_tensor(variable), ops.cast(gradient, variable.dtype),
                                     {n: ops.convert_to_tensor(v) for n, v in slots.items()},
                                     self._rate(index, learning_rate))
        for name, value in new_slots.items():
            self.assign(slots[name], value)
        self.assign(variable, new_w)

    @staticmethod
    def _l2(g, w, wd: float):
        """Coupled L2 regularisation: ``g + weight_decay * w``."""
        return g + wd * w if wd else g


def _like(t, w):
    """``t`` in ``w``'s dtype (no operation when it already is)."""
    return tf.cast(t, w.dtype)


class SGD(TorchRuleOptimizer):
    """``torch.optim.SGD``: ``buf = momentum * buf + g``; ``w -= lr * (g + momentum * buf)`` with
    Nesterov, ``w -= lr * buf`` without (dampening 0)."""

    def slot_names(self):
        return ("momentum_buffer",) if self.spec.momentum else ()

    def update_step(self, gradient, variable, learning_rate):
        """The rule of :meth:`rule` as one fused TensorFlow kernel per variable (``ResourceApplyMomentum``
        computes ``accum = accum * momentum + grad; var -= accum * lr``, ``ResourceApplyGradientDescent``
        ``var -= grad * lr``: the same operations in the same order, so the same values) instead of
        ~10 small ops each; Nesterov keeps the generic path."""
        if self.spec.nesterov or in_stateless_scope():  # (the fused kernels write the variables directly)
            return super().update_step(gradient, variable, learning_rate)
        var = variable.value if isinstance(variable, keras.Variable) else variable
        dtype = var.dtype
        index = variable_index(self, variable)
        rate = self._rate(index, learning_rate)
        g = self._l2(tf.cast(gradient, dtype), var.read_value() if rate.wd else None, rate.wd)
        lr = tf.cast(rate.lr, dtype)
        if self.spec.momentum:
            mu = self._once(("momentum", dtype), lambda: tf.constant(self.spec.momentum, dtype))
            buf = self._state["momentum_buffer"][index].value
            tf.raw_ops.ResourceApplyMomentum(var=var.handle, accum=buf.handle, lr=lr, grad=g, momentum=mu)
        else:
            tf.raw_ops.ResourceApplyGradientDescent(var=var.handle, alpha=lr, delta=g)

    def rule(self, w, g, slots, rate):
        g, mu, lr = self._l2(g, w, rate.wd), self.spec.momentum, _like(rate.lr, w)
        if not mu:
            return w - lr * g, {}
        buf = mu * slots["momentum_buffer"] + g
        g = g + mu * buf if self.spec.nesterov else buf
        return w - lr * g, {"momentum_buffer": buf}


class Adam(TorchRuleOptimizer):
    """``torch.optim.Adam`` (``eps`` added to ``sqrt(v_hat)``; ``weight_decay`` is coupled L2), with
    the bias corrections of each variable's own step count."""

    decoupled = False
    uses_step = True

    def slot_names(self):
        return ("exp_avg", "exp_avg_sq")

    def rule(self, w, g, slots, rate):
        if not self.decoupled:
            g = self._l2(g, w, rate.wd)
        elif rate.wd:
            w = w * _like(rate.decay, w)
        b1, b2 = self.spec.betas
        m = slots["exp_avg"] + (g - slots["exp_avg"]) * (1.0 - b1)
        v = slots["exp_avg_sq"] * b2 + (1.0 - b2) * g * g
        denom = ops.sqrt(v) / _like(rate.bias2_sqrt, w) + self.spec.eps
        return w - _like(rate.step_size, w) * m / denom, {"exp_avg": m, "exp_avg_sq": v}


class AdamW(Adam):
    """``torch.optim.AdamW``: ``w *= 1 - lr * weight_decay`` (decoupled, at the variable's own rate),
    then Adam's update."""

    decoupled = True


class RMSprop(TorchRuleOptimizer):
    """``torch.optim.RMSprop`` (``eps`` added outside the square root; coupled L2 decay)."""

    def slot_names(self):
        return ("square_avg",) + (("grad_avg",) if self.spec.centered else ()) + \
            (("momentum_buffer",) if self.spec.momentum else ())

    def rule(self, w, g, slots, rate):
        g, alpha, lr = self._l2(g, w, rate.wd), self.spec.alpha, _like(rate.lr, w)
        new = {"square_avg": slots["square_avg"] * alpha + (1.0 - alpha) * g * g}
        if self.spec.centered:
            new["grad_avg"] = slots["grad_avg"] + (g - slots["grad_avg"]) * (1.0 - alpha)
            avg = ops.sqrt(new["square_avg"] - new["grad_avg"] * new["grad_avg"])
        else:
            avg = ops.sqrt(new["square_avg"])
        avg = avg + self.spec.eps
        if self.spec.momentum:
            new["momentum_buffer"] = slots["momentum_buffer"] * self.spec.momentum + g / avg
            return w - lr * new["momentum_buffer"], new
        return w - lr * g / avg, new


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}


def build_optimizer(spec: OptimizerSpec, clip_grad_norm: float | None = None,
                    rates: list[tuple[float, float]] | None = None) -> TorchRuleOptimizer:
    """The Keras optimizer for ``spec`` (not built yet: ``build`` it on the trainable variables), with
    ``rates[i]`` = ``(lr multiplier, weight decay)`` of the i-th variable it will be built on."""
    if spec.kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer kind {spec.kind!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[spec.kind](spec, clip_grad_norm, rates)


def param_rates(spec: TrainSpec, names: list[str], prefix: str = "") -> list[tuple[float, float]]:
    """``(lr multiplier, weight decay)`` of each tensor of ``names`` as ``spec.rates()`` gives them (by
    ``prefix + name`` first: a head trained alone looks its tensors up under their names in the whole
    model), ``(1, the optimizer's weight decay)`` where it names none."""
    rates, default = spec.rates(), (1.0, float(spec.optimizer.weight_decay))
    out = []
    for name in names:
        rate = rates.get(prefix + name) if prefix and prefix + name in rates else rates.get(name, default)
        out.append((float(rate[0]), float(rate[1])))
    return out


def _constant(values: np.ndarray | None):
    """A float32 constant of the traced step (class or positive weights are part of the loss spec)."""
    return None if values is None else tf.constant(values, tf.float32)


def _static_width(out) -> int | None:
    """The number of outputs per sample of ``out`` where known when the step is traced, else None."""
    dims = out.shape[1:]
    return None if None in dims else int(np.prod(dims, dtype=np.int64))


def per_sample_loss(out, y, spec: LossSpec) -> tuple:
    """``(l, d)``: ``spec``'s per-sample losses ``l`` (n,) as PyTorch's ``reduction="none"`` gives them
    (the mean over a sample's outputs for binary cross entropy, MSE and Huber) and the denominator
    weights ``d`` (n,), or None where every ``d_i`` is 1 (see ``tlcore.backend.Trainer.step``).

    Keras' own losses are not used: its sparse cross entropy has no label smoothing, its ``class_weight``
    is a sample weight on a sample's whole (smoothed) loss and its mean divides by the batch size, where
    PyTorch weighs each class's term and divides by the labels' summed class weights; and it has no
    ``pos_weight``. The formulas are PyTorch's (``cross_entropy_loss_label_smoothing``,
    ``cross_entropy_loss_prob_target``, ``binary_cross_entropy_with_logits``, ``huber_loss``)."""
    n = tf.shape(out)[0]
    if spec.kind == "cross_entropy":
        width = _static_width(out)
        if width is None and spec.class_weight is not None:
            raise ValueError(f"class weights need the number of classes, but the model's output shape "
                             f"{tuple(out.shape)} is not known when the step is traced")
        logits = tf.reshape(out, (n, -1 if width is None else width))
        c = width if width is not None else tf.shape(logits)[1]
        cw = None if width is None else _constant(spec.class_weights(width))
        eps = spec.label_smoothing
        eps_c = eps / (c if width is not None else tf.cast(c, tf.float32)) if eps else 0.0  # torch's ε / c
        if y.dtype.is_integer:
            if not eps:  # the fused op: softmax - one_hot is the exact gradient of a one-hot target
                nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
                if cw is None:
                    return nll, None
                d = tf.gather(cw, y)
                return d * nll, d
            # torch: (1 - ε) * nll(weight) + ε / c * (-sum_k weight_k * log p_k)
            target = tf.one_hot(y, c, on_value=1.0 - eps + eps_c, off_value=eps_c, dtype=tf.float32)
            d = None
            if cw is not None:
                target, d = target * cw, tf.gather(cw, y)
        else:  # class probabilities: torch smooths them, weighs each class, and divides by n
            target = tf.cast(y, tf.float32)
            if eps:
                target = target * (1.0 - eps) + eps_c
            if cw is not None:
                target = target * cw
            d = None
        # not softmax_cross_entropy_with_logits: its gradient (softmax - target) assumes rows summing
        # to 1, which weighted (or slightly off) targets do not
        return -tf.reduce_sum(target * tf.nn.log_softmax(logits), axis=1), d
    z = tf.reshape(out, tf.shape(y))
    if spec.kind == "binary_cross_entropy":
        pw = _constant(spec.pos_weights(y.shape[1]))
        if pw is None:
            elem = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=z)
        else:  # (1 - t) * x + ((pw - 1) * t + 1) * softplus(-x): torch's formula
            elem = tf.nn.weighted_cross_entropy_with_logits(labels=y, logits=z, pos_weight=pw)
    elif spec.kind == "huber":
        diff = z - y
        a = tf.abs(diff)
        elem = tf.where(a < spec.delta, 0.5 * diff * diff, spec.delta * (a - 0.5 * spec.delta))
    elif spec.kind == "mse":
        elem = tf.square(z - y)
    else:
        raise ValueError(f"unknown loss kind {spec.kind!r}")
    return tf.reduce_mean(tf.reshape(elem, (n, -1)), axis=1), None


def weighted_loss(out, y, w, spec: LossSpec):
    """``spec``'s weighted mean loss in float32: ``sum_i w_i * l_i / sum_i w_i * d_i``, i.e. PyTorch's
    ``reduction="mean"`` without sample weights ``w`` (see ``tlcore.backend.Trainer.step``). Weights
    summing to 0 give NaN, as in PyTorch."""
    per, d = per_sample_loss(tf.cast(out, tf.float32), y, spec)
    if w is None and d is None:
        return tf.reduce_mean(per)
    if w is None:
        return tf.reduce_sum(per) / tf.reduce_sum(d)
    w = tf.cast(w, tf.float32)
    return tf.reduce_sum(w * per) / tf.reduce_sum(w if d is None else w * d)


def seed_rngs(rng_vars: list[tuple[str, object]], seed: int) -> None:
    """Reset every random-seed state from ``seed`` and its key (the tensor name), like
    ``torch.manual_seed`` at the start of a fit: a layer's draws depend only on the seed, its name
    and how many steps ran, not on other layers (so cached and uncached head training agree)."""
    for key, var in rng_vars:
        value = zlib.crc32(f"{seed}/{key}".encode()) & 0x7FFFFFFF
        var.assign(np.array([value, 0], dtype=var.dtype))


#: tlcore's precision -> the Keras dtype policy its training step runs under (float32 variables)
POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


@contextmanager
def mixed_precision(model: keras.Model, precision: str):
    """While active, every float32 layer of ``model`` has Keras' mixed dtype policy for ``precision``
    (``mixed_bfloat16``/``mixed_float16``: it computes in 16 bits on float32 variables, the master
    weights); the policies are restored after. A step traced inside keeps that precision; whatever
    is traced outside (predictions) stays float32. ``"float32"`` changes nothing."""
    if precision == "float32":
        yield
        return
    policy = keras.DTypePolicy(POLICIES[precision])
    changed = []
    for layer in [model, *flatten_layers(model)]:
        if isinstance(layer, InputLayer) or layer.dtype_policy.name != "float32":
            continue  # inputs keep their dtype; a layer with its own policy keeps it
        changed.append((layer, layer.dtype_policy))
        layer.dtype_policy = policy
    try:
        yield
    finally:
        for layer, old in changed:
            layer.dtype_policy = old


#: what TensorFlow says when an operation has no kernel (at run time) or no definition (when traced)
#: for a dtype
_NO_KERNEL = ("OpKernel", "not in list of allowed values", "not in the list of allowed values")


@contextmanager
def precision_errors(precision: str):
    """Turn TensorFlow's "this operation does not exist for this dtype" (raised when the step is
    traced or first run) into a :class:`PrecisionNotSupportedError`; nothing has run then."""
    try:
        yield
    except (TypeError, tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
        text = str(e)
        if precision == "float32" or not any(k in text for k in _NO_KERNEL):
            raise
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in text.splitlines()]
        detail = next((line for line in lines if any(k in line for k in _NO_KERNEL)), lines[0] if lines else "")
        raise PrecisionNotSupportedError(
            f"precision={precision!r} is not possible with this TensorFlow build on "
            f"{tf.config.list_logical_devices()[0].device_type}: an operation of the model does not exist for "
            f"{precision} ({detail[:300]}). Use precision='float32'"
            + (" or 'bfloat16'" if precision == "float16" else " or 'float16'")) from None


def _to_state(value: np.ndarray, perm: tuple[int, ...] | None) -> np.ndarray:
    """A slot in its tensor's ``state()`` layout (as ``freeze.Tensor.read``), float32."""
    value = np.asarray(value, dtype=np.float32)
    return np.array(value.transpose(perm) if perm else value, copy=True, order="C")


def _from_state(value: Any, perm: tuple[int, ...] | None, shape: tuple, what: str) -> np.ndarray:
    """A slot given in its tensor's ``state()`` layout, in Keras' layout (as ``freeze.Tensor.write``)."""
    value = np.asarray(value, dtype=np.float32)
    value = value.transpose(np.argsort(perm)) if perm else value
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"optimizer state {what}: shape {tuple(np.shape(value))} does not fit the tensor")
    return value


#: the guard's flag (an int32 scalar carried from step to step): every step so far was finite
FLAG_OK = -1
#: the guard's flag when the loss was not finite; ``i + 1``: the gradient of trainable tensor ``i``
FLAG_LOSS = 0


def guard_flag(flag, loss, grads: list | None):
    """The guard's flag after a step (see :data:`FLAG_OK`): ``flag`` when it was already set (sticky),
    else :data:`FLAG_LOSS` for a non-finite ``loss``, else ``i + 1`` for the first of ``grads`` (None:
    not checked; a None gradient counts as finite) that is not finite, else :data:`FLAG_OK`.

    One sum per gradient on every step: an infinite or NaN element makes its sum, and the sum of the
    sums, non-finite. Only then (``tf.cond``) is every gradient tested element by element for the
    first that is not finite (the sums may also have overflowed: then none is, and the step goes on)."""
    code = tf.constant(FLAG_OK, tf.int32)
    present = [g for g in grads or () if g is not None]
    if present:
        def first_nonfinite():
            finite = tf.stack([tf.constant(True) if g is None else tf.reduce_all(tf.math.is_finite(g))
                               for g in grads])
            return tf.where(tf.reduce_all(finite), code, 1 + tf.argmin(tf.cast(finite, tf.int32), output_type=tf.int32))

        # (float16 summed in float32: its range is too small; bfloat16 has float32's)
        total = tf.add_n([tf.cast(tf.reduce_sum(tf.cast(g, tf.float32) if g.dtype == tf.float16 else g), tf.float32)
                          for g in present])
        code = tf.cond(tf.math.is_finite(total), lambda: code, first_nonfinite)
    code = tf.where(tf.math.is_finite(loss), code, tf.constant(FLAG_LOSS, tf.int32))
    return tf.where(tf.equal(flag, FLAG_OK), code, flag)


def flag_name(flag: int, names: list[str]) -> str | None:
    """:attr:`Trainer.nonfinite` for a flag read on the host."""
    return None if flag == FLAG_OK else "loss" if flag == FLAG_LOSS else names[flag - 1]


def written_variables(model: keras.Model, rng_vars: list, trainable: list) -> list:
    """The variables a training forward pass of ``model`` may write, which a refused step restores:
    the non-trainable variables that the layers which train create (BatchNorm moving statistics; a
    frozen layer, ``trainable=False``, runs in inference mode and writes nothing) and the seed states."""
    skip, out = {id(v) for v in trainable}, []
    for layer in [model, *flatten_layers(model)]:
        if layer.trainable:
            out += [v for v in own_variables(layer)[1] if id(v) not in skip]
    out += [v for _, v in rng_vars]
    return list({id(v): v for v in out}.values())


#: whole-model steps (:class:`KerasTrainer`) kept per process for the models of the same structure,
#: least recently used dropped first
MAX_STEPS = 16
_STEPS: dict[tuple, Any] = {}


def clear_cache() -> None:
    """Forget every compiled step and feature pass shared across models (the next model traces its
    own again, as in a new process)."""
    from .shared import _SHARED

    _STEPS.clear()
    _SHARED.clear()


class Step(NamedTuple):
    """A traced whole-model step: its concrete function, the dtypes of its flat batch inputs and the
    shapes and dtypes of the variables it takes after them."""

    fn: Any
    dtypes: tuple
    layout: tuple


def _tf_variable(v):
    """The ``tf.Variable`` behind a Keras variable (``v`` itself for a ``tf.Variable``)."""
    return v.value if isinstance(v, keras.Variable) else v


class KerasTrainer(Trainer):
    """One ``tf.function`` training step for a fixed trainable set.

    Args:
        model: the native ``keras.Model``; called with ``training=True`` (frozen BatchNorm layers
            have ``trainable=False`` and so run in inference mode).
        tensors: the trainable tensors (``freeze.Tensor``: name, variable, layout), the optimizer's
            only state and decay targets.
        rng_vars: ``(key, seed state)`` of the random layers, reset from the seed by :meth:`reset`.
        spec: optimizer, loss, clipping, seed and precision (see :func:`mixed_precision`; float16
            adds Keras' dynamic loss scaling, ``LossScaleOptimizer``).
        to_inputs: turns a numpy batch (an array, a dict or a tuple) into what the model is called
            with (see ``inputs.ModelInputs``).
        jit_compile: compile the step with XLA.
        prefix: prepended to the tensor names to look up their rates in ``spec.rates()`` (see
            :func:`param_rates`).

    The step takes the base learning rate as a float32 argument and assigns it to the optimizer's
    ``learning_rate`` inside the compiled step (no eager assign per step); the multipliers and decays
    are constants of the step. The weights, optimizer state and seed states live in the Keras
    variables, so :meth:`resume` has nothing to re-read.

    ``spec.guard``: the step keeps a flag in a variable (:func:`guard_flag`: sticky, one reduction per
    gradient) and applies the update only while it is clear (``tf.cond``); a refused step assigns the
    values the forward pass overwrote (:func:`written_variables`, read before it) back. The step
    returns the flag with the outputs, so :attr:`nonfinite` is set when the step returns.

    The traced step takes all these variables as arguments and is shared by the trainers of every
    model with the same :attr:`share` key (see the module); ``compilations`` counts this trainer's
    own traces only.
    """

    def __init__(self, model: keras.Model, tensors: list, rng_vars: list, spec: TrainSpec,
                 to_inputs: Callable[[Any], Any] = lambda x: x, jit_compile: bool = JIT_COMPILE, prefix: str = ""):
        self.model, self.tensors, self.spec, self.rng_vars = model, list(tensors), spec, rng_vars
        self.variables = [t.variable for t in self.tensors]
        self.to_inputs = to_inputs
        rates = param_rates(spec, [t.name for t in self.tensors], prefix)
        self.optimizer = build_optimizer(spec.optimizer, spec.clip_grad_norm, rates) if self.variables else None
        #: float16's loss scaling (None otherwise): Keras' dynamic scale around the optimizer
        self.scaler = None
        if self.optimizer is not None and spec.precision == "float16":
            self.scaler = keras.optimizers.LossScaleOptimizer(self.optimizer)
        if self.optimizer is not None:
            (self.scaler or self.optimizer).build(self.variables)
        self.jit_compile = jit_compile
        self._steps: dict[tuple, Step] = {}
        self.guard = spec.guard
        if self.guard:
            with tf.init_scope():
                self._flag = tf.Variable(FLAG_OK, dtype=tf.int32, trainable=False, name="tlcore_nonfinite")
            self.written = written_variables(model, rng_vars, self.variables)
        self._zero_state = None
        #: the rate a step without one runs at: the optimizer's lr when it is a number, else the last one
        self._lr = float(spec.optimizer.schedule.lr_at(0))
        self._rate = None  # self._lr as a float32 tensor
        self._dirty = False  # whether the optimizer state may differ from zero (a step ran, or an import)
        self._same_steps = True  # whether every variable has the same step count (see rates_of)
        if self.optimizer is not None:
            # one compiled call zeroes the whole optimizer state: one eager assign per slot variable
            # costs ~0.2 ms each, i.e. ~3 ms per step on resnet18 over an 8-step fit
            lr_var = self.optimizer._learning_rate
            state = [(v, 0) for v in self.optimizer.variables if v is not lr_var]
            if self.scaler is not None:
                state += [(self.scaler.step_counter, 0), (self.scaler.dynamic_scale, self.scaler.initial_scale)]

            def zero_state():
                for v, initial in state:
                    v.value.assign(tf.fill(v.shape, tf.cast(initial, v.dtype)))

            self._zero_state = tf.function(zero_state, input_signature=[], autograph=False)
        #: every variable the step may read or write, in an order fixed by the structure: the step
        #: takes them as arguments (it captures none), so its trace serves every model of the same
        #: structure, trainable set and spec (:attr:`share`, see :meth:`step`)
        owned = list(model.variables)
        if self.optimizer is not None:
            owned += [*self.optimizer.variables, *(self.scaler.variables if self.scaler is not None else ()),
                      self.optimizer.group_lr]
        if self.guard:
            owned.append(self._flag)
        self._state = list({id(v): v for v in map(_tf_variable, owned)}.values())
        self._handles = [v.handle for v in self._state]
        self._layout = tuple((tuple(v.shape), v.dtype) for v in self._state)
        self.share = self._share_key(step_structure(model), rates)

    def _share_key(self, structure: tuple | None, rates: list) -> tuple | None:
        """What this trainer's step is traced from besides the model's variables: the model's
        structure (:func:`shared.step_structure`), where the trainable, random-seed and restored
        variables are among the step's arguments, the spec (:func:`shared_step_key`) and XLA.
        None: the model's structure is not known, so its step is its own."""
        if structure is None:
            return None
        index = {id(v): i for i, v in enumerate(self._state)}
        try:
            at = lambda vs: tuple(index[id(_tf_variable(v))] for v in vs)  # noqa: E731
            where = (at(self.variables), at(v for _, v in self.rng_vars), at(self.written) if self.guard else ())
        except KeyError:  # a variable outside the model's own list
            return None
        return (structure, where, *shared_step_key(self.spec, rates), self.jit_compile)

    def reset(self, seed: int) -> None:
        """Start a new run with this (possibly already compiled) step: zero optimizer state, step counts
        and loss scale, random layers reseeded from ``seed``; ``compilations`` then counts this run's
        traces only."""
        if self._zero_state is not None and self._dirty:
            if isinstance(self._zero_state, tf.types.experimental.PolymorphicFunction):
                self._zero_state = self._zero_state.get_concrete_function()  # traced on first reuse only
            self._zero_state()
            self._dirty = False
        self._same_steps = True
        seed_rngs(self.rng_vars, seed)
        self._clear_flag()
        self.compilations = 0

    def resume(self) -> None:
        """Continue the run: the weights, optimizer state, step counts, loss scale and seed states are
        the Keras variables themselves (a ``load_state`` in between already wrote them)."""
        self._clear_flag()
        self.compilations = 0

    def _clear_flag(self) -> None:
        if self.nonfinite is not None:
            self._flag.assign(FLAG_OK)  # (set only by a guarded step)
        self.nonfinite = None

    def _train_step(self, x, y, w, lr):
        """One step at base rate ``lr``; returns the float32 outputs of its training forward pass (and
        with the guard, the flag after it)."""
        self.compilations += 1  # runs once per trace
        # what the forward pass overwrites, read before it (a read shares the variable's buffer: an
        # assign after it writes a new one, so this costs no copy)
        before = [v.value.read_value() for v in self.written] if self.guard else []
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            for v in self.variables:
                tape.watch(v.value)
            out = tf.cast(self.model(x, training=True), tf.float32)  # the loss in float32
            loss = weighted_loss(out, y, w, self.spec.loss)
            extra = self.model.losses  # regularisation terms of the model's layers, as Keras' fit adds
            objective = unscaled = loss + tf.add_n([tf.cast(e, loss.dtype) for e in extra]) if extra else loss
            if self.scaler is not None:
                objective = self.scaler.scale_loss(objective)
        grads = None
        if self.optimizer is not None:
            self.optimizer.learning_rate.assign(lr)  # inside the step: Keras passes it to update_step
            grads = dense(tape.gradient(objective, [v.value for v in self.variables]))

        def update():
            if self.optimizer is None:
                pass
            elif self.scaler is None:
                self.optimizer.apply(grads, self.variables)
            else:  # unscaled, clipped and applied only when every gradient is finite (else the scale halves)
                self.scaler.apply(grads, self.variables)
            return tf.constant(True)

        if not self.guard:
            update()
            return out
        # under float16 an overflowing gradient is the loss scale's business: only the loss is checked
        flag = guard_flag(self._flag.read_value(), unscaled, grads if self.scaler is None else None)
        self._flag.assign(flag)

        def refuse():
            for v, value in zip(self.written, before):
                v.value.assign(value)
            return tf.constant(False)

        tf.cond(tf.equal(flag, FLAG_OK), update, refuse)
        return out, flag

    def step(self, x: Any, y: np.ndarray, w: np.ndarray | None = None, lr: float | None = None) -> np.ndarray:
        """Train on one batch at base rate ``lr``; return the outputs (logits) of its training forward
        pass (float32)."""
        x = self.to_inputs(x)
        if lr is not None and lr != self._lr:
            self._lr, self._rate = lr, None
        if self._rate is None:  # a tensor made once per rate: quicker than the call converting a number
            self._rate = tf.constant(self._lr, tf.float32)
        rate = self._rate
        args = (x, y, rate) if w is None else (x, y, w, rate)
        self._dirty = True
        same = self._same_steps or not self.optimizer.uses_step if self.optimizer is not None else True
        key = (structure_key(x), y.shape[1:], y.dtype, w is None, same)
        step = self._steps.get(key)
        if step is None:  # one trace per per-sample shape (and with or without w): the batch size is free
            step = self._steps[key] = self._function(key, x, y, w, same)
            with precision_errors(self.spec.precision):  # a missing kernel shows on the first run
                return self._outputs(self._call(step, args))
        return self._outputs(self._call(step, args))

    def _call(self, step: Step, args: tuple):
        """``step`` on the batch ``args`` and this trainer's variables, its inputs flattened here (the
        batch's arrays as tensors of the traced dtypes, the variables as their handles)."""
        tensors = [a if isinstance(a, tf.Tensor) else tf.convert_to_tensor(a, d)
                   for a, d in zip(tf.nest.flatten(args), step.dtypes)]
        return call_flat(step.fn, tensors + self._handles, (*args, self._state))

    def _function(self, key: tuple, x: Any, y: np.ndarray, w: np.ndarray | None, same: bool) -> Step:
        """The concrete step for ``key``: the one a model of the same structure traced (:attr:`share`),
        else traced here (counted in :attr:`compilations`) and, when it captured no variable of this
        model (all are arguments), kept for the models to come."""
        share = None if self.share is None else ("keras_step", self.share, key)
        if share is not None:
            found = _STEPS.pop(share, None)
            if found is not None:
                _STEPS[share] = found  # most recently used last
                if found.layout == self._layout:  # (the key implies it; checked: the handles go in unchecked)
                    return found
        if self.optimizer is not None:
            self.optimizer.__dict__["same_steps"] = same  # read while tracing
        signature = [signature_of(x), tf.TensorSpec((None, *y.shape[1:]), tf.as_dtype(y.dtype))]
        if w is not None:
            signature.append(tf.TensorSpec((None,), tf.float32))
        signature.append(tf.TensorSpec((), tf.float32))
        # called as its concrete function with flat inputs (see _call): the signature is fixed, so the
        # polymorphic function's dispatch (cache lookup, binding) would only add Python per step
        with precision_errors(self.spec.precision), mixed_precision(self.model, self.spec.precision):
            if w is not None:
                train = lambda x, y, w, lr, state: self._train_step(x, y, w, lr)  # noqa: E731
            else:
                train = lambda x, y, lr, state: self._train_step(x, y, None, lr)  # noqa: E731
            fn = tf.function(train, jit_compile=self.jit_compile, autograph=False).get_concrete_function(
                *signature, self._state)
        step = Step(fn, tuple(spec.dtype for spec in tf.nest.flatten(signature)), self._layout)
        if share is not None and not fn.captured_inputs:
            _STEPS[share] = step
            while len(_STEPS) > MAX_STEPS:
                _STEPS.pop(next(iter(_STEPS)))
        return step

    def _outputs(self, result) -> np.ndarray:
        """The step's outputs as numpy; with the guard, :attr:`nonfinite` set from its flag."""
        if not self.guard:
            return result.numpy()
        out, flag = result
        if self.nonfinite is None:
            self.nonfinite = flag_name(int(flag), [t.name for t in self.tensors])
        return out.numpy()

    def export_state(self) -> dict:
        slots: dict[str, dict] = {}
        steps: dict[str, int] = {}
        if self.optimizer is None:
            return {"slots": slots, "steps": steps}
        done = int(self.optimizer.iterations.numpy())
        offsets = self.optimizer.step_offsets.numpy()
        for i, t in enumerate(self.tensors):
            steps[t.name] = done + int(offsets[i])
            slots[t.name] = {} if steps[t.name] == 0 else {  # no state before its first update, as torch
                name: _to_state(self.optimizer._state[name][i].numpy(), t.perm) for name in self.optimizer.slot_names()}
        return {"slots": slots, "steps": steps}

    def import_state(self, state: dict) -> None:
        if self.optimizer is None:
            return
        steps = np.array([int(state.get("steps", {}).get(t.name, 0)) for t in self.tensors], np.int64)
        done = int(steps.min())  # Keras' iterations: the fewest steps; the offsets the rest (often all 0)
        offsets = steps - done
        values = []  # every value checked before any is written
        for i, t in enumerate(self.tensors):
            given = state.get("slots", {}).get(t.name) or {}
            for name in self.optimizer.slot_names():
                var = self.optimizer._state[name][i]
                value = given.get(name)
                values.append((var, np.zeros(var.shape, var.dtype) if value is None else
                               _from_state(value, t.perm, var.shape, f"{t.name}/{name}")))
        for var, value in values:
            var.assign(value)
        self.optimizer.iterations.assign(done)
        self.optimizer.step_offsets.assign(offsets)
        self._same_steps = not offsets.any()
        self._dirty = True

    def applied_lr(self) -> dict[str, float]:
        if self.optimizer is None:
            return {}
        group = self.optimizer.group_lr.numpy()
        return {t.name: float(group[g]) for t, g in zip(self.tensors, self.optimizer.group_of)}

    def optimizer_state_bytes(self) -> int:
        if self.optimizer is None:
            return 0
        return int(sum(np.prod(v.shape, dtype=np.int64) * np.dtype(v.dtype).itemsize
                       for v in (self.scaler or self.optimizer).variables))


_traces = [0]  # traces of shared steps so far (a list: updated from inside traced functions)


def shared_step_key(spec: TrainSpec, rates: list[tuple[float, float]]) -> tuple:
    """What a shared step's trace depends on besides the model's structure: the spec without its seed
    and learning rate (an argument of the step) and with the plan resolved to the variables' rates
    (the step's constants), so fits at other rates or schedules reuse it."""
    opt = replace(spec.optimizer, lr=1.0, lr_mult=None, no_decay=None)
    return (replace(spec, seed=0, params=None, optimizer=opt), tuple(rates))


class SharedStepTrainer(Trainer):
    """A step that takes the weights, the random-seed states and the optimizer state as values and
    returns the new ones, compiled once per process for every model with the same ``key``.

    Used for a head trained on cached features (``key`` = head spec and input shape): a new model
    with the same head then trains without a new trace. The values stay in tensors between steps;
    :meth:`finish` writes them back to the model's variables and :meth:`resume` reads them again. The
    update rules are the optimizer's :meth:`TorchRuleOptimizer.rule` with the same :class:`Rate`\\ s, as
    in :class:`KerasTrainer`, so both steps compute the same.

    Args:
        model: the head's ``keras.Model``.
        tensors: its tensors (``freeze.Tensor``), to name and lay out the optimizer state.
        rng_vars: ``(key, seed state)`` of its random layers.
        spec: the training spec.
        key: the model's structure (with the rates and the spec, see :func:`shared_step_key`).
        prefix: prepended to the tensor names to look up their rates (see :func:`param_rates`).

    ``spec.guard``: the steps carry the guard's flag (:func:`guard_flag`) through the graph loop with
    the step that set it; a step that sets it or finds it set returns every value it was given (the
    rates in ``group_lr`` excepted, as torch sets its param groups' lr first). The host reads both
    after the call and returns the outputs up to the refused step.
    """

    def __init__(self, model: keras.Model, tensors: list, rng_vars: list, spec: TrainSpec, key: tuple,
                 prefix: str = ""):
        self.model, self.spec, self.rng_vars = model, spec, rng_vars
        self._trainable = list(model.trainable_variables)  # stateless_call's order
        self._non_trainable = list(model.non_trainable_variables)
        by_id = {id(t.variable): t for t in tensors}
        self.tensors = [by_id[id(v)] for v in self._trainable]
        rates = param_rates(spec, [t.name for t in self.tensors], prefix)
        self.key = (*key, *shared_step_key(spec, rates))
        self.optimizer = build_optimizer(spec.optimizer, spec.clip_grad_norm, rates)  # its rule; holds no state
        self._lr = float(spec.optimizer.schedule.lr_at(0))
        self._start(zero=True)

    def _start(self, zero: bool) -> None:
        """Read the model's current values; with ``zero``, zero optimizer state and step counts too."""
        self.weights = [tf.convert_to_tensor(v) for v in self._trainable]
        self.states = [tf.convert_to_tensor(v) for v in self._non_trainable]
        if zero:
            self.slots = [{n: tf.zeros_like(w) for n in self.optimizer.slot_names()} for w in self.weights]
            self.iteration = tf.constant(0, tf.int64)
            self.offsets = tf.zeros((len(self.weights),), tf.int64)
            self._same_steps = True
            self.group_lr = tf.constant(np.asarray(self.optimizer.multipliers) * self._lr, tf.float64)
        self.flag = tf.constant(FLAG_OK, tf.int32) if self.spec.guard else None
        self.nonfinite = None
        self.compilations = 0
        self._unwritten = False  # steps ran since the model's variables were last written

    def reset(self, seed: int) -> None:
        """Start from the model's current values, with zero optimizer state and reseeded random layers."""
        seed_rngs(self.rng_vars, seed)
        self._start(zero=True)

    def resume(self) -> None:
        """Continue: the optimizer state and step counts as they are; the weights and the other values
        (BatchNorm statistics, seed states) read again from the model, where :meth:`finish` left them
        (or a ``load_state`` since)."""
        self._start(zero=False)

    def _pure_step(self, x, y, w, lr, weights, states, slots, iteration, offsets, flag, same: bool):
        _traces[0] += 1
        with tf.GradientTape() as tape:
            tape.watch(weights)
            out, new_states, extra = self.model.stateless_call(weights, states, x, training=True,
                                                               return_losses=True)
            out = tf.cast(out, tf.float32)
            loss = weighted_loss(out, y, w, self.spec.loss)
            objective = loss + tf.add_n([tf.cast(e, loss.dtype) for e in extra]) if extra else loss
        grads = dense(tape.gradient(objective, weights))
        if flag is not None:
            flag = guard_flag(flag, objective, grads)
        if self.spec.clip_grad_norm is not None:
            grads = clip_by_global_norm(grads, self.spec.clip_grad_norm)
        group, rates = self.optimizer.rates_of(lr, iteration, offsets, same)
        updated = [self.optimizer.rule(w, g, slot, rate) for w, g, slot, rate in zip(weights, grads, slots, rates)]
        new = ([u[0] for u in updated], new_states, [u[1] for u in updated], iteration + 1)
        if flag is not None:  # refused: every value as it was
            ok = tf.equal(flag, FLAG_OK)
            new = tf.nest.map_structure(lambda n, o: tf.where(ok, n, o), new, (weights, states, slots, iteration))
        return (out, *new, group, flag)

    def _pure_steps(self, x, y, w, batches, lrs, weights, states, slots, iteration, offsets, group, flag,
                    same: bool):
        """One step per row of ``batches`` (indices into ``x``, ``y`` and ``w``; ``w`` may be None) at
        the base rates ``lrs``, in a graph loop; returns each step's outputs stacked, ``(steps, batch,
        ...)``, and the new values. ``same``: every variable has the same step count. ``flag``: the
        guard's (None without it); then the values end with the new flag and the index of the step
        that set it (-1: none)."""
        n = tf.shape(batches)[0]

        def body(i, weights, states, slots, iteration, group, outs, *guard):
            ids = batches[i]
            out, weights, states, slots, iteration, group, new_flag = self._pure_step(
                tf.gather(x, ids), tf.gather(y, ids), None if w is None else tf.gather(w, ids), lrs[i],
                weights, states, slots, iteration, offsets, guard[0] if guard else None, same)
            if guard:
                flag, at = guard
                guard = (new_flag, tf.where(tf.equal(flag, FLAG_OK) & tf.not_equal(new_flag, FLAG_OK), i, at))
            return (i + 1, weights, states, slots, iteration, group, outs.write(i, out), *guard)

        outs = tf.TensorArray(tf.float32, size=n)
        guard = () if flag is None else (flag, tf.constant(-1))
        _, weights, states, slots, iteration, group, outs, *guard = tf.while_loop(
            lambda i, *_: i < n, body, [tf.constant(0), weights, states, slots, iteration, group, outs, *guard])
        return (outs.stack(), weights, states, slots, iteration, group, *guard)

    def _function(self, x: np.ndarray, y: np.ndarray, weighted: bool):
        same = self._same_steps or not self.optimizer.uses_step

        def make():
            spec = lambda t: tf.TensorSpec(t.shape, t.dtype)  # noqa: E731
            signature = [tf.TensorSpec((None, *x.shape[1:]), tf.as_dtype(x.dtype)),
                         tf.TensorSpec((None, *y.shape[1:]), tf.as_dtype(y.dtype)),
                         *([tf.TensorSpec((None,), tf.float32)] if weighted else []),
                         tf.TensorSpec((None, None), tf.int64), tf.TensorSpec((None,), tf.float32),
                         [spec(w) for w in self.weights], [spec(v) for v in self.states],
                         [{n: spec(v) for n, v in slot.items()} for slot in self.slots],
                         tf.TensorSpec((), tf.int64), spec(self.offsets), spec(self.group_lr),
                         *([tf.TensorSpec((), tf.int32)] if guard else [])]
            steps = self._pure_steps if guard else lambda *args, same: self._pure_steps(*args, None, same=same)
            pure = (lambda *args: steps(*args, same=same)) if weighted else \
                (lambda x, y, *rest: steps(x, y, None, *rest, same=same))
            return tf.function(pure, input_signature=signature, autograph=False)

        guard = self.spec.guard  # (in self.key too: the spec is)
        return shared(("steps", self.key, x.shape[1:], x.dtype.str, y.shape[1:], y.dtype.str, weighted, same), make)

    def _run(self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None, batches: np.ndarray,
             lrs: list[float]) -> np.ndarray:
        """The steps of ``batches`` at base rates ``lrs`` in one call; their outputs stacked, ``(steps,
        batch, ...)``, up to the step the guard refused (where one set :attr:`nonfinite`)."""
        before = _traces[0]
        args = (x, y) if w is None else (x, y, w)
        guard = () if self.flag is None else (self.flag,)
        with precision_errors(self.spec.precision), mixed_precision(self.model, self.spec.precision):
            outs, self.weights, self.states, self.slots, self.iteration, self.group_lr, *guard = \
                self._function(x, y, w is not None)(*args, batches, np.asarray(lrs, np.float32), self.weights,
                                                     self.states, self.slots, self.iteration, self.offsets,
                                                     self.group_lr, *guard)
        self.compilations += _traces[0] - before
        self._unwritten = True
        outs = outs.numpy()
        if guard:
            self.flag, at = guard
            if self.nonfinite is None and int(at) >= 0:
                self.nonfinite = flag_name(int(self.flag), [t.name for t in self.tensors])
                return outs[:int(at) + 1]
        return outs

    def step(self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, lr: float | None = None) -> np.ndarray:
        if lr is None:
            lr = self._lr
        else:
            self._lr = lr
        return self._run(x, y, w, np.arange(len(x))[None], [lr])[0]

    def epoch(self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None, batches: list,
              on_step=lambda n: None, lrs: list[float] | None = None) -> list[np.ndarray]:
        """The whole epoch in one call (the full batches in one graph loop, a shorter last batch in a
        second call): a head on cached features is so small that calling a step costs more than running
        it. Returns each step's outputs."""
        ids = [np.arange(len(x))[b] for b in batches]
        lrs = [self._lr] * len(ids) if lrs is None else list(lrs)
        if self.nonfinite is not None:  # refused already: one step (that changes nothing), as Trainer.epoch
            ids, lrs = ids[:1], lrs[:1]
        if lrs:
            self._lr = lrs[-1]
        full = [i for i in ids if len(i) == len(ids[0])]
        outs = list(self._run(x, y, w, np.stack(full), lrs[:len(full)])) if full else []
        if len(full) < len(ids) and (self.nonfinite is None or not outs):
            outs += list(self._run(x, y, w, ids[-1][None], lrs[len(full):]))
        on_step(len(outs))
        return outs

    def finish(self) -> None:
        if self._unwritten:
            for var, value in zip(self._trainable + self._non_trainable, self.weights + self.states):
                var.assign(value)
            self._unwritten = False

    def export_state(self) -> dict:
        done = int(self.iteration.numpy())
        offsets = self.offsets.numpy()
        slots: dict[str, dict] = {}
        steps: dict[str, int] = {}
        for i, t in enumerate(self.tensors):
            steps[t.name] = done + int(offsets[i])
            slots[t.name] = {} if steps[t.name] == 0 else {
                name: _to_state(value.numpy(), t.perm) for name, value in self.slots[i].items()}
        return {"slots": slots, "steps": steps}

    def import_state(self, state: dict) -> None:
        steps = np.array([int(state.get("steps", {}).get(t.name, 0)) for t in self.tensors], np.int64)
        done = int(steps.min())  # as KerasTrainer.import_state
        slots = []
        for t, w in zip(self.tensors, self.weights):
            given = state.get("slots", {}).get(t.name) or {}
            slots.append({name: tf.zeros_like(w) if given.get(name) is None else
                          tf.constant(_from_state(given[name], t.perm, w.shape, f"{t.name}/{name}"), w.dtype)
                          for name in self.optimizer.slot_names()})
        self.slots, self.iteration, self.offsets = slots, tf.constant(done, tf.int64), tf.constant(steps - done)
        self._same_steps = not (steps - done).any()

    def applied_lr(self) -> dict[str, float]:
        group = self.group_lr.numpy()
        return {t.name: float(group[g]) for t, g in zip(self.tensors, self.optimizer.group_of)}

    def optimizer_state_bytes(self) -> int:
        slots = sum(int(np.prod(v.shape)) * v.dtype.size for slot in self.slots for v in slot.values())
        # as KerasTrainer: int64 step counter, float32 learning rate, an int64 step offset per tensor
        return slots + 8 + 4 + 8 * len(self.weights)
