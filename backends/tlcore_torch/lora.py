"""LoRA adapters on an ``nn.Module``, in place: the PyTorch side of ``tlcore.adapters``.

An adapted dense layer keeps its own ``forward`` and weights; it gains two parameters, ``lora_A``
(rank, in) and ``lora_B`` (out, rank), and a forward hook that adds
``scale * dropout(x) @ lora_A.T @ lora_B.T`` to its output (PEFT's LoRA). Parameters registered on the
layer itself are ``state()`` tensors ``<layer>.lora_A`` / ``<layer>.lora_B`` like its weight, so
naming, freezing, training and checkpoints need nothing else. The hook is a module-level function
that reads everything from the module it is called with, so ``copy.deepcopy`` (a cut) keeps working
adapters on the copy.

Dense layers are ``nn.Linear`` (and subclasses) and Hugging Face's ``Conv1D`` (GPT-2), which keeps its
weight as (in, out). The ``out_proj`` of ``nn.MultiheadAttention`` is left out: attention reads its
weight directly and never calls it, so an adapter there would never run.

Example:
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> add_lora(net[0], 2.0, 0.0, np.ones((2, 4), np.float32), np.zeros((8, 2), np.float32))
    >>> sorted(n for n, _ in net[0].named_parameters())
    ['bias', 'lora_A', 'lora_B', 'weight']
    >>> remove_lora(net[0]); is_adapted(net[0])
    False
"""
from __future__ import annotations

import numpy as np

from tlcore.adapters import LoraTarget
from tlcore.cut import in_layer

from ._torch import F, nn, torch

#: the parameters an adapter adds to its layer (their ``state()`` names end with these)
PARAMS = ("lora_A", "lora_B")
#: the plain attributes an adapter keeps on its layer
SCALE, DROPOUT = "lora_scale", "lora_dropout"


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's dense layer, ``x @ weight + bias`` with weight (in, out)),
    told by its class name and attributes, so that transformers is not imported.

    Example:
        >>> is_hf_conv1d(nn.Linear(2, 3))
        False
    """
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor)
            and weight.ndim == 2)


def dense_widths(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(in_features, out_features, transposed)`` of a dense layer LoRA can adapt, else None
    (``transposed``: the weight is kept as (in, out)). A lazy layer not built yet is not one.

    Example:
        >>> dense_widths(nn.Linear(4, 8)), dense_widths(nn.ReLU())
        ((4, 8, False), None)
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
        return None
    if isinstance(module, nn.Linear):
        return int(weight.shape[1]), int(weight.shape[0]), False
    if is_hf_conv1d(module):
        return int(weight.shape[0]), int(weight.shape[1]), True
    return None


def lora_targets(modules: dict[str, nn.Module], head: str | None) -> list[LoraTarget]:
    """Every dense layer of ``modules`` (``{tlcore name: submodule}`` in module order) outside the
    layer ``head``, adapted or not, each once.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [t.module for t in lora_targets(dict(net.named_modules()), head="2")]
        ['0']
    """
    unreachable = {id(m.out_proj) for m in modules.values() if isinstance(m, nn.MultiheadAttention)}
    out, seen = [], set()
    for name, module in modules.items():
        widths = dense_widths(module)
        if not name or widths is None or id(module) in seen or id(module) in unreachable:
            continue
        if head is not None and in_layer(name, head):
            continue
        seen.add(id(module))
        out.append(LoraTarget(name, f"{name}.weight", widths[0], widths[1], widths[2]))
    return out


def is_adapted(module: nn.Module) -> bool:
    """True when :func:`add_lora` adapted ``module`` (and :func:`remove_lora` did not undo it).

    Example:
        >>> is_adapted(nn.Linear(2, 3))
        False
    """
    return any(hook is lora_hook for hook in module._forward_hooks.values())


def lora_hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    """The forward hook of an adapted layer: ``output + scale * dropout(x) @ A.T @ B.T``, ``x`` the
    layer's input; dropout only while ``module.training`` and only for a rate above 0 (with B = 0 and
    no dropout the output is the base output, bit for bit).

    Example:
        >>> lin = nn.Linear(2, 3)
        >>> add_lora(lin, 1.0, 0.0, np.ones((1, 2), np.float32), np.ones((3, 1), np.float32))
        >>> x = torch.ones(1, 2)
        >>> bool(torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias) + 2.0))
        True
    """
    x = args[0] if args else next(iter(kwargs.values()))
    p = getattr(module, DROPOUT)
    if p > 0:
        x = F.dropout(x, p, training=module.training)
    a, b = module.lora_A, module.lora_B
    delta = F.linear(F.linear(x, a), b)
    return output + getattr(module, SCALE) * delta


def add_lora(module: nn.Module, scale: float, dropout: float, a: np.ndarray, b: np.ndarray) -> None:
    """Adapt dense layer ``module`` in place with ``a`` (rank, in) and ``b`` (out, rank), which become
    parameters ``lora_A`` / ``lora_B`` (on the weight's device, in its dtype, trainable). An adapter
    already there is replaced.

    Example:
        >>> lin = nn.Linear(4, 8)
        >>> add_lora(lin, 2.0, 0.1, np.zeros((2, 4), np.float32), np.zeros((8, 2), np.float32))
        >>> tuple(lin.lora_A.shape), tuple(lin.lora_B.shape), lin.lora_scale, lin.lora_dropout
        ((2, 4), (8, 2), 2.0, 0.1)
    """
    widths = dense_widths(module)
    if widths is None:
        raise TypeError(f"LoRA adapts nn.Linear and Hugging Face's Conv1D layers, not {type(module).__name__}")
    fan_in, fan_out, _ = widths
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or a.shape[0] != b.shape[1]:
        raise ValueError(f"LoRA tensors for a layer {fan_in} -> {fan_out} are A (rank, {fan_in}) and B "
                         f"({fan_out}, rank), got A {a.shape} and B {b.shape}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if is_adapted(module):
        remove_lora(module)
    weight = module.weight
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    for name, value in zip(PARAMS, (a, b)):
        tensor = torch.from_numpy(np.array(value, dtype=np.float32)).to(device=weight.device, dtype=dtype)
        module.register_parameter(name, nn.Parameter(tensor))
    setattr(module, SCALE, float(scale))
    setattr(module, DROPOUT, float(dropout))
    module.register_forward_hook(lora_hook, with_kwargs=True)


def remove_lora(module: nn.Module) -> None:
    """Undo :func:`add_lora` in place: the hook, the two parameters and the attributes go, and
    ``module`` computes its base output again. A layer that is not adapted is left as it is.

    Example:
        >>> lin = nn.Linear(4, 8)
        >>> add_lora(lin, 2.0, 0.0, np.zeros((2, 4), np.float32), np.zeros((8, 2), np.float32))
        >>> remove_lora(lin); hasattr(lin, "lora_A"), is_adapted(lin)
        (False, False)
    """
    ids = [k for k, hook in module._forward_hooks.items() if hook is lora_hook]
    for k in ids:  # what RemovableHandle.remove does; a handle would not survive copy.deepcopy
        for hooks in (module._forward_hooks, module._forward_hooks_with_kwargs, module._forward_hooks_always_called):
            hooks.pop(k, None)
    for name in PARAMS:
        module._parameters.pop(name, None)
    for name in (SCALE, DROPOUT):
        module.__dict__.pop(name, None)
