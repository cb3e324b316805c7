"""The zoo's architectures in PyTorch (see ``tlcore.zoo.archs``): torchvision/timm names and layouts.

Modules compute in NCHW; :class:`tlcore_torch.model.TorchModel` converts the zoo's NHWC numpy input.
BatchNorm layers carry no ``num_batches_tracked`` counter (Keras and Flax have none), so the
``state()`` keys are the same on every backend.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any


from ._torch import torch, nn, F
from .head import Pool


def batchnorm(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
    bn.register_buffer("num_batches_tracked", None)  # BatchNorm skips the counter when it is None
    return bn


def mlp(cfg: dict[str, Any]) -> nn.Sequential:
    layers, width = OrderedDict(), cfg["in_features"]
    for i, h in enumerate(cfg["hidden"], 1):
        layers[f"fc{i}"], layers[f"relu{i}"], width = nn.Linear(width, h), nn.ReLU(), h
    layers["fc"] = nn.Linear(width, cfg["num_classes"])
    return nn.Sequential(layers)


def small_cnn(cfg: dict[str, Any]) -> nn.Sequential:
    layers, width, n = OrderedDict(), cfg["in_channels"], len(cfg["widths"])
    for i, w in enumerate(cfg["widths"], 1):
        layers[f"conv{i}"] = nn.Conv2d(width, w, 3, padding=1, bias=False)
        layers[f"bn{i}"], layers[f"relu{i}"], width = batchnorm(w), nn.ReLU(), w
        if i < n:
            layers[f"mp{i}"] = nn.MaxPool2d(2)
    layers["pool"], layers["fc"] = Pool("avg"), nn.Linear(width, cfg["num_classes"])
    return nn.Sequential(layers)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (same parameter names)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = batchnorm(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = batchnorm(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), batchnorm(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet18(cfg: dict[str, Any]) -> nn.Sequential:
    w = cfg["width"]
    layers = OrderedDict(conv1=nn.Conv2d(cfg["in_channels"], w, 7, 2, 3, bias=False), bn1=batchnorm(w),
                         relu=nn.ReLU(), maxpool=nn.MaxPool2d(3, 2, 1))
    cin = w
    for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2)), 1):
        layers[f"layer{i}"] = nn.Sequential(BasicBlock(cin, w * mult, stride), BasicBlock(w * mult, w * mult, 1))
        cin = w * mult
    layers["avgpool"], layers["fc"] = Pool("avg"), nn.Linear(cin, cfg["num_classes"])
    return nn.Sequential(layers)


class PatchEmbed(nn.Conv2d):
    """p x p convolution with stride p, returning tokens (N, h*w, dim) in row-major order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).flatten(2).transpose(1, 2)


class Embed(nn.Module):
    """Prepends the class token and adds the position embedding."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm's ViT names)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClsPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def vit_tiny(cfg: dict[str, Any]) -> nn.Sequential:
    dim, p = cfg["dim"], cfg["patch_size"]
    tokens = (cfg["image_size"] // p) ** 2
    return nn.Sequential(OrderedDict(
        patch_embed=PatchEmbed(cfg["in_channels"], dim, p, stride=p),
        embed=Embed(tokens, dim),
        blocks=nn.Sequential(*[Block(dim, cfg["heads"], cfg["mlp_ratio"]) for _ in range(cfg["depth"])]),
        norm=nn.LayerNorm(dim, eps=1e-6), pool=ClsPool(), fc=nn.Linear(dim, cfg["num_classes"])))


BUILDERS = {"mlp": mlp, "small_cnn": small_cnn, "resnet18": resnet18, "vit_tiny": vit_tiny}
