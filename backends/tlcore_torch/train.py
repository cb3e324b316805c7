"""The PyTorch training step: the optimizer spec translated once, frozen tensors left out."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tlcore.backend import Trainer
from tlcore.losses import LossSpec
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


def weighted_loss(out: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """``spec``'s weighted mean loss (see ``tlcore.backend.Trainer.step``): PyTorch's own losses with
    ``reduction="none"``, then ``sum(w * l) / sum(w * d)``."""
    d = None
    if spec.kind == "cross_entropy":
        logits = out.reshape(len(out), -1)
        cw = spec.class_weights(logits.shape[1])
        weight = None if cw is None else torch.as_tensor(cw, dtype=logits.dtype, device=logits.device)
        per = F.cross_entropy(logits, y, weight=weight, label_smoothing=spec.label_smoothing, reduction="none")
        if weight is not None and y.ndim == 1:
            d = weight[y]
    else:
        z = out.reshape(y.shape)
        if spec.kind == "binary_cross_entropy":
            pw = spec.pos_weights(y.shape[1])
            pw = None if pw is None else torch.as_tensor(pw, dtype=z.dtype, device=z.device)
            per = F.binary_cross_entropy_with_logits(z, y, pos_weight=pw, reduction="none")
        elif spec.kind == "huber":
            per = F.huber_loss(z, y, delta=spec.delta, reduction="none")
        else:
            per = F.mse_loss(z, y, reduction="none")
        per = per.reshape(len(per), -1).mean(dim=1)
    if w is None and d is None:
        return per.mean()
    s = torch.ones_like(per) if w is None else w.to(per.dtype)
    return (s * per).sum() / (s * (torch.ones_like(per) if d is None else d)).sum()


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

    def step(self, x: Any, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        if not self.module.training:  # an inference call (e.g. validation) happened in between
            train_mode(self.module, self.frozen_bn)
        args, kwargs = self.to_module(x)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = primary_output(self.module(*args, **kwargs))
        yb = torch.from_numpy(y).to(self.device, non_blocking=True)
        wb = None if w is None else torch.from_numpy(w).to(self.device, non_blocking=True)
        out = out.float()  # the loss in float32
        loss = weighted_loss(out, yb, wb, self.spec.loss)
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
        return out.detach().cpu().numpy()

    def optimizer_state_bytes(self) -> int:
        if self.optimizer is None:
            return 0
        return sum(v.nbytes for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v))
