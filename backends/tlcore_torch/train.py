"""The PyTorch training step: the optimizer spec translated once, frozen tensors left out."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np

from tlcore.backend import Trainer
from tlcore.losses import LossSpec
from tlcore.optim import TrainSpec
from tlcore.schedules import Schedule

from ._torch import F, nn, torch
from .cut import primary_output
from .freeze import train_mode


def build_optimizer(spec: TrainSpec, params: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    """``torch.optim`` for ``spec`` over the given (trainable) parameters only (so only they get state
    and decay), one param group per (lr multiplier, weight decay); each group keeps its ``mult``."""
    opt, rates = spec.optimizer, spec.rates()
    groups: dict[tuple[float, float], list] = {}
    for name, p in params.items():
        groups.setdefault(rates.get(name, (1.0, opt.weight_decay)), []).append(p)
    base = float(opt.schedule.lr_at(0))
    param_groups = [{"params": ps, "lr": base * m, "weight_decay": wd, "mult": m} for (m, wd), ps in groups.items()]
    common = dict(lr=base, foreach=True)
    if opt.kind == "sgd":
        return torch.optim.SGD(param_groups, momentum=opt.momentum, nesterov=opt.nesterov, **common)
    if opt.kind == "adam":
        return torch.optim.Adam(param_groups, betas=opt.betas, eps=opt.eps, **common)
    if opt.kind == "adamw":
        return torch.optim.AdamW(param_groups, betas=opt.betas, eps=opt.eps, **common)
    if opt.kind == "rmsprop":
        return torch.optim.RMSprop(param_groups, alpha=opt.alpha, eps=opt.eps, momentum=opt.momentum,
                                   centered=opt.centered, **common)
    raise ValueError(f"unknown optimizer kind {opt.kind!r}")


#: the state torch keeps per parameter, besides its step count
SLOTS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "square_avg", "grad_avg")


def denominators(y: torch.Tensor, spec: LossSpec, classes: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``d_i`` of the weighted mean (see ``tlcore.backend.Trainer.step``): the class weight of each
    integer label under cross entropy with class weights; None where every ``d_i`` is 1."""
    if spec.kind != "cross_entropy" or y.ndim != 1:
        return None
    cw = spec.class_weights(classes)
    return None if cw is None else torch.as_tensor(cw, dtype=dtype, device=y.device)[y]


def loss_terms(out: torch.Tensor, y: torch.Tensor, spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-sample losses ``l_i`` (PyTorch's own losses with ``reduction="none"``; the mean over
    outputs for binary cross entropy, MSE and Huber) and the ``d_i`` (:func:`denominators`)."""
    if spec.kind == "cross_entropy":
        logits = out.reshape(len(out), -1)
        cw = spec.class_weights(logits.shape[1])
        weight = None if cw is None else torch.as_tensor(cw, dtype=logits.dtype, device=logits.device)
        per = F.cross_entropy(logits, y, weight=weight, label_smoothing=spec.label_smoothing, reduction="none")
        return per, None if weight is None or y.ndim != 1 else weight[y]
    z = out.reshape(y.shape)
    if spec.kind == "binary_cross_entropy":
        pw = spec.pos_weights(y.shape[1])
        pw = None if pw is None else torch.as_tensor(pw, dtype=z.dtype, device=z.device)
        per = F.binary_cross_entropy_with_logits(z, y, pos_weight=pw, reduction="none")
    elif spec.kind == "huber":
        per = F.huber_loss(z, y, delta=spec.delta, reduction="none")
    else:
        per = F.mse_loss(z, y, reduction="none")
    return per.reshape(len(per), -1).mean(dim=1), None


def fused_mean(spec: LossSpec, w: torch.Tensor | None, classes: int) -> bool:
    """True when the loss is plain cross entropy's mean (no sample or class weights): one fused call."""
    return spec.kind == "cross_entropy" and w is None and spec.class_weights(classes) is None


def weighted_loss(out: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, spec: LossSpec) -> torch.Tensor:
    """``spec``'s weighted mean loss (see ``tlcore.backend.Trainer.step``): PyTorch's own losses with
    ``reduction="none"``, then ``sum(w * l) / sum(w * d)``."""
    if fused_mean(spec, w, out.reshape(len(out), -1).shape[1]):  # the common case, in one fused call
        return F.cross_entropy(out.reshape(len(out), -1), y, label_smoothing=spec.label_smoothing)
    per, d = loss_terms(out, y, spec)
    if w is None and d is None:
        return per.mean()
    s = torch.ones_like(per) if w is None else w.to(per.dtype)
    return (s * per).sum() / (s * (torch.ones_like(per) if d is None else d)).sum()


class TorchTrainer(Trainer):
    """Eager training step; frozen BatchNorm in eval mode, frozen parameters never in the optimizer.

    Args:
        module: the model's ``nn.Module``.
        frozen_bn: BatchNorm layers that run in inference mode while training.
        params: ``{tensor name: parameter}`` of the trainable parameters.
        rng: where the torch generators' state is kept between fits (the model's), so that a run that
            continues draws the dropout masks it would have drawn.
    """

    def __init__(self, module: nn.Module, frozen_bn: list[nn.Module], spec: TrainSpec,
                 to_module: Callable[[Any], tuple[tuple, dict]], device: torch.device,
                 params: dict[str, nn.Parameter], rng: dict):
        self.module, self.spec, self.to_module, self.device = module, spec, to_module, device
        self.frozen_bn, self.named, self.rng = frozen_bn, dict(params), rng
        self.params = list(self.named.values())
        self.optimizer = build_optimizer(spec, self.named) if self.params else None
        #: mixed precision: autocast's compute dtype, and a loss scaler for float16's narrow range
        self.autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(spec.precision)
        self.scaler = None
        self.steps = dict.fromkeys(self.named, 0)
        self.constant_lr = None if isinstance(spec.optimizer.lr, Schedule) else float(spec.optimizer.lr)
        #: state the forward pass writes (running statistics of the BatchNorm layers that train),
        #: restored after a step the guard refuses
        frozen = {id(m) for m in frozen_bn}
        self.written = [b for m in module.modules() if id(m) not in frozen and getattr(m, "track_running_stats", False)
                        for b in m.buffers(recurse=False)]
        self._backup: list[torch.Tensor] | None = None

    def reset(self, seed: int) -> None:
        """A new run: seed dropout, clear the optimizer state, set the training modes."""
        torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed seeds every device
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)  # the model's device only
        if self.optimizer is not None:
            self.optimizer.state.clear()
        if self.autocast is torch.float16 and self.optimizer is not None:
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.steps = dict.fromkeys(self.named, 0)
        self.compilations, self.nonfinite = 0, None
        train_mode(self.module, self.frozen_bn)

    def resume(self) -> None:
        """Continue: the generators as the last fit left them (parameters are live: nothing to read)."""
        if "cpu" in self.rng:
            torch.default_generator.set_state(self.rng["cpu"])
        if "cuda" in self.rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(self.rng["cuda"], self.device)
        if self.autocast is torch.float16 and self.optimizer is not None and self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.compilations, self.nonfinite = 0, None
        train_mode(self.module, self.frozen_bn)

    def finish(self) -> None:
        self.rng["cpu"] = torch.default_generator.get_state()
        if self.device.type == "cuda":
            self.rng["cuda"] = torch.cuda.get_rng_state(self.device)

    def step(self, x: Any, y: np.ndarray, w: np.ndarray | None = None, lr: float | None = None) -> np.ndarray:
        if not self.module.training:  # an inference call (e.g. validation) happened in between
            train_mode(self.module, self.frozen_bn)
        lr = self.constant_lr if lr is None else lr
        if lr is not None and self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["mult"]
        backup = None
        if self.spec.guard:  # the statistics this step's forward writes, copied in one call
            if self.written:
                if self._backup is None:
                    self._backup = [torch.empty_like(b) for b in self.written]
                torch._foreach_copy_(self._backup, self.written)
            backup = self._backup or []
        out, loss = self._forward_loss(x, y, w)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip and step on the true gradients
        clipped, norm = False, None
        if self.optimizer is not None and self.scaler is None:  # the norm serves the clipping and the guard
            if self.spec.clip_grad_norm is not None:
                norm, clipped = nn.utils.clip_grad_norm_(self.params, self.spec.clip_grad_norm, foreach=True), True
            elif backup is not None:
                grads = [p.grad for p in self.params if p.grad is not None]
                norm = nn.utils.get_total_norm(grads, foreach=True) if grads else None
        if backup is not None:
            bad = self.nonfinite or self._nonfinite_now(loss, norm)
            if bad is not None:  # the step changes nothing: statistics back, no update
                if self.written:
                    torch._foreach_copy_(self.written, backup)
                if self.optimizer is not None:
                    self.optimizer.zero_grad(set_to_none=True)
                self.nonfinite = bad
                return self._outputs(out)
        if self.optimizer is not None:
            if self.spec.clip_grad_norm is not None and not clipped:
                nn.utils.clip_grad_norm_(self.params, self.spec.clip_grad_norm, foreach=True)
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)  # skipped when a gradient overflowed
                self.scaler.update()
            for name in self.steps:
                self.steps[name] += 1
        return self._outputs(out)

    def _forward_loss(self, x: Any, y: np.ndarray, w: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training forward pass on batch ``x`` (its outputs in float32) and the loss to minimise."""
        args, kwargs = self.to_module(x)
        with self.precision():
            out = primary_output(self.module(*args, **kwargs))
        yb = torch.from_numpy(y).to(self.device, non_blocking=True)
        wb = None if w is None else torch.from_numpy(w).to(self.device, non_blocking=True)
        out = out.float()  # the loss in float32
        return out, weighted_loss(out, yb, wb, self.spec.loss)

    def precision(self) -> contextlib.AbstractContextManager:
        """The forward pass's mixed-precision context: torch autocast, or nothing in float32 (an
        inactive autocast still costs its enter and exit on every step)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _nonfinite_now(self, loss: torch.Tensor, norm: torch.Tensor | None) -> str | None:
        """What makes this step non-finite (see :meth:`_first_nonfinite`), or None."""
        total = loss.detach() if norm is None else loss.detach() + norm  # one check, one sync when finite
        return None if bool(torch.isfinite(total)) else self._first_nonfinite(loss)

    def _outputs(self, out: torch.Tensor) -> np.ndarray:
        """What :meth:`step` returns for the forward pass's outputs ``out``."""
        return out.detach().cpu().numpy()

    def _first_nonfinite(self, loss: torch.Tensor) -> str | None:
        """``"loss"``, the name of the first parameter whose gradient is not finite, or None. Under
        float16 an overflowing gradient is the loss scaler's business (it skips the step and lowers
        the scale), so only the loss is checked there."""
        if not bool(torch.isfinite(loss)):
            return "loss"
        return self._first_nonfinite_grad()

    def _first_nonfinite_grad(self) -> str | None:
        """The name of the first parameter whose gradient is not finite (None under float16's loss
        scaler, or when there is none)."""
        if self.scaler is not None or self.optimizer is None:
            return None
        # None when every gradient is finite and only their norm overflowed
        return next((name for name, p in self.named.items()
                     if p.grad is not None and not bool(p.grad.isfinite().all())), None)

    def export_state(self) -> dict:
        slots = {}
        for name, p in self.named.items():
            state = {} if self.optimizer is None else self.optimizer.state.get(p, {})
            slots[name] = {k: v.detach().cpu().numpy().copy() for k, v in state.items()
                           if k in SLOTS and torch.is_tensor(v)}
        return {"slots": slots, "steps": dict(self.steps)}

    def import_state(self, state: dict) -> None:
        if self.optimizer is None:
            return
        for name, p in self.named.items():
            self.optimizer.state.pop(p, None)
            self.steps[name] = 0
            slots = state["slots"].get(name)
            if not slots:
                continue  # just unfrozen: zero state, as a new param group
            new = {k: torch.from_numpy(np.array(v, copy=True)).to(p.device) for k, v in slots.items()}
            if self.spec.optimizer.kind in ("adam", "adamw", "rmsprop"):
                new["step"] = torch.tensor(float(state["steps"].get(name, 0)))
            self.optimizer.state[p] = new
            self.steps[name] = int(state["steps"].get(name, 0))

    def applied_lr(self) -> dict[str, float]:
        if self.optimizer is None:
            return {}
        by_param = {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
        return {name: by_param[id(p)] for name, p in self.named.items()}

    def optimizer_state_bytes(self) -> int:
        if self.optimizer is None:
            return 0
        return sum(v.nbytes for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v))
