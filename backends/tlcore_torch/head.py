"""Building a :class:`tlcore.HeadPlan` as a :class:`HeadModule` whose children are named after
``Head.layers()``; its :class:`Pool` takes the attention mask of token features.

Example:
    >>> head = build_head(HeadPlan(tl.Head.linear(5), width=16), values)   # doctest: +SKIP
    >>> [n for n, _ in head.named_children()]                             # doctest: +SKIP
    ['pool', 'out']
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from tlcore.head import HeadPlan

from ._torch import nn, torch

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Pool(nn.Module):
    """A head's pooling (see ``tlcore.head.POOLS`` and ``pool_reference``) of 4-D (N, C, H, W)
    features or 3-D (N, tokens, D) token features; 2-D features pass through."""

    def __init__(self, mode: str = "avg", nhwc: bool = False):
        super().__init__()
        self.mode, self.nhwc = mode, nhwc

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim <= 2:
            return x
        if self.mode == "flatten":  # flatten in the numpy layout's order, so heads are portable
            return (x.permute(0, 2, 3, 1) if self.nhwc and x.ndim == 4 else x).flatten(1)
        if x.ndim == 3:
            return token_pool(x, self.mode, mask)
        dims = tuple(range(2, x.ndim))
        return x.amax(dim=dims) if self.mode == "max" else x.mean(dim=dims)

    def extra_repr(self) -> str:
        return self.mode


def token_pool(x: torch.Tensor, mode: str, mask: torch.Tensor | None) -> torch.Tensor:
    """Pool (N, T, D) token features over T, keeping only the tokens ``mask`` (N, T) marks."""
    if mode == "cls":
        return x[:, 0]
    if mask is None or mode == "avg":
        if mode == "last":
            return x[:, -1]
        return x.amax(dim=1) if mode == "max" else x.mean(dim=1)
    keep = mask.to(torch.bool)
    if mode == "last":
        idx = x.shape[1] - 1 - keep.flip(1).to(torch.int64).argmax(dim=1)
        return x[torch.arange(len(x), device=x.device), idx]
    if mode == "max":
        return x.masked_fill(~keep[..., None], torch.finfo(x.dtype).min).amax(dim=1)
    w = keep.to(x.dtype)[..., None]
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


class HeadModule(nn.Module):
    """The head's layers (``pool``, ``fc0``, ..., ``out``) applied in order; ``mask`` reaches the pool."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.children():
            x = layer(x, mask) if isinstance(layer, Pool) else layer(x)
        return x

    def after_pool(self) -> nn.Sequential:
        """The layers after the pool, sharing their weights (what trains on cached, pooled features)."""
        return nn.Sequential(OrderedDict((n, m) for n, m in self.named_children() if not isinstance(m, Pool)))


def build_head(plan: HeadPlan, values: dict[str, np.ndarray], nhwc: bool = False) -> HeadModule:
    """The head's layers, its dense weights set from ``values`` (PyTorch's layout, as ``nn.Linear``)."""
    spec, dense = plan.spec, {name: (i, o) for name, i, o in plan.dense_layers()}
    head = HeadModule()
    for name, kind in spec.layers():
        if kind == "pool":
            layer = Pool(spec.pool, nhwc)
        elif kind == "dense":
            layer = torch.nn.utils.skip_init(nn.Linear, *dense[name])  # no draw from torch's generator
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(values[f"{name}.weight"]))
                layer.bias.copy_(torch.from_numpy(values[f"{name}.bias"]))
        elif kind == "activation":
            layer = ACTIVATIONS[spec.activation]()
        else:
            layer = nn.Dropout(spec.dropout)
        head.add_module(name, layer)
    return head
