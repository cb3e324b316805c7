"""The PyTorch training step: the optimizer spec translated once, frozen tensors left out."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tlcore.backend import Trainer
from tlcore.optim import OptimizerSpec, TrainSpec

from ._torch import F, nn, torch
from .cut import primary_output
from .freeze import train_mode


def build_optimizer(spec: OptimizerSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``torch.optim`` for ``spec``; only the given (trainable) parameters get state and decay."""
    common = dict(lr=spec.lr, weight_decay=spec.weight_decay, foreach=True)
    if spec.kind == "sgd":
        return torch.optim.SGD(params, momentum=spec.momentum, nesterov=spec.nesterov, **common)
    if spec.kind == "adam":
        return torch.optim.Adam(params, betas=spec.betas, eps=spec.eps, **common)
    if spec.kind == "adamw":
        return torch.optim.AdamW(params, betas=spec.betas, eps=spec.eps, **common)
    if spec.kind == "rmsprop":
        return torch.optim.RMSprop(params, alpha=spec.alpha, eps=spec.eps, momentum=spec.momentum,
                                   centered=spec.centered, **common)
    raise ValueError(f"unknown optimizer kind {spec.kind!r}")


def loss_and_correct(out: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and number of correct predictions (0 for mse)."""
    if loss == "cross_entropy":
        out = out.reshape(len(out), -1)
        return F.cross_entropy(out, y), (out.argmax(1) == y).sum()
    out = out.reshape(y.shape)
    if loss == "binary_cross_entropy":
        return (F.binary_cross_entropy_with_logits(out, y),
                ((out > 0) == (y > 0.5)).float().mean(1).sum())
    return F.mse_loss(out, y), torch.zeros(())


class TorchTrainer(Trainer):
    """Eager training step; frozen BatchNorm in eval mode, frozen parameters never in the optimizer.

    The core reuses a trainer for later fits with the same spec and policy: :meth:`reset` reseeds and
    gives the optimizer fresh state, so each ``fit`` starts like a new one without rebuilding anything.
    """

    def __init__(self, module: nn.Module, frozen_bn: list[nn.Module], spec: TrainSpec,
                 to_module: Callable[[Any], tuple[tuple, dict]], device: torch.device):
        self.module, self.spec, self.to_module, self.device = module, spec, to_module, device
        self.frozen_bn = frozen_bn
        self.params = list({id(p): p for p in module.parameters() if p.requires_grad}.values())
        self.optimizer = build_optimizer(spec.optimizer, self.params) if self.params else None
        #: mixed precision: autocast's compute dtype, and a loss scaler for float16's narrow range
        self.autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(spec.precision)
        self.scaler = None
        self.reset(spec.seed)

    def reset(self, seed: int) -> None:
        """Prepare a new fit: seed dropout, clear optimizer state, set the training modes."""
        torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed seeds every device
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)  # the model's device only
        if self.optimizer is not None:
            self.optimizer.state.clear()
        if self.autocast is torch.float16 and self.optimizer is not None:
            self.scaler = torch.amp.GradScaler(self.device.type)
        train_mode(self.module, self.frozen_bn)

    def step(self, x: np.ndarray, y: np.ndarray):
        if not self.module.training:  # an inference call (e.g. validation) happened in between
            train_mode(self.module, self.frozen_bn)
        args, kwargs = self.to_module(x)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = primary_output(self.module(*args, **kwargs))
        yb = torch.from_numpy(y).to(self.device, non_blocking=True)
        loss, correct = loss_and_correct(out.float(), yb, self.spec.loss)  # the loss in float32
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip and step on the true gradients
            if self.spec.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.params, self.spec.clip_grad_norm, foreach=True)
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)  # skipped when a gradient overflowed
                self.scaler.update()
        return loss.detach() * len(y), correct

    def optimizer_state_bytes(self) -> int:
        if self.optimizer is None:
            return 0
        return sum(v.nbytes for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v))
