"""PyTorch eager: the loop a user would write by hand (frozen BN in eval, only head params optimised)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..workloads import CLIP, LR


class Native:
    def __init__(self, model, mode: str):
        self.net, self.mode = model.native, mode
        head = model.head + "."
        frozen = mode in ("frozen", "frozen_clip")
        for name, p in self.net.named_parameters():
            p.requires_grad_(not frozen or name.startswith(head))
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=LR, momentum=0.9, foreach=True)
        self.frozen_bn = [m for n, m in self.net.named_modules()
                          if frozen and isinstance(m, nn.modules.batchnorm._BatchNorm) and not n.startswith(head)]

    def train_epoch(self, x: np.ndarray, y: np.ndarray, batch: int) -> float:
        self.net.train()
        for m in self.frozen_bn:
            m.eval()
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(x[i:i + batch]).permute(0, 3, 1, 2)
            loss = F.cross_entropy(self.net(xb), torch.from_numpy(y[i:i + batch]))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.mode == "frozen_clip":
                nn.utils.clip_grad_norm_(self.params, CLIP, foreach=True)
            self.opt.step()
        return float(loss.detach())

    def forward(self, x: np.ndarray, batch: int) -> np.ndarray:
        self.net.eval()
        with torch.inference_mode():
            return np.concatenate([self.net(torch.from_numpy(x[i:i + batch]).permute(0, 3, 1, 2)).numpy()
                                   for i in range(0, len(x), batch)])

    def optimizer_state_bytes(self) -> int:
        return sum(v.nbytes for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v))
