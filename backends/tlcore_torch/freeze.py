"""Applying a resolved freeze mask to an ``nn.Module``."""
from __future__ import annotations


from ._torch import nn
from tlcore.freeze import Resolved, TensorInfo, owning_layer

BATCHNORM = (nn.modules.batchnorm._BatchNorm,)
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def tensor_infos(module: nn.Module, layers: list[str]) -> list[TensorInfo]:
    """Every parameter and buffer, in registration order, with its owning layer and kind."""
    known = set(layers)
    infos = []
    for path, sub in module.named_modules():
        is_bn = isinstance(sub, BATCHNORM)
        owner = owning_layer(path, known)
        prefix = f"{path}." if path else ""
        for name, _ in sub.named_parameters(recurse=False):
            infos.append(TensorInfo(prefix + name, owner, "bn_param" if is_bn else "param", path))
        for name, _ in sub.named_buffers(recurse=False):
            infos.append(TensorInfo(prefix + name, owner, "bn_stat" if is_bn else "buffer", path))
    return infos


def apply_mask(module: nn.Module, resolved: Resolved) -> None:
    """``requires_grad`` from the mask; frozen BatchNorm modes are applied by :func:`train_mode`."""
    for name, p in module.named_parameters():
        p.requires_grad_(resolved.mask[name])
        if not resolved.mask[name]:
            p.grad = None


def train_mode(module: nn.Module, frozen_bn: list[nn.Module]) -> None:
    """Training mode, except frozen BatchNorm layers, which run (and stay) in inference mode.

    ``requires_grad=False`` alone does not stop running statistics from updating in ``train()``
    (pytorch/pytorch#86590); eval mode does. Only flags that differ are written.
    """
    frozen = {id(m) for m in frozen_bn}
    for m in module.modules():
        want = id(m) not in frozen
        if m.training != want:
            m.training = want
