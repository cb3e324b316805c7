"""Naming an ``nn.Module``'s tensors for tlcore and applying a resolved freeze mask to it.

Example:
    >>> [t.name for t in tensor_infos(net, layer_names(net))][:2]   # doctest: +SKIP
    ['conv1.weight', 'conv1.bias']
"""
from __future__ import annotations

from tlcore.freeze import Resolved, TensorInfo, owning_layer

from ._torch import nn
from .cut import display_name, elided

BATCHNORM = (nn.modules.batchnorm._BatchNorm,)
DROPOUT = (nn.modules.dropout._DropoutNd,)
#: attributes by which layers outside torch (timm's DropPath, blocks with a drop rate) say they are random;
#: ``lora_dropout``: a LoRA adapter's dropout (see ``lora.py``)
RATE_ATTRIBUTES = ("drop_prob", "drop_rate", "drop_path_rate", "lora_dropout")


def tensor_infos(module: nn.Module, layers: list[str]) -> tuple[list[TensorInfo], dict[str, str]]:
    """Every parameter and buffer, in registration order, with its owning layer and kind; and
    ``{tlcore tensor name: native state_dict key}``."""
    known, skip = set(layers), elided(module)
    infos, keys, seen = [], {}, set()
    for path, sub in module.named_modules():
        is_bn = isinstance(sub, BATCHNORM)
        name = display_name(path, skip)
        owner = owning_layer(name, known)
        prefix = f"{name}." if name else ""
        native = f"{path}." if path else ""
        own = [(n, t, "bn_param" if is_bn else "param") for n, t in sub.named_parameters(recurse=False)]
        own += [(n, t, "bn_stat" if is_bn else "buffer") for n, t in sub.named_buffers(recurse=False)
                if n not in sub._non_persistent_buffers_set]
        for leaf, tensor, kind in own:
            if id(tensor) in seen:  # a tensor shared by two modules (tied weights) is listed once
                continue
            seen.add(id(tensor))
            infos.append(TensorInfo(prefix + leaf, owner, kind, name if is_bn else ""))
            keys[prefix + leaf] = native + leaf
    return infos, keys


def apply_mask(params: dict[str, nn.Parameter], resolved: Resolved) -> None:
    """``requires_grad`` from the mask (``params``: tlcore name -> parameter); frozen BatchNorm
    modes are applied by :func:`train_mode`."""
    for name, p in params.items():
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


def is_stochastic(module: nn.Module) -> bool:
    """True for a layer that draws random numbers while training (dropout, drop-path)."""
    if isinstance(module, DROPOUT):
        return module.p > 0
    return any(isinstance(getattr(module, a, None), (int, float)) and getattr(module, a) > 0 for a in RATE_ATTRIBUTES)
