"""``TorchModel``: an ``nn.Module`` behind the :class:`tlcore.Model` API (its own input layout).

Example:
    >>> m = tl.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))   # doctest: +SKIP
    >>> m.layers                                                                 # doctest: +SKIP
    ['0', '1', '2']
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np

from tlcore import data
from tlcore.adapters import LoraTarget
from tlcore.checkpoint import contiguous
from tlcore.cut import dropped_layers
from tlcore.errors import FreezePolicyError, UnsupportedModelError
from tlcore.freeze import Resolved, TensorInfo
from tlcore.head import HeadPlan
from tlcore.model import Model
from tlcore.optim import TrainSpec

from . import distributed
from ._torch import nn, torch
from .cut import (append_head, call_order, check_call, cut_module, example_input, feeds_dense_as_is, first_leaf, layer_names,
                  modules_by_name, primary_output, timm_head, timm_pre_logits)
from .freeze import apply_mask, is_stochastic, tensor_infos, train_mode
from .head import HeadModule, build_head
from .lora import add_lora, lora_targets, remove_lora
from .train import TorchTrainer

if TYPE_CHECKING:
    from tlcore.distribute import DataParallel, Replicas


class _StopForward(BaseException):
    """Raised by a hook to end a forward pass early, carrying the captured tensor."""


def infer_input_shape(module: nn.Module) -> tuple | None:
    """Per-sample input shape as far as the first layer tells (None where unknown)."""
    first = first_leaf(module)
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return (first.in_channels, *(None,) * (first.weight.ndim - 2))
    return None


class TorchModel(Model):
    """A PyTorch ``nn.Module`` wrapped as a :class:`tlcore.Model`.

    Args:
        module: the ``nn.Module`` (shared, not copied).
        layers: the cut points (default: listed from the module).
        kinds: ``{layer: class name}`` for the summary (default: from the module).
        nhwc: numpy images are NHWC (zoo models) while the module computes in NCHW.
        static_width: the head's input width when known without data (a cut before a dense layer).
    """

    backend = "torch"
    channels_last = False  # features in the module's own layout (NCHW)

    def __init__(self, module: nn.Module, *, layers: list[str] | None = None, kinds: dict[str, str] | None = None,
                 nhwc: bool = False, static_width: int | None = None, **kwargs: Any):
        self._module = module
        self.nhwc = nhwc
        self._static_width = static_width
        self._names: dict[str, Any] | None = None
        self._rng: dict = {}  # the torch generators' state between fits (see TorchTrainer.resume)
        if layers is None:
            shape = kwargs.get("input_shape") or infer_input_shape(module)
            layers = call_order(module, layer_names(module), example_input(module, shape))
        self._layers = layers
        subs = modules_by_name(module)
        self._kinds = {n: type(subs[n]).__name__ for n in self._layers if n in subs}
        self._kinds.update(kinds or {})
        kwargs.setdefault("input_shape", infer_input_shape(module))
        super().__init__(**kwargs)

    @property
    def native(self) -> nn.Module:
        return self._module

    def _naming(self) -> dict[str, Any]:
        """Tensor infos, tlcore name -> native state_dict key, and tlcore name -> submodule."""
        if self._names is None:
            infos, keys = tensor_infos(self._module, self._layers)
            self._names = {"infos": infos, "keys": keys, "modules": modules_by_name(self._module)}
        return self._names

    def _set_module(self, module: nn.Module) -> None:
        self._module, self._names, self._infos = module, None, None

    # ---------------------------------------------------------------- structure and state
    def _layer_names(self) -> list[str]:
        return list(self._layers)

    def _layer_kinds(self) -> dict[str, str]:
        return dict(self._kinds)

    def _tensor_infos(self) -> list[TensorInfo]:
        return list(self._naming()["infos"])

    def _tensors(self) -> dict[str, torch.Tensor]:
        native = self._module.state_dict(keep_vars=True)
        return {name: native[key] for name, key in self._naming()["keys"].items()}

    def _read_state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self._tensors().items()}

    def _write_state(self, arrays: dict[str, np.ndarray]) -> None:
        tensors = self._tensors()
        with torch.no_grad():
            for name, value in arrays.items():
                tensors[name].copy_(torch.from_numpy(contiguous(value)))

    def _params(self) -> dict[str, nn.Parameter]:
        native = dict(self._module.named_parameters(remove_duplicate=False))  # cheaper than a state_dict
        return {name: native[key] for name, key in self._naming()["keys"].items() if key in native}

    def _apply_freeze(self, resolved: Resolved) -> None:
        apply_mask(self._params(), resolved)

    def _verify_native(self) -> None:
        """Every parameter's ``requires_grad`` must still be the mask's: one set by hand would train a
        frozen tensor (or not train a trainable one) behind tlcore's back; each one is named."""
        mask = self._resolved.mask
        odd = [n for n, p in self._params().items() if p.requires_grad != mask[n]]
        if odd:
            turned = sum(not mask[n] for n in odd)
            raise FreezePolicyError(
                f"requires_grad of {odd[:5]}{f' and {len(odd) - 5} more' if len(odd) > 5 else ''} was changed "
                f"outside tlcore ({turned} frozen tensor(s) set to True, {len(odd) - turned} trainable one(s) to "
                "False), so it no longer matches trainable_mask(); nothing was trained: change what trains with "
                "model.freeze(tl.FreezePolicy...) instead")

    # ---------------------------------------------------------------- inference
    @property
    def device(self) -> torch.device:
        """Where the module's weights are (inputs are moved there; CPU for a module without any)."""
        first = next(self._module.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a if a.flags.writeable else a.copy())  # tf.data's arrays are read-only
        t = t.permute(0, 3, 1, 2) if self.nhwc and t.ndim == 4 else t
        return t.to(self.device, non_blocking=True)

    def _to_module(self, x: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` to call the module with: one tensor, keyword tensors (a dict: named
        inputs, as Hugging Face's ``input_ids``/``attention_mask``) or positional ones (a tuple)."""
        if isinstance(x, dict):
            return (), {k: self._tensor(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return tuple(self._tensor(v) for v in x), {}
        return (self._tensor(x),), {}

    def _check_inputs(self, x: Any) -> None:
        check_call(self._module, x)

    def _call(self, x: Any) -> Any:
        args, kwargs = self._to_module(x)
        return self._module(*args, **kwargs)

    def _from_module(self, out: Any) -> np.ndarray:
        out = primary_output(out)
        return (out.permute(0, 2, 3, 1) if self.nhwc and out.ndim == 4 else out).detach().cpu().numpy()

    def _forward(self, x: Any) -> np.ndarray:
        if self._module.training:
            self._module.eval()
        with torch.inference_mode():
            return self._from_module(self._call(x))

    def _features(self, x: Any) -> np.ndarray:
        """The head's input, after its pool when tlcore built the head (the cached features are then
        small, and an attention mask is used here); :meth:`_head_model` starts after it. Inside a
        data-parallel fit (the feature cache), each replica computes its shard of ``x``."""
        if self._strategy is not None and distributed.dist.is_initialized():  # set by the core during a fit
            world = distributed.dist.get_world_size()
            if world > 1:
                return distributed.sharded_features(self._local_features, x, world, distributed.dist.get_rank(),
                                                    self.device)
        return self._local_features(x)

    def _local_features(self, x: Any) -> np.ndarray:
        """:meth:`_features` computed in this process alone."""
        captured = {}

        def grab(module, inputs):
            captured["x"] = inputs[0]
            raise _StopForward

        head = self._naming()["modules"][self._head]
        hook = head.register_forward_pre_hook(grab)
        self._module.eval()
        try:
            with torch.inference_mode():
                self._call(x)
        except _StopForward:
            pass
        finally:
            hook.remove()
        features = captured["x"]
        if isinstance(head, HeadModule):
            mask = x.get("attention_mask") if isinstance(x, dict) else None
            with torch.inference_mode():
                features = head.pool(features, None if mask is None else self._tensor(mask))
        return self._from_module(features)

    def _head_model(self) -> TorchModel:
        head = self._naming()["modules"][self._head]
        prefix = f"{self._head}."
        inner = head.after_pool() if isinstance(head, HeadModule) else head
        names = layer_names(inner)
        view = TorchModel(inner, layers=names, kinds={n: self._kinds.get(prefix + n, "") for n in names},
                          input_shape=None, head_spec=self.head_spec, nhwc=self.nhwc)
        view._rng = self._rng  # one random stream for the model and its head: a run goes on across stages
        return view

    def _stochastic_layers(self) -> list[str]:
        return [n for n, m in self._naming()["modules"].items() if n and is_stochastic(m)]

    def _output_shapes(self, input_shape: tuple[int, ...]) -> dict[str, tuple]:
        shapes, hooks = {}, []

        def record(name: str, output) -> None:  # a forward hook must return None
            try:
                out = primary_output(output)
            except Exception:
                return
            shape = tuple(out.shape[1:])
            shapes.setdefault(name, shape[1:] + shape[:1] if self.nhwc and len(shape) == 3 else shape)

        modules = self._naming()["modules"]
        for name in self._layers:
            if name in modules:
                hooks.append(modules[name].register_forward_hook(lambda m, i, o, name=name: record(name, o)))
        try:
            self._dry_run(np.zeros((1, *input_shape), np.float32))
        finally:
            for h in hooks:
                h.remove()
        return shapes

    def _dry_run(self, x: Any) -> Any:
        """The module's output on ``x`` in inference mode, every layer's mode restored afterwards."""
        modes = [(m, m.training) for m in self._module.modules()]
        self._module.eval()
        try:
            with torch.no_grad():
                return primary_output(self._call(x))
        finally:
            for m, mode in modes:
                m.training = mode

    # ---------------------------------------------------------------- training
    def _random_state(self) -> dict[str, np.ndarray]:
        return {k: v.numpy().copy() for k, v in self._rng.items()}

    def _set_random_state(self, arrays: dict[str, np.ndarray]) -> None:
        self._rng.clear()
        self._rng.update({k: torch.from_numpy(np.array(v, dtype=np.uint8)) for k, v in arrays.items()})

    def _make_trainer(self, spec: TrainSpec) -> TorchTrainer:
        modules = self._naming()["modules"]
        frozen_bn = [modules[u] for u in self._resolved.frozen_bn_units]
        mask = self._resolved.mask
        params = {n: p for n, p in self._params().items() if mask[n]}
        kind = TorchTrainer if spec.strategy is None else distributed.DataParallelTrainer
        return kind(self._module, frozen_bn, spec, self._to_module, self.device, params, self._rng)

    def _replicas(self, strategy: DataParallel) -> Replicas:
        """The processes of the default process group (initialised from ``torchrun``'s variables when
        the script did not); see ``tlcore_torch.distributed``."""
        return distributed.replicas(strategy, self.device)

    # ---------------------------------------------------------------- adapters
    def _lora_targets(self) -> list[LoraTarget]:
        return lora_targets(self._naming()["modules"], self._head)

    def _add_lora(self, target: LoraTarget, scale: float, dropout: float, a: np.ndarray, b: np.ndarray) -> None:
        add_lora(self._lora_module(target.module), scale, dropout, a, b)
        self._names, self._infos = None, None  # two new tensors (the core applies the freeze policy)

    def _remove_lora(self, module: str) -> None:
        remove_lora(self._lora_module(module))
        self._names, self._infos = None, None

    def _lora_module(self, name: str) -> nn.Module:
        module = self._naming()["modules"].get(name)
        if module is None:
            raise UnsupportedModelError(f"no layer {name!r} to adapt in this model")
        return module

    # ---------------------------------------------------------------- structure
    def _cut(self, last: str | None, layers: list[str]) -> TorchModel:
        module = copy.deepcopy(self._module)
        static_width = None
        dropped = dropped_layers(self._layers, layers)
        subs = self._naming()["modules"]
        if last is not None and dropped and dropped[0] == timm_head(self._module) and "." not in last:
            module, static_width = timm_pre_logits(module)  # timm's own contract: pooled, normed features
        elif last is not None:
            if dropped and feeds_dense_as_is(subs[last]):
                nxt = first_leaf(subs[dropped[0]])
                static_width = nxt.in_features if isinstance(nxt, nn.Linear) else None
            module = cut_module(module, last, dropped)
        return TorchModel(module, layers=list(layers), kinds=self._kinds, input_shape=self.input_shape,
                          nhwc=self.nhwc, meta=self.meta, static_width=static_width)

    def _feature_shape(self, x: Any) -> tuple | None:
        if x is None:
            if self.input_shape is not None and None not in self.input_shape:
                x = np.zeros((1, *self.input_shape), np.float32)
            else:
                return None if self._static_width is None else (self._static_width,)
        return tuple(self._dry_run(data.take(x, slice(0, 1))).shape[1:])

    def _attach_head(self, plan: HeadPlan, name: str, values: dict[str, np.ndarray]) -> None:
        self._append(name, build_head(plan, values, nhwc=self.nhwc), "Head")

    def _attach_native_head(self, name: str, head: Any) -> None:
        if not isinstance(head, nn.Module):
            raise UnsupportedModelError(f"a head for a torch model must be a torch.nn.Module (or a tl.Head), "
                                        f"got {type(head).__qualname__}")
        self._append(name, head.to(self.device), type(head).__name__)

    def _append(self, name: str, head: nn.Module, kind: str) -> None:
        self._set_module(append_head(self._module, name, head))
        inner = layer_names(head)
        self._layers = self._layers + [name] + [f"{name}.{n}" for n in inner]
        subs = modules_by_name(head)
        self._kinds.update({name: kind, **{f"{name}.{n}": type(subs[n]).__name__ for n in inner}})
