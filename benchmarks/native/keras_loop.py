"""Keras 3 on TensorFlow: the loop a user would write by hand, with the faster of Keras' ``fit`` and a
compiled ``tf.function`` step (measured in ``benchmarks/keras_step.py``: the ``tf.function`` step,
without XLA). Frozen layers get ``trainable=False`` (so frozen BatchNorm runs in inference mode),
``keras.optimizers.SGD`` with momentum 0.9, global-norm clipping with ``global_clipnorm``."""
from __future__ import annotations

import numpy as np

import tlcore as tl

tl.get_backend("keras")  # makes Keras run on TensorFlow (KERAS_BACKEND) before it is imported

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from ..workloads import CLIP, LR  # noqa: E402


class Native:
    def __init__(self, model, mode: str):
        self.net, self.mode = model.native, mode
        frozen = mode in ("frozen", "frozen_clip")
        for layer in self.net.layers:
            layer.trainable = not frozen or layer.name == model.head
        self.variables = list(self.net.trainable_variables)
        self.opt = keras.optimizers.SGD(LR, momentum=0.9, global_clipnorm=CLIP if mode == "frozen_clip" else None)
        self.opt.build(self.variables)
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        spec = tf.TensorSpec((None, *self.net.inputs[0].shape[1:]), tf.float32)
        self._step = tf.function(self._train_step, input_signature=[spec, tf.TensorSpec((None,), tf.int64)])
        self._forward = tf.function(lambda x: self.net(x, training=False), input_signature=[spec])

    def _train_step(self, x, y):
        with tf.GradientTape() as tape:
            loss = self.loss(y, self.net(x, training=True))
        self.opt.apply(tape.gradient(loss, self.variables), self.variables)
        return loss

    def train_epoch(self, x: np.ndarray, y: np.ndarray, batch: int) -> float:
        for i in range(0, len(x), batch):
            loss = self._step(x[i:i + batch], y[i:i + batch])
        return float(loss)

    def train_loader(self, loader) -> float:
        """One epoch over a torch DataLoader of (image, label) batches (tensors to numpy, as a user would)."""
        for xb, yb in loader:
            loss = self._step(xb.numpy(), yb.numpy())
        return float(loss)

    def forward(self, x: np.ndarray, batch: int) -> np.ndarray:
        return np.concatenate([self._forward(x[i:i + batch]).numpy() for i in range(0, len(x), batch)])

    def optimizer_state_bytes(self) -> int:
        return int(sum(np.prod(v.shape, dtype=np.int64) * np.dtype(v.dtype).itemsize for v in self.opt.variables))


class NativeRecipe:
    """The recipe by hand in Keras, which has no per-variable rates: one ``keras.optimizers.AdamW``
    per (layer-decay multiplier, decay) group, each on ``CosineDecay`` with linear warmup to ``LR``
    times its multiplier, all applied in one ``tf.function`` step as :class:`Native`'s (everything
    trains). Left as a Keras user gets them, Keras' Adam numerics differ from tlcore's (PyTorch's):
    ``epsilon`` is added to ``sqrt(v)`` before the bias correction, and ``1 - beta_2 ** t`` is computed
    in float32 (~1e-5 off at the first steps); the weights therefore differ by a few % after a few steps."""

    def __init__(self, model, total: int):
        from tlcore.groups import plan_params

        from ..worker import recipe_optimizer

        spec = recipe_optimizer(model, total)
        warmup = spec.schedule.warmup_steps
        variable = {t.name: t.variable for t in model._tensors}  # tlcore name -> Keras variable
        groups: dict[tuple[float, float], list] = {}
        for name, _, m, wd in plan_params(spec, model).entries:
            groups.setdefault((m, wd), []).append(variable[name])
        self.net = model.native
        self.groups = []
        for (m, wd), variables in groups.items():
            lr = keras.optimizers.schedules.CosineDecay(0.0, total - warmup, warmup_target=LR * m,
                                                        warmup_steps=warmup)
            opt = keras.optimizers.AdamW(lr, weight_decay=wd, beta_1=spec.betas[0], beta_2=spec.betas[1],
                                         epsilon=spec.eps)
            opt.build(variables)
            self.groups.append((opt, variables))
        self.variables = [v for _, variables in self.groups for v in variables]
        self.loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        spec_x = tf.TensorSpec((None, *self.net.inputs[0].shape[1:]), tf.float32)
        self._step = tf.function(self._train_step, input_signature=[spec_x, tf.TensorSpec((None,), tf.int64)])

    def _train_step(self, x, y):
        with tf.GradientTape() as tape:
            loss = self.loss(y, self.net(x, training=True))
        grads = iter(tape.gradient(loss, self.variables))
        for opt, variables in self.groups:
            opt.apply([next(grads) for _ in variables], variables)
        return loss

    def train_epoch(self, x: np.ndarray, y: np.ndarray, batch: int) -> float:
        for i in range(0, len(x), batch):
            loss = self._step(x[i:i + batch], y[i:i + batch])
        return float(loss)
