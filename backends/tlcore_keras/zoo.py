"""The zoo's architectures in Keras (see ``tlcore.zoo.archs``), NHWC, with PyTorch's layer names.

The layers compute exactly what the PyTorch definitions compute: convolutions and max pools pad
symmetrically as PyTorch does (Keras' ``"same"`` pads more at the end when striding), BatchNorm has
eps 1e-5 and momentum 0.9 (PyTorch's 0.1), LayerNorm eps 1e-6, GELU is exact. A
:class:`tlcore_keras.model.KerasModel` built with ``canonical=True`` reports their weights under
PyTorch's names and layouts (``conv1.weight`` as ``(out, in, kh, kw)``, ``bn1.running_var``...).

Example:
    >>> m = tl.zoo.create("resnet18", backend="keras", input_size=32, width=16)   # doctest: +SKIP
    >>> m.layers[:6]                                                             # doctest: +SKIP
    ['conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer1.0']
"""
from __future__ import annotations

from typing import Any

from ._keras import keras

layers = keras.layers
ops = keras.ops
serializable = keras.saving.register_keras_serializable(package="tlcore")


def batchnorm(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


@serializable
class PaddedConv2D(layers.Conv2D):
    """``Conv2D`` with PyTorch's symmetric zero padding ``torch_padding`` on both spatial sides."""

    def __init__(self, *args, torch_padding: int = 0, **kwargs):
        kwargs["padding"] = "valid"
        super().__init__(*args, **kwargs)
        self.torch_padding = int(torch_padding)

    def _pad(self, x):
        p = self.torch_padding
        return ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]]) if p else x

    def call(self, x):
        return super().call(self._pad(x))

    def compute_output_shape(self, input_shape):
        p = 2 * self.torch_padding
        grow = lambda d: None if d is None else d + p  # noqa: E731
        return super().compute_output_shape((input_shape[0], grow(input_shape[1]), grow(input_shape[2]),
                                             input_shape[3]))

    def get_config(self) -> dict:
        return {**super().get_config(), "torch_padding": self.torch_padding}


@serializable
class TorchMaxPool2D(layers.Layer):
    """PyTorch's ``MaxPool2d(pool, stride, padding)``: pads with -inf, then pools without padding."""

    def __init__(self, pool: int, stride: int, padding: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.pool, self.stride, self.padding = int(pool), int(stride), int(padding)

    def call(self, x):
        p = self.padding
        if p:
            x = ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]], constant_values=float("-inf"))
        return ops.max_pool(x, self.pool, self.stride, padding="valid")

    def compute_output_shape(self, input_shape):
        size = lambda d: None if d is None else (d + 2 * self.padding - self.pool) // self.stride + 1  # noqa: E731
        return (input_shape[0], size(input_shape[1]), size(input_shape[2]), input_shape[3])

    def get_config(self) -> dict:
        return {**super().get_config(), "pool": self.pool, "stride": self.stride, "padding": self.padding}


@serializable
class BasicBlock(layers.Layer):
    """torchvision's ResNet BasicBlock (sub-layers named ``conv1, bn1, relu, conv2, bn2, downsample``)."""

    def __init__(self, cin: int, cout: int, stride: int, **kwargs):
        super().__init__(**kwargs)
        self.cin, self.cout, self.stride = int(cin), int(cout), int(stride)
        self.conv1 = PaddedConv2D(cout, 3, strides=stride, torch_padding=1, use_bias=False, name="conv1")
        self.bn1 = batchnorm("bn1")
        self.relu = layers.ReLU(name="relu")
        self.conv2 = PaddedConv2D(cout, 3, torch_padding=1, use_bias=False, name="conv2")
        self.bn2 = batchnorm("bn2")
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = keras.Sequential([layers.Conv2D(cout, 1, strides=stride, use_bias=False, name="0"),
                                                batchnorm("1")], name="downsample")

    def build(self, input_shape):
        self.conv1.build(input_shape)
        inner = self.conv1.compute_output_shape(input_shape)
        for layer in (self.bn1, self.conv2, self.bn2):
            layer.build(inner)
        if self.downsample is not None:
            self.downsample.build(input_shape)

    def call(self, x, training=None):
        out = self.relu(self.bn1(self.conv1(x), training=training))
        out = self.bn2(self.conv2(out), training=training)
        skip = x if self.downsample is None else self.downsample(x, training=training)
        return self.relu(out + skip)

    def compute_output_shape(self, input_shape):
        return self.conv1.compute_output_shape(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "cin": self.cin, "cout": self.cout, "stride": self.stride}


@serializable
class PatchEmbed(layers.Conv2D):
    """A p x p convolution with stride p, returning (N, h * w, dim) tokens in row-major order."""

    def call(self, x):
        out = super().call(x)
        return ops.reshape(out, (-1, out.shape[1] * out.shape[2], out.shape[3]))

    def compute_output_shape(self, input_shape):
        n, h, w, c = super().compute_output_shape(input_shape)
        return (n, None if h is None or w is None else h * w, c)


@serializable
class Embed(layers.Layer):
    """Prepends ``cls_token`` and adds ``pos_embed`` (shapes (1, 1, dim) and (1, tokens + 1, dim))."""

    def build(self, input_shape):
        _, tokens, dim = input_shape
        self.cls_token = self.add_weight(shape=(1, 1, dim), initializer="zeros", name="cls_token")
        self.pos_embed = self.add_weight(shape=(1, tokens + 1, dim), initializer="zeros", name="pos_embed")

    def call(self, x):
        cls = ops.broadcast_to(ops.cast(self.cls_token, x.dtype), (ops.shape(x)[0], 1, x.shape[-1]))
        return ops.concatenate([cls, x], axis=1) + self.pos_embed

    def compute_output_shape(self, input_shape):
        n, t, d = input_shape
        return (n, None if t is None else t + 1, d)


@serializable
class Attention(layers.Layer):
    """Multi-head self-attention with one ``qkv`` projection and an output ``proj`` (timm's layout)."""

    def __init__(self, dim: int, heads: int, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads = int(dim), int(heads)
        self.qkv = layers.Dense(3 * dim, name="qkv")
        self.proj = layers.Dense(dim, name="proj")

    def build(self, input_shape):
        self.qkv.build(input_shape)
        self.proj.build(input_shape)

    def call(self, x):
        t, d, h = x.shape[1], self.dim, self.heads
        qkv = ops.transpose(ops.reshape(self.qkv(x), (-1, t, 3, h, d // h)), (2, 0, 3, 1, 4))
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / ops.sqrt(ops.cast(d // h, x.dtype))
        out = ops.matmul(ops.softmax(scores, axis=-1), v)
        return self.proj(ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (-1, t, d)))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "dim": self.dim, "heads": self.heads}


@serializable
class Mlp(layers.Layer):
    """``fc1``, exact GELU (``act``), ``fc2``."""

    def __init__(self, dim: int, hidden: int, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.hidden = int(dim), int(hidden)
        self.fc1 = layers.Dense(hidden, name="fc1")
        self.act = layers.Activation("gelu", name="act")  # Keras' gelu is exact (approximate=False)
        self.fc2 = layers.Dense(dim, name="fc2")

    def build(self, input_shape):
        self.fc1.build(input_shape)
        self.fc2.build((*input_shape[:-1], self.hidden))

    def call(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "dim": self.dim, "hidden": self.hidden}


@serializable
class Block(layers.Layer):
    """Pre-norm transformer block (timm's names: ``norm1, attn, norm2, mlp``)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads, self.mlp_ratio = int(dim), int(heads), int(mlp_ratio)
        self.norm1 = layers.LayerNormalization(epsilon=1e-6, name="norm1")
        self.attn = Attention(dim, heads, name="attn")
        self.norm2 = layers.LayerNormalization(epsilon=1e-6, name="norm2")
        self.mlp = Mlp(dim, dim * mlp_ratio, name="mlp")

    def build(self, input_shape):
        for layer in (self.norm1, self.attn, self.norm2, self.mlp):
            layer.build(input_shape)

    def call(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "dim": self.dim, "heads": self.heads, "mlp_ratio": self.mlp_ratio}


@serializable
class ClsPool(layers.Layer):
    """The class token: ``x[:, 0]``."""

    def call(self, x):
        return x[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


def mlp(cfg: dict[str, Any]) -> keras.Model:
    seq = [keras.Input((cfg["in_features"],))]
    for i, h in enumerate(cfg["hidden"], 1):
        seq += [layers.Dense(h, name=f"fc{i}"), layers.ReLU(name=f"relu{i}")]
    return keras.Sequential(seq + [layers.Dense(cfg["num_classes"], name="fc")], name="mlp")


def small_cnn(cfg: dict[str, Any]) -> keras.Model:
    n = len(cfg["widths"])
    seq = [keras.Input((None, None, cfg["in_channels"]))]  # any image size, as in PyTorch
    for i, w in enumerate(cfg["widths"], 1):
        seq += [layers.Conv2D(w, 3, padding="same", use_bias=False, name=f"conv{i}"), batchnorm(f"bn{i}"),
                layers.ReLU(name=f"relu{i}")]
        if i < n:
            seq.append(layers.MaxPooling2D(2, name=f"mp{i}"))
    seq += [layers.GlobalAveragePooling2D(name="pool"), layers.Dense(cfg["num_classes"], name="fc")]
    return keras.Sequential(seq, name="small_cnn")


def resnet18(cfg: dict[str, Any]) -> keras.Model:
    w = cfg["width"]
    seq = [keras.Input((None, None, cfg["in_channels"])),  # any image size, as in PyTorch
           PaddedConv2D(w, 7, strides=2, torch_padding=3, use_bias=False, name="conv1"), batchnorm("bn1"),
           layers.ReLU(name="relu"), TorchMaxPool2D(3, 2, 1, name="maxpool")]
    cin = w
    for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2)), 1):
        seq.append(keras.Sequential([BasicBlock(cin, w * mult, stride, name="0"),
                                     BasicBlock(w * mult, w * mult, 1, name="1")], name=f"layer{i}"))
        cin = w * mult
    seq += [layers.GlobalAveragePooling2D(name="avgpool"), layers.Dense(cfg["num_classes"], name="fc")]
    return keras.Sequential(seq, name="resnet18")


def vit_tiny(cfg: dict[str, Any]) -> keras.Model:
    dim, p, size = cfg["dim"], cfg["patch_size"], cfg["image_size"]
    blocks = keras.Sequential([Block(dim, cfg["heads"], cfg["mlp_ratio"], name=str(i)) for i in range(cfg["depth"])],
                              name="blocks")
    return keras.Sequential([
        keras.Input((size, size, cfg["in_channels"])), PatchEmbed(dim, p, strides=p, name="patch_embed"),
        Embed(name="embed"), blocks, layers.LayerNormalization(epsilon=1e-6, name="norm"), ClsPool(name="pool"),
        layers.Dense(cfg["num_classes"], name="fc")], name="vit_tiny")


BUILDERS = {"mlp": mlp, "small_cnn": small_cnn, "resnet18": resnet18, "vit_tiny": vit_tiny}
