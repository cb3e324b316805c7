"""The zoo's architectures in Flax NNX (see ``tlcore.zoo.archs``): NHWC inputs, PyTorch's names and
layouts (torchvision's ResNet, timm's ViT), so a zoo checkpoint loads on every backend.

The containers are :class:`~tlcore_jax.layers.NamedSequential` (named layers) and ``nnx.Sequential``
(numbered ones: ``layer1.0``, ``blocks.3``, ``downsample.1``), whose ``layers`` list tlcore leaves
out of names, and the layers are the ``Canonical*`` ones of :mod:`tlcore_jax.layers`.

Example:
    >>> import tlcore as tl                                                             # doctest: +SKIP
    >>> m = tl.zoo.create("resnet18", backend="jax", input_size=32, width=16)           # doctest: +SKIP
    >>> [n for n in m.state() if n.startswith("layer2.0.downsample")][:2]               # doctest: +SKIP
    ['layer2.0.downsample.0.weight', 'layer2.0.downsample.1.weight']
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import (ACTIVATIONS, CanonicalBatchNorm, CanonicalConv, CanonicalLayerNorm, CanonicalLinear,
                     NamedSequential, Pool)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pool, stride 2 (``nn.MaxPool2d(2)``)."""
    return nnx.max_pool(x, (2, 2), strides=(2, 2))


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """3x3 max pool, stride 2, padding 1 (ResNet's stem)."""
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def mlp(cfg: dict[str, Any]) -> NamedSequential:
    layers, width = [], cfg["in_features"]
    for i, h in enumerate(cfg["hidden"], 1):
        layers += [(f"fc{i}", CanonicalLinear(width, h)), (f"relu{i}", nnx.relu)]
        width = h
    return NamedSequential(layers + [("fc", CanonicalLinear(width, cfg["num_classes"]))])


def small_cnn(cfg: dict[str, Any]) -> NamedSequential:
    layers, width, n = [], cfg["in_channels"], len(cfg["widths"])
    for i, w in enumerate(cfg["widths"], 1):
        layers += [(f"conv{i}", CanonicalConv(width, w, 3, padding=1, use_bias=False)),
                   (f"bn{i}", CanonicalBatchNorm(w)), (f"relu{i}", nnx.relu)]
        if i < n:
            layers.append((f"mp{i}", max_pool_2x2))
        width = w
    return NamedSequential(layers + [("pool", Pool("avg")), ("fc", CanonicalLinear(width, cfg["num_classes"]))])


class BasicBlock(nnx.Module):
    """torchvision's ResNet BasicBlock (same variable names)."""

    def __init__(self, cin: int, cout: int, stride: int):
        self.conv1 = CanonicalConv(cin, cout, 3, stride, 1, use_bias=False)
        self.bn1 = CanonicalBatchNorm(cout)
        self.relu = nnx.relu
        self.conv2 = CanonicalConv(cout, cout, 3, 1, 1, use_bias=False)
        self.bn2 = CanonicalBatchNorm(cout)
        self.downsample = (nnx.Sequential(CanonicalConv(cin, cout, 1, stride, use_bias=False), CanonicalBatchNorm(cout))
                           if stride != 1 or cin != cout else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet18(cfg: dict[str, Any]) -> NamedSequential:
    w = cfg["width"]
    layers = [("conv1", CanonicalConv(cfg["in_channels"], w, 7, 2, 3, use_bias=False)), ("bn1", CanonicalBatchNorm(w)),
              ("relu", nnx.relu), ("maxpool", max_pool_3x3_s2)]
    cin = w
    for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2)), 1):
        layers.append((f"layer{i}", nnx.Sequential(BasicBlock(cin, w * mult, stride), BasicBlock(w * mult, w * mult, 1))))
        cin = w * mult
    return NamedSequential(layers + [("avgpool", Pool("avg")), ("fc", CanonicalLinear(cin, cfg["num_classes"]))])


class PatchEmbed(CanonicalConv):
    """p x p convolution with stride p, returning tokens (N, h*w, dim) in row-major order."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        return y.reshape(y.shape[0], -1, y.shape[-1])


class Embed(nnx.Module):
    """Prepends the class token and adds the position embedding."""

    def __init__(self, tokens: int, dim: int):
        self.cls_token = nnx.Param(jnp.zeros((1, 1, dim)))
        self.pos_embed = nnx.Param(jnp.zeros((1, tokens + 1, dim)))

    def __call__(self, x: jax.Array) -> jax.Array:
        cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1]))
        return jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]


class Attention(nnx.Module):
    def __init__(self, dim: int, heads: int):
        self.heads = heads
        self.qkv, self.proj = CanonicalLinear(dim, 3 * dim), CanonicalLinear(dim, dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = jax.nn.softmax(q @ k.swapaxes(-1, -2) / (d // self.heads) ** 0.5, axis=-1)
        return self.proj((weights @ v).transpose(0, 2, 1, 3).reshape(n, t, d))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int):
        self.fc1, self.fc2 = CanonicalLinear(dim, hidden), CanonicalLinear(hidden, dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS["gelu"](self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm transformer block (timm's ViT names)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        self.norm1, self.attn = CanonicalLayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = CanonicalLayerNorm(dim, eps=1e-6), Mlp(dim, dim * mlp_ratio)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def class_token(x: jax.Array) -> jax.Array:
    """The class token's features (ViT's pooling)."""
    return x[:, 0]


def vit_tiny(cfg: dict[str, Any]) -> NamedSequential:
    dim, p = cfg["dim"], cfg["patch_size"]
    tokens = (cfg["image_size"] // p) ** 2
    return NamedSequential(
        patch_embed=PatchEmbed(cfg["in_channels"], dim, p, stride=p),
        embed=Embed(tokens, dim),
        blocks=nnx.Sequential(*[Block(dim, cfg["heads"], cfg["mlp_ratio"]) for _ in range(cfg["depth"])]),
        norm=CanonicalLayerNorm(dim, eps=1e-6), pool=class_token, fc=CanonicalLinear(dim, cfg["num_classes"]))


BUILDERS = {"mlp": mlp, "small_cnn": small_cnn, "resnet18": resnet18, "vit_tiny": vit_tiny}
