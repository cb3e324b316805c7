"""The PyTorch backend (imports torch)."""
from __future__ import annotations


from ._torch import torch, nn
from tlcore.backend import Backend

from .model import TorchModel


class TorchBackend(Backend):
    """Wraps any ``torch.nn.Module``; inputs use the module's own layout (e.g. NCHW)."""

    name = "torch"

    def owns(self, obj: object) -> bool:
        return isinstance(obj, nn.Module)

    def wrap(self, native: nn.Module, input_shape: tuple[int, ...] | None = None) -> TorchModel:
        kwargs = {} if input_shape is None else {"input_shape": tuple(input_shape)}
        return TorchModel(native, **kwargs)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def reference_model(self, seed: int = 0) -> TorchModel:
        from collections import OrderedDict

        from .head import Pool

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = nn.Sequential(OrderedDict(
                conv1=nn.Conv2d(3, 8, 3, padding=1), bn1=nn.BatchNorm2d(8), relu1=nn.ReLU(),
                conv2=nn.Conv2d(8, 16, 3, padding=1), bn2=nn.BatchNorm2d(16), relu2=nn.ReLU(),
                pool=Pool("avg"), dropout=nn.Dropout(0.25), fc=nn.Linear(16, 4)))
        return TorchModel(net, input_shape=(3, 8, 8))

    def zoo_model(self, name: str, config: dict) -> TorchModel:
        from .zoo import BUILDERS

        return TorchModel(BUILDERS[name](config), nhwc=True)
