"""Initial values in numpy, seeded by tensor name, so a zoo model or a new head starts from the same
weights on every backend.

Each tensor gets its own generator seeded by ``(seed, crc32(name))``, so the result depends only on
the seed, the tensor's name and its shape: not on the order of the tensors, nor on when (or on which
backend) it is built. Tensors use PyTorch's names and layouts. Rules, by name and shape:
BatchNorm/LayerNorm scale 1, shift 0; running mean 0, variance 1; convolutions Kaiming-normal (fan-out, ReLU), as torchvision's ResNet;
dense weights and biases uniform in +-1/sqrt(fan_in), as ``nn.Linear``; class token and position
embedding normal(0, 0.02), as timm.

Example:
    >>> import numpy as np
    >>> out = init_state({"fc.weight": np.zeros((2, 4), np.float32), "fc.bias": np.zeros(2, np.float32)}, seed=0)
    >>> bool(np.abs(out["fc.weight"]).max() <= 0.5)
    True
"""
from __future__ import annotations

import zlib

import numpy as np


def init_state(state: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """New values for every tensor of a canonical ``state`` (only names, shapes, dtypes are read)."""
    fan_in = {n.rsplit(".", 1)[0]: v.shape[1] for n, v in state.items() if n.endswith(".weight") and v.ndim == 2}
    return {name: _init(name, np.asarray(v), seed, fan_in).astype(np.asarray(v).dtype) for name, v in state.items()}


def _init(name: str, v: np.ndarray, seed: int, fan_in: dict[str, int]) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 1)[0]
    if leaf == "running_var":
        return np.ones(v.shape)
    if leaf in ("running_mean", "num_batches_tracked"):
        return np.zeros(v.shape)
    if leaf in ("cls_token", "pos_embed"):
        return rng.normal(0.0, 0.02, v.shape)
    if v.ndim == 4:  # conv (out, in, kh, kw): Kaiming normal, fan-out, ReLU gain
        return rng.normal(0.0, np.sqrt(2.0 / (v.shape[0] * v.shape[2] * v.shape[3])), v.shape)
    if v.ndim == 2:  # dense (out, in)
        bound = 1.0 / np.sqrt(v.shape[1])
        return rng.uniform(-bound, bound, v.shape)
    if leaf == "bias" and owner in fan_in:  # a dense layer's bias
        bound = 1.0 / np.sqrt(fan_in[owner])
        return rng.uniform(-bound, bound, v.shape)
    if leaf == "weight":  # 1-D weight: a norm's scale
        return np.ones(v.shape)
    return np.zeros(v.shape)  # norm shift, conv bias
