"""PyTorch eager: the loop a user would write by hand (frozen BN in eval, only the trained params
optimised), on the same network tlcore built."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tlcore.data import num_samples, take

from ..workloads import CLIP, LR, PARTIAL_UP_TO


class NativeRecipe:
    """The recipe by hand in PyTorch: AdamW with one param group per (layer-decay multiplier, decay),
    the cosine rate set on every group before every step, as a user would write it."""

    def __init__(self, model, total: int):
        from ..worker import recipe_optimizer

        spec = recipe_optimizer(model, total)
        self.net, self.schedule, self.step = model.native, spec.schedule, 0
        plan = {n: (m, wd) for n, _, m, wd in tl_groups(spec, model).entries}
        params = dict(model._params())
        groups = {}
        for name, p in params.items():
            groups.setdefault(plan[name], []).append(p)
        self.opt = torch.optim.AdamW([{"params": ps, "mult": m, "weight_decay": wd} for (m, wd), ps in groups.items()],
                                     lr=LR, foreach=True)

    def train_epoch(self, x, y: np.ndarray, batch: int) -> float:
        self.net.train()
        for i in range(0, num_samples(x), batch):
            lr = float(self.schedule.lr_at(self.step))
            for g in self.opt.param_groups:
                g["lr"] = lr * g["mult"]
            args, kwargs = to_torch(take(x, slice(i, i + batch)))
            loss = F.cross_entropy(logits(self.net(*args, **kwargs)), torch.from_numpy(y[i:i + batch]))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
        return float(loss.detach())


def tl_groups(spec, model):
    from tlcore.groups import plan_params

    return plan_params(spec, model)


def to_torch(x):
    """A batch as the network takes it: NHWC images to NCHW, or token arrays as keyword tensors."""
    if isinstance(x, dict):
        return (), {k: torch.from_numpy(v) for k, v in x.items()}
    return (torch.from_numpy(x).permute(0, 3, 1, 2),), {}


def logits(out):
    return out.logits if hasattr(out, "logits") else out


class Native:
    def __init__(self, model, mode: str):
        self.net, self.mode = model.native, mode
        head = model.head + "."
        frozen = mode in ("frozen", "frozen_clip", "partial")
        # "partial": the blocks after PARTIAL_UP_TO train too (tlcore's names and native paths agree
        # here but for the wrappers' "body" segments)
        trained = ()
        if mode == "partial":
            workload = "bert"
            last = int(PARTIAL_UP_TO[workload].rsplit(".", 1)[1])
            depth = len(model.native.body.body.bert.encoder.layer)
            trained = (*(f"bert.encoder.layer.{i}." for i in range(last + 1, depth)), "bert.pooler.")
        for name, p in self.net.named_parameters():
            plain = name.replace("body.", "")
            p.requires_grad_(not frozen or plain.startswith(head) or plain.startswith(trained))
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=LR, momentum=0.9, foreach=True)
        self.frozen_bn = [m for n, m in self.net.named_modules()
                          if frozen and isinstance(m, nn.modules.batchnorm._BatchNorm) and not n.startswith(head)]

    def train_epoch(self, x, y: np.ndarray, batch: int) -> float:
        self.net.train()
        for m in self.frozen_bn:
            m.eval()
        for i in range(0, num_samples(x), batch):
            args, kwargs = to_torch(take(x, slice(i, i + batch)))
            loss = F.cross_entropy(logits(self.net(*args, **kwargs)), torch.from_numpy(y[i:i + batch]))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.mode == "frozen_clip":
                nn.utils.clip_grad_norm_(self.params, CLIP, foreach=True)
            self.opt.step()
        return float(loss.detach())

    def train_loader(self, loader) -> float:
        """One epoch over a torch DataLoader of (NHWC image, label) batches."""
        self.net.train()
        for m in self.frozen_bn:
            m.eval()
        for xb, yb in loader:
            loss = F.cross_entropy(logits(self.net(xb.permute(0, 3, 1, 2))), yb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return float(loss.detach())

    def forward(self, x, batch: int) -> np.ndarray:
        self.net.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, num_samples(x), batch):
                args, kwargs = to_torch(take(x, slice(i, i + batch)))
                out.append(logits(self.net(*args, **kwargs)).numpy())
        return np.concatenate(out)

    def optimizer_state_bytes(self) -> int:
        return sum(v.nbytes for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v))
