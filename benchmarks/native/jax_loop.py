"""Flax NNX + Optax: the loop a user would write by hand, in the fast functional form the Flax docs
recommend for performance (``nnx.split`` once, a pure step under ``jax.jit``, state threaded through).

Freezing by hand: the state is split into the trainable ``nnx.Param``s (the head's, or all of them)
and the rest, the gradient is taken only with respect to the first, ``optax.sgd`` with momentum 0.9
(after ``clip_by_global_norm`` in ``frozen_clip``) only sees them, and frozen BatchNorm runs on its
running averages (``nnx.view(..., use_running_average=True)``).
"""
from __future__ import annotations

import numpy as np

import tlcore as tl

tl.get_backend("jax")

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from ..workloads import CLIP, LR  # noqa: E402


def bn_view(module: nnx.Module, use_running_average: bool) -> nnx.Module:
    """``module`` with every BatchNorm's ``use_running_average`` set (``nnx.view`` refuses the flag
    when no layer has it, e.g. in a ViT)."""
    if any(hasattr(m, "use_running_average") for _, m in nnx.iter_modules(module)):
        return nnx.view(module, use_running_average=use_running_average)
    return module


def functional_step(graphdef, tx, trainable=nnx.Param):
    """The hand-written training step, not jitted yet (each loop jits it, with shardings or not):
    cross-entropy of the model merged from ``graphdef`` and the state, gradients with respect to the
    ``trainable`` part only, ``tx``'s update, the rest (BatchNorm statistics) threaded through."""
    def step(params, rest, opt_state, x, y):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
            return loss, nnx.state(m, nnx.Not(trainable))
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss
    return step


class Native:
    def __init__(self, model, mode: str):
        frozen = mode in ("frozen", "frozen_clip")
        head = model.head
        net = bn_view(model.native, frozen)  # frozen: every BatchNorm (all in the base)

        def trainable(path, value) -> bool:
            return isinstance(value, nnx.Param) and (not frozen or path[0] == head)

        graphdef, self.params, self.rest = nnx.split(net, trainable, ...)
        tx = optax.sgd(LR, momentum=0.9)
        self.tx = optax.chain(optax.clip_by_global_norm(CLIP), tx) if mode == "frozen_clip" else tx
        self.opt_state = self.tx.init(self.params)
        eval_graphdef, _ = nnx.split(bn_view(model.native, True))

        step = jax.jit(functional_step(graphdef, self.tx, trainable))

        @jax.jit
        def forward(params, rest, x):
            return nnx.merge(eval_graphdef, params, rest)(x)

        self._step, self._forward = step, forward

    def train_epoch(self, x: np.ndarray, y: np.ndarray, batch: int) -> float:
        y = y.astype(np.int32)
        for i in range(0, len(x), batch):
            self.params, self.rest, self.opt_state, loss = self._step(self.params, self.rest, self.opt_state,
                                                                      x[i:i + batch], y[i:i + batch])
        return float(loss)

    def train_loader(self, loader) -> float:
        """One epoch over a torch DataLoader of (image, label) batches (tensors to numpy, as a user would)."""
        for xb, yb in loader:
            self.params, self.rest, self.opt_state, loss = self._step(self.params, self.rest, self.opt_state,
                                                                      xb.numpy(), yb.numpy().astype(np.int32))
        return float(loss)

    def forward(self, x: np.ndarray, batch: int) -> np.ndarray:
        return np.concatenate([np.asarray(self._forward(self.params, self.rest, x[i:i + batch]))
                               for i in range(0, len(x), batch)])

    def optimizer_state_bytes(self) -> int:
        return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(self.opt_state)))


class NativeRecipe:
    """The recipe by hand with Optax: one ``optax.adamw`` per (layer-decay multiplier, decay) group
    through ``optax.multi_transform``, each with the warmup-cosine rate times its multiplier as a
    schedule of the step, in the same jitted functional step as :class:`Native` (everything trains)."""

    def __init__(self, model, total: int):
        from tlcore.groups import plan_params

        from ..worker import recipe_optimizer

        spec = recipe_optimizer(model, total)
        group = {model.layout.path_of[n]: (m, wd) for n, _, m, wd in plan_params(spec, model).entries}
        sched = optax.warmup_cosine_decay_schedule(0.0, LR, spec.schedule.warmup_steps, total, 0.0)
        graphdef, self.params, self.rest = nnx.split(model.native, nnx.Param, ...)

        def label(path, _) -> str:
            m, wd = group[tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))]
            return f"{m}/{wd}"

        labels = jax.tree_util.tree_map_with_path(label, self.params)
        transforms = {}
        for m, wd in set(group.values()):
            transforms[f"{m}/{wd}"] = optax.adamw(lambda t, m=m: m * sched(t), b1=spec.betas[0], b2=spec.betas[1],
                                                  eps=spec.eps, weight_decay=wd)
        self.tx = optax.multi_transform(transforms, labels)
        self.opt_state = self.tx.init(self.params)

        self._step = jax.jit(functional_step(graphdef, self.tx))

    train_epoch = Native.train_epoch  # the same loop over the recipe's step
