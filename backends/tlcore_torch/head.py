"""Building a :class:`tlcore.Head` as an ``nn.Sequential`` named after ``Head.layers()``."""
from __future__ import annotations

from collections import OrderedDict


from ._torch import torch, nn
from tlcore.head import Head

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Pool(nn.Module):
    """Global average (or flatten) of 4-D (N, C, H, W) and 3-D (N, tokens, D) features."""

    def __init__(self, mode: str = "avg", nhwc: bool = False):
        super().__init__()
        self.mode, self.nhwc = mode, nhwc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim <= 2:
            return x
        if self.mode == "flatten":  # flatten in the numpy layout's order, so heads are portable
            return (x.permute(0, 2, 3, 1) if self.nhwc and x.ndim == 4 else x).flatten(1)
        return x.mean(dim=(2, 3)) if x.ndim == 4 else x.mean(dim=1)

    def extra_repr(self) -> str:
        return self.mode


def build_head(head: Head, in_features: int, nhwc: bool = False) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = in_features
    hidden = iter(head.hidden)
    for name, kind in head.layers():
        if kind == "pool":
            layers[name] = Pool(head.pool, nhwc)
        elif kind == "dense":
            out = head.num_classes if name == "out" else next(hidden)
            layers[name] = nn.Linear(width, out)
            width = out
        elif kind == "activation":
            layers[name] = ACTIVATIONS[head.activation]()
        else:
            layers[name] = nn.Dropout(head.dropout)
    return nn.Sequential(layers)
