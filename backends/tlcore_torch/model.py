"""``TorchModel``: an ``nn.Module`` behind the :class:`tlcore.Model` API (its own input layout)."""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np

from ._torch import torch, nn
from tlcore.checkpoint import contiguous
from tlcore.errors import CutError
from tlcore.freeze import Resolved, TensorInfo
from tlcore.head import Head
from tlcore.model import Model, Trainer
from tlcore.optim import TrainSpec

from .cut import append_module, cut_module, layer_names
from .freeze import DROPOUT, apply_mask, tensor_infos
from .head import build_head
from .train import TorchTrainer


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early, carrying the captured tensor."""


def infer_input_shape(module: nn.Module) -> tuple | None:
    """Per-sample input shape as far as the first layer tells (None where unknown)."""
    first = next((m for m in module.modules() if not list(m.children())), None)
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    if isinstance(first, nn.Conv2d):
        return (first.in_channels, None, None)
    if isinstance(first, nn.Conv1d):
        return (first.in_channels, None)
    return None


class TorchModel(Model):
    """A PyTorch ``nn.Module`` wrapped as a :class:`tlcore.Model`.

    Example:
        >>> m = tl.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))   # doctest: +SKIP
        >>> m.layers                                                                 # doctest: +SKIP
        ['0', '1', '2']
    """

    backend = "torch"

    def __init__(self, module: nn.Module, *, layers: list[str] | None = None,
                 kinds: dict[str, str] | None = None, nhwc: bool = False, **kwargs):
        self._module = module
        self._trainer: tuple | None = None  # (key, TorchTrainer) of the last fit
        self.nhwc = nhwc  # numpy images are NHWC (zoo models) while the module computes in NCHW
        self._layers = layers if layers is not None else layer_names(module)
        self._kinds = kinds if kinds is not None else {
            n: type(module.get_submodule(n)).__name__ for n in self._layers}
        kwargs.setdefault("input_shape", infer_input_shape(module))
        super().__init__(**kwargs)

    @property
    def native(self) -> nn.Module:
        return self._module

    def _layer_names(self) -> list[str]:
        return list(self._layers)

    def _layer_kinds(self) -> dict[str, str]:
        return dict(self._kinds)

    def _tensor_infos(self) -> list[TensorInfo]:
        return tensor_infos(self._module, self._layers)

    def _read_state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self._module.state_dict(keep_vars=True).items()}

    def _write_state(self, arrays: dict[str, np.ndarray]) -> None:
        tensors = self._module.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, value in arrays.items():
                tensors[name].copy_(torch.from_numpy(contiguous(value)))

    def _apply_freeze(self, resolved: Resolved) -> None:
        apply_mask(self._module, resolved)

    def _to_module(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x)
        return t.permute(0, 3, 1, 2) if self.nhwc and t.ndim == 4 else t

    def _from_module(self, out: torch.Tensor) -> np.ndarray:
        return (out.permute(0, 2, 3, 1) if self.nhwc and out.ndim == 4 else out).numpy()

    def _forward(self, x: np.ndarray) -> np.ndarray:
        if self._module.training:
            self._module.eval()
        with torch.inference_mode():
            return self._from_module(self._module(self._to_module(x)))

    def _make_trainer(self, spec: TrainSpec) -> Trainer:
        key = (replace(spec, seed=0), self._resolved)
        if self._trainer is not None and self._trainer[0][0] == key[0] and self._trainer[0][1] is key[1]:
            self._trainer[1].start(spec.seed)  # same spec and policy: reuse, with fresh optimizer state
        else:
            self._trainer = (key, TorchTrainer(self._module, self._resolved.frozen_bn_units, spec, self._to_module))
        return self._trainer[1]

    def _stochastic_layers(self) -> list[str]:
        return [p for p, m in self._module.named_modules() if isinstance(m, DROPOUT) and m.p > 0]

    # ---------------------------------------------------------------- structure
    def _cut(self, last: str | None) -> TorchModel:
        module = cut_module(copy.deepcopy(self._module), last)
        keep = self._layers if last is None else self._layers[: self._layers.index(last) + 1]
        return TorchModel(module, layers=list(keep), kinds=self._kinds, input_shape=self.input_shape,
                          nhwc=self.nhwc, meta=self.meta)

    def _dry_run(self, module: nn.Module | None = None) -> torch.Tensor:
        if self.input_shape is None or None in self.input_shape:
            raise CutError(f"cannot size the head: the input shape is unknown ({self.input_shape}); "
                           "pass input_shape=(C, H, W) (per sample, no batch) to tl.finetune or tl.wrap")
        module = module or self._module
        was_training = module.training
        module.eval()
        with torch.no_grad():
            out = module(self._to_module(np.zeros((2, *self.input_shape), np.float32)))
        module.train(was_training)
        return out

    def _with_head(self, head: Head, name: str, seed: int) -> TorchModel:
        features = self._dry_run()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            head_module = build_head(head, _pooled_width(features, head.pool), nhwc=self.nhwc)
        module = append_module(self._module, name, head_module)
        layers = self._layers + [name] + [f"{name}.{n}" for n, _ in head.layers()]
        kinds = {**self._kinds, name: "Head", **{f"{name}.{n}": type(m).__name__
                                                 for n, m in head_module.named_children()}}
        return TorchModel(module, layers=layers, kinds=kinds, input_shape=self.input_shape, head=name,
                          head_spec=head, nhwc=self.nhwc, meta=self.meta)

    def _output_shapes(self) -> dict[str, tuple]:
        if self.input_shape is None or None in self.input_shape:
            return {}
        shapes, hooks = {}, []

        def record(name: str, output) -> None:  # a forward hook must return None
            if torch.is_tensor(output):
                shape = tuple(output.shape[1:])
                shapes.setdefault(name, shape[1:] + shape[:1] if self.nhwc and len(shape) == 3 else shape)

        for name in self._layers:
            try:
                sub = self._module.get_submodule(name)
            except AttributeError:
                continue
            hooks.append(sub.register_forward_hook(lambda m, i, o, name=name: record(name, o)))
        try:
            self._dry_run()
        finally:
            for h in hooks:
                h.remove()
        return shapes

    # ---------------------------------------------------------------- feature caching
    def _features(self, x: np.ndarray) -> np.ndarray:
        captured = {}

        def grab(module, inputs):
            captured["x"] = inputs[0]
            raise _StopForward

        hook = self._module.get_submodule(self._head).register_forward_pre_hook(grab)
        self._module.eval()
        try:
            with torch.inference_mode():
                self._module(self._to_module(x))
        except _StopForward:
            pass
        finally:
            hook.remove()
        return self._from_module(captured["x"])

    def _head_model(self) -> TorchModel:
        head = self._module.get_submodule(self._head)
        layers = [n[len(self._head) + 1:] for n in self._layers if n.startswith(self._head + ".")]
        return TorchModel(head, layers=layers, kinds={n: self._kinds.get(f"{self._head}.{n}", "") for n in layers},
                          input_shape=None, head_spec=self.head_spec, nhwc=self.nhwc)


def _pooled_width(features: torch.Tensor, pool: str) -> int:
    if features.ndim <= 2:
        return int(features.shape[-1])
    if pool == "flatten":
        return int(np.prod(features.shape[1:]))
    return int(features.shape[1] if features.ndim == 4 else features.shape[-1])
