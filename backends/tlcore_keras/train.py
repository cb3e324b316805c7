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

A compiled step belongs to one trainable set: ``KerasModel`` reuses it across fits only while the
policy and the optimizer spec are unchanged, and builds a new one as soon as what trains changes, so
changing ``trainable`` after compiling (the stale-compile pitfall, keras#6405) cannot happen.

Example:
    >>> trainer = KerasTrainer(model, trainable_vars, rng_vars, TrainSpec(tl.optim.Adam(lr=1e-3)))  # doctest: +SKIP
    >>> logits = trainer.step(x_batch, y_batch, sample_weight_batch)                                # doctest: +SKIP
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np

from tlcore.backend import Trainer
from tlcore.losses import LossSpec
from tlcore.optim import OptimizerSpec, TrainSpec

from . import PrecisionNotSupportedError
from ._keras import InputLayer, flatten_layers, in_stateless_scope, keras, tf, variable_index
from .inputs import signature as signature_of
from .inputs import structure_key
from .shared import shared

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


class TorchRuleOptimizer(keras.optimizers.Optimizer):
    """Base of the optimizers below: a ``tlcore.optim`` spec on Keras' optimizer machinery.

    Each subclass defines its update as a pure function, :meth:`rule`, which ``update_step`` (the
    stateful Keras path) and :func:`stateless_update` (a step that takes and returns values) share.
    ``clip_grad_norm`` clips the global norm of the gradients passed to ``apply`` first.
    """

    def __init__(self, spec: OptimizerSpec, clip_grad_norm: float | None = None, name: str | None = None):
        super().__init__(learning_rate=float(spec.lr), name=name or f"tlcore_{spec.kind}")
        self.spec = spec
        self.clip_grad_norm = clip_grad_norm

    def slot_names(self) -> tuple[str, ...]:
        """Names of the per-variable state tensors (zeros at the start)."""
        return ()

    def rule(self, w, g, slots: dict, step) -> tuple:
        """``(new w, {slot: new value})`` from weight ``w``, gradient ``g``, ``slots`` and the 1-based
        ``step``; pure (tensors in, tensors out)."""
        raise NotImplementedError

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._state = {name: self.add_optimizer_variables(var_list, name) for name in self.slot_names()}

    #: whether :meth:`rule` reads ``step`` (else ``update_step`` passes ``None`` and reads no counter)
    uses_step = False

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

    def _current_step(self, dtype):
        """The 1-based step as ``dtype`` (``None`` when :meth:`rule` does not use it)."""
        if not self.uses_step:
            return None
        return self._once(("step", dtype), lambda: ops.cast(self.iterations + 1, dtype))

    def update_step(self, gradient, variable, learning_rate):
        index = variable_index(self, variable)
        slots = {name: self._state[name][index] for name in self.slot_names()}
        step = self._current_step(variable.dtype)
        new_w, new_slots = self.rule(ops.convert_to_tensor(variable), ops.cast(gradient, variable.dtype),
                                     {n: ops.convert_to_tensor(v) for n, v in slots.items()}, step)
        for name, value in new_slots.items():
            self.assign(slots[name], value)
        self.assign(variable, new_w)

    def _l2(self, g, w):
        """Coupled L2 regularisation: ``g + weight_decay * w``."""
        wd = self.spec.weight_decay
        return g + wd * w if wd else g


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
        g = self._l2(tf.cast(gradient, dtype), var.read_value() if self.spec.weight_decay else None)
        lr, mu = self._once(("lr, momentum", dtype), lambda: (tf.constant(self.spec.lr, dtype),
                                                              tf.constant(self.spec.momentum, dtype)))
        if self.spec.momentum:
            buf = self._state["momentum_buffer"][variable_index(self, variable)].value
            tf.raw_ops.ResourceApplyMomentum(var=var.handle, accum=buf.handle, lr=lr, grad=g, momentum=mu)
        else:
            tf.raw_ops.ResourceApplyGradientDescent(var=var.handle, alpha=lr, delta=g)

    def rule(self, w, g, slots, step):
        g, mu = self._l2(g, w), self.spec.momentum
        if not mu:
            return w - self.spec.lr * g, {}
        buf = mu * slots["momentum_buffer"] + g
        g = g + mu * buf if self.spec.nesterov else buf
        return w - self.spec.lr * g, {"momentum_buffer": buf}


class Adam(TorchRuleOptimizer):
    """``torch.optim.Adam`` (``eps`` added to ``sqrt(v_hat)``; ``weight_decay`` is coupled L2)."""

    decoupled = False
    uses_step = True

    def slot_names(self):
        return ("exp_avg", "exp_avg_sq")

    def rule(self, w, g, slots, step):
        lr, wd = self.spec.lr, self.spec.weight_decay
        if self.decoupled:
            w = w * (1.0 - lr * wd) if wd else w
        else:
            g = self._l2(g, w)
        b1, b2 = self.spec.betas
        m = slots["exp_avg"] + (g - slots["exp_avg"]) * (1.0 - b1)
        v = slots["exp_avg_sq"] * b2 + (1.0 - b2) * g * g
        bias1 = 1.0 - ops.power(ops.cast(b1, w.dtype), step)
        bias2_sqrt = ops.sqrt(1.0 - ops.power(ops.cast(b2, w.dtype), step))
        denom = ops.sqrt(v) / bias2_sqrt + self.spec.eps
        return w - (lr / bias1) * m / denom, {"exp_avg": m, "exp_avg_sq": v}


class AdamW(Adam):
    """``torch.optim.AdamW``: ``w *= 1 - lr * weight_decay`` (decoupled), then Adam's update."""

    decoupled = True


class RMSprop(TorchRuleOptimizer):
    """``torch.optim.RMSprop`` (``eps`` added outside the square root; coupled L2 decay)."""

    def slot_names(self):
        return ("square_avg",) + (("grad_avg",) if self.spec.centered else ()) + \
            (("momentum_buffer",) if self.spec.momentum else ())

    def rule(self, w, g, slots, step):
        g, alpha = self._l2(g, w), self.spec.alpha
        new = {"square_avg": slots["square_avg"] * alpha + (1.0 - alpha) * g * g}
        if self.spec.centered:
            new["grad_avg"] = slots["grad_avg"] + (g - slots["grad_avg"]) * (1.0 - alpha)
            avg = ops.sqrt(new["square_avg"] - new["grad_avg"] * new["grad_avg"])
        else:
            avg = ops.sqrt(new["square_avg"])
        avg = avg + self.spec.eps
        if self.spec.momentum:
            new["momentum_buffer"] = slots["momentum_buffer"] * self.spec.momentum + g / avg
            return w - self.spec.lr * new["momentum_buffer"], new
        return w - self.spec.lr * g / avg, new


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}


def build_optimizer(spec: OptimizerSpec, clip_grad_norm: float | None = None) -> TorchRuleOptimizer:
    """The Keras optimizer for ``spec`` (not built yet: ``build`` it on the trainable variables)."""
    if spec.kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer kind {spec.kind!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[spec.kind](spec, clip_grad_norm)


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


class KerasTrainer(Trainer):
    """One ``tf.function`` training step for a fixed trainable set.

    Args:
        model: the native ``keras.Model``; called with ``training=True`` (frozen BatchNorm layers
            have ``trainable=False`` and so run in inference mode).
        variables: the trainable variables (the optimizer's only state and decay targets).
        rng_vars: ``(key, seed state)`` of the random layers, reset from ``spec.seed``.
        spec: optimizer, loss, clipping, seed and precision (see :func:`mixed_precision`; float16
            adds Keras' dynamic loss scaling, ``LossScaleOptimizer``).
        to_inputs: turns a numpy batch (an array, a dict or a tuple) into what the model is called
            with (see ``inputs.ModelInputs``).
        jit_compile: compile the step with XLA.
    """

    def __init__(self, model: keras.Model, variables: list, rng_vars: list, spec: TrainSpec,
                 to_inputs: Callable[[Any], Any] = lambda x: x, jit_compile: bool = JIT_COMPILE):
        self.model, self.variables, self.spec, self.rng_vars = model, list(variables), spec, rng_vars
        self.to_inputs = to_inputs
        self.optimizer = build_optimizer(spec.optimizer, spec.clip_grad_norm) if self.variables else None
        #: float16's loss scaling (None otherwise): Keras' dynamic scale around the optimizer
        self.scaler = None
        if self.optimizer is not None and spec.precision == "float16":
            self.scaler = keras.optimizers.LossScaleOptimizer(self.optimizer)
        if self.optimizer is not None:
            (self.scaler or self.optimizer).build(self.variables)
        self.jit_compile = jit_compile
        self._fns: dict[tuple, object] = {}
        self._zero_state = None
        if self.optimizer is not None:
            # one compiled call zeroes the whole optimizer state: one eager assign per slot variable
            # costs ~0.2 ms each, i.e. ~3 ms per step on resnet18 over an 8-step fit
            state = [(v, 0) for v in [self.optimizer.iterations, *(v for slots in self.optimizer._state.values()
                                                                     for v in slots)]]
            if self.scaler is not None:
                state += [(self.scaler.step_counter, 0), (self.scaler.dynamic_scale, self.scaler.initial_scale)]

            def zero_state():
                for v, initial in state:
                    v.value.assign(tf.fill(v.shape, tf.cast(initial, v.dtype)))

            self._zero_state = tf.function(zero_state, input_signature=[], autograph=False)
        self.reset(spec.seed, fresh=True)

    def reset(self, seed: int, fresh: bool = False) -> None:
        """Start a new ``fit`` with this (already compiled) step: fresh optimizer state (and loss
        scale), random layers reseeded from ``seed``; ``compilations`` then counts this fit's traces
        only. ``fresh``: the optimizer was just built (its state is already zero; nothing to trace)."""
        if self._zero_state is not None and not fresh:
            if isinstance(self._zero_state, tf.types.experimental.PolymorphicFunction):
                self._zero_state = self._zero_state.get_concrete_function()  # traced on first reuse only
            self._zero_state()
        seed_rngs(self.rng_vars, seed)
        self.compilations = 0

    def _train_step(self, x, y, w=None):
        """One step; returns the float32 outputs of its training forward pass."""
        self.compilations += 1  # runs once per trace
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            for v in self.variables:
                tape.watch(v.value)
            out = tf.cast(self.model(x, training=True), tf.float32)  # the loss in float32
            loss = weighted_loss(out, y, w, self.spec.loss)
            extra = self.model.losses  # regularisation terms of the model's layers, as Keras' fit adds
            objective = loss + tf.add_n([tf.cast(e, loss.dtype) for e in extra]) if extra else loss
            if self.scaler is not None:
                objective = self.scaler.scale_loss(objective)
        if self.optimizer is not None:
            grads = tape.gradient(objective, [v.value for v in self.variables])
            if self.scaler is None:
                self.optimizer.apply(grads, self.variables)
            else:  # unscaled, clipped and applied only when every gradient is finite (else the scale halves)
                self.scaler.apply(dense(grads), self.variables)
        return out

    def step(self, x: Any, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        """Train on one batch; return the outputs (logits) of its training forward pass (float32)."""
        x = self.to_inputs(x)
        args = (x, y) if w is None else (x, y, w)
        key = (structure_key(x), y.shape[1:], y.dtype, w is None)
        fn = self._fns.get(key)
        if fn is None:  # one trace per per-sample shape (and with or without w): the batch size is free
            signature = [signature_of(x), tf.TensorSpec((None, *y.shape[1:]), tf.as_dtype(y.dtype))]
            if w is not None:
                signature.append(tf.TensorSpec((None,), tf.float32))
            # called as its concrete function: the signature is fixed, so the polymorphic function's
            # dispatch (cache lookup, binding) would only add ~0.15 ms of Python per step
            with precision_errors(self.spec.precision), mixed_precision(self.model, self.spec.precision):
                train = self._train_step if w is not None else lambda x, y: self._train_step(x, y)
                fn = tf.function(train, input_signature=signature, jit_compile=self.jit_compile,
                                 autograph=False).get_concrete_function()
            self._fns[key] = fn
            with precision_errors(self.spec.precision):  # a missing kernel shows on the first run
                return fn(*args).numpy()
        return fn(*args).numpy()

    def optimizer_state_bytes(self) -> int:
        if self.optimizer is None:
            return 0
        return int(sum(np.prod(v.shape, dtype=np.int64) * np.dtype(v.dtype).itemsize
                       for v in (self.scaler or self.optimizer).variables))


_traces = [0]  # traces of shared steps so far (a list: updated from inside traced functions)


class SharedStepTrainer(Trainer):
    """A step that takes the weights, the random-seed states and the optimizer state as values and
    returns the new ones, compiled once per process for every model with the same ``key``.

    Used for a head trained on cached features (``key`` = head spec and input shape): a new model
    with the same head then trains without a new trace. The values stay in tensors between steps;
    :meth:`finish` writes them back to the model's variables. The update rules are the optimizer's
    :meth:`TorchRuleOptimizer.rule`, as in :class:`KerasTrainer`, so both steps compute the same.
    """

    def __init__(self, model: keras.Model, rng_vars: list, spec: TrainSpec, key: tuple):
        self.model, self.spec, self.key, self.rng_vars = model, spec, key, rng_vars
        self.optimizer = build_optimizer(spec.optimizer, spec.clip_grad_norm)  # for its rule; holds no state
        self._trainable = list(model.trainable_variables)
        self._non_trainable = list(model.non_trainable_variables)
        self.reset(spec.seed)

    def reset(self, seed: int) -> None:
        """Start from the model's current values, with zero optimizer state and reseeded random layers."""
        seed_rngs(self.rng_vars, seed)
        self.weights = [tf.convert_to_tensor(v) for v in self._trainable]
        self.states = [tf.convert_to_tensor(v) for v in self._non_trainable]
        self.slots = [{n: tf.zeros_like(w) for n in self.optimizer.slot_names()} for w in self.weights]
        self.iteration = tf.constant(0, tf.int64)
        self.compilations = 0

    def _pure_step(self, x, y, w, weights, states, slots, iteration):
        _traces[0] += 1
        step = tf.cast(iteration + 1, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(weights)
            out, states, extra = self.model.stateless_call(weights, states, x, training=True, return_losses=True)
            out = tf.cast(out, tf.float32)
            loss = weighted_loss(out, y, w, self.spec.loss)
            objective = loss + tf.add_n([tf.cast(e, loss.dtype) for e in extra]) if extra else loss
        grads = dense(tape.gradient(objective, weights))
        if self.spec.clip_grad_norm is not None:
            grads = clip_by_global_norm(grads, self.spec.clip_grad_norm)
        updated = [self.optimizer.rule(w, g, slot, step) for w, g, slot in zip(weights, grads, slots)]
        return (out, [u[0] for u in updated], states, [u[1] for u in updated], iteration + 1)

    def _pure_steps(self, x, y, w, batches, weights, states, slots, iteration):
        """One step per row of ``batches`` (indices into ``x``, ``y`` and ``w``; ``w`` may be None),
        in a graph loop; returns each step's outputs stacked, ``(steps, batch, ...)``."""
        n = tf.shape(batches)[0]

        def body(i, weights, states, slots, iteration, outs):
            ids = batches[i]
            out, weights, states, slots, iteration = self._pure_step(
                tf.gather(x, ids), tf.gather(y, ids), None if w is None else tf.gather(w, ids),
                weights, states, slots, iteration)
            return i + 1, weights, states, slots, iteration, outs.write(i, out)

        outs = tf.TensorArray(tf.float32, size=n)
        _, weights, states, slots, iteration, outs = tf.while_loop(
            lambda i, *_: i < n, body, [tf.constant(0), weights, states, slots, iteration, outs])
        return outs.stack(), weights, states, slots, iteration

    def _function(self, x: np.ndarray, y: np.ndarray, weighted: bool):
        def make():
            spec = lambda t: tf.TensorSpec(t.shape, t.dtype)  # noqa: E731
            signature = [tf.TensorSpec((None, *x.shape[1:]), tf.as_dtype(x.dtype)),
                         tf.TensorSpec((None, *y.shape[1:]), tf.as_dtype(y.dtype)),
                         *([tf.TensorSpec((None,), tf.float32)] if weighted else []),
                         tf.TensorSpec((None, None), tf.int64),
                         [spec(w) for w in self.weights], [spec(v) for v in self.states],
                         [{n: spec(v) for n, v in slot.items()} for slot in self.slots],
                         tf.TensorSpec((), tf.int64)]
            pure = self._pure_steps if weighted else \
                lambda x, y, *rest: self._pure_steps(x, y, None, *rest)
            return tf.function(pure, input_signature=signature, autograph=False)

        return shared(("steps", self.key, x.shape[1:], x.dtype.str, y.shape[1:], y.dtype.str, weighted), make)

    def _run(self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None, batches: np.ndarray) -> np.ndarray:
        """The steps of ``batches`` in one call; their outputs stacked, ``(steps, batch, ...)``."""
        before = _traces[0]
        args = (x, y) if w is None else (x, y, w)
        with precision_errors(self.spec.precision), mixed_precision(self.model, self.spec.precision):
            outs, self.weights, self.states, self.slots, self.iteration = self._function(x, y, w is not None)(
                *args, batches, self.weights, self.states, self.slots, self.iteration)
        self.compilations += _traces[0] - before
        return outs.numpy()

    def step(self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        return self._run(x, y, w, np.arange(len(x))[None])[0]

    def epoch(self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None, batches: list,
              on_step=lambda n: None) -> list[np.ndarray]:
        """The whole epoch in one call (the full batches in one graph loop, a shorter last batch in a
        second call): a head on cached features is so small that calling a step costs more than running
        it. Returns each step's outputs."""
        ids = [np.arange(len(x))[b] for b in batches]
        full = [i for i in ids if len(i) == len(ids[0])]
        outs = list(self._run(x, y, w, np.stack(full)))
        if len(full) < len(ids):
            outs.append(self._run(x, y, w, ids[-1][None])[0])
        on_step(len(ids))
        return outs

    def finish(self) -> None:
        for var, value in zip(self._trainable + self._non_trainable, self.weights + self.states):
            var.assign(value)

    def optimizer_state_bytes(self) -> int:
        slots = sum(int(np.prod(v.shape)) * v.dtype.size for slot in self.slots for v in slot.values())
        return slots + 8 + 4  # as KerasTrainer: int64 step counter and float32 learning rate
