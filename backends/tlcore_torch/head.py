"""Building a :class:`tlcore.HeadPlan` as an ``nn.Sequential`` named after ``Head.layers()``.

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


def build_head(plan: HeadPlan, values: dict[str, np.ndarray], nhwc: bool = False) -> nn.Sequential:
    """The head's layers, its dense weights set from ``values`` (PyTorch's layout, as ``nn.Linear``)."""
    spec, dense = plan.spec, {name: (i, o) for name, i, o in plan.dense_layers()}
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, kind in spec.layers():
        if kind == "pool":
            layers[name] = Pool(spec.pool, nhwc)
        elif kind == "dense":
            layers[name] = linear = torch.nn.utils.skip_init(nn.Linear, *dense[name])  # no RNG draw
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(values[f"{name}.weight"]))
                linear.bias.copy_(torch.from_numpy(values[f"{name}.bias"]))
        elif kind == "activation":
            layers[name] = ACTIVATIONS[spec.activation]()
        else:
            layers[name] = nn.Dropout(spec.dropout)
    return nn.Sequential(layers)
