"""The PyTorch backend (imports torch, see ``_torch.py``)."""
from __future__ import annotations

from collections import OrderedDict

from tlcore.backend import Backend

from ._torch import F, nn, torch
from .head import Pool
from .model import TorchModel


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm then ReLU in one layer that reads ``self.training`` itself, as timm's
    ``BatchNormAct2d`` does (the conformance suite's "custom" reference uses it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                   self.training, self.momentum, self.eps))


class CustomNet(nn.Module):
    """A hand-written module (not a container): ``conv1, bnact1, conv2, bnact2, pool, fc``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bnact1 = nn.Conv2d(3, 8, 3, padding=1), BatchNormAct(8)
        self.conv2, self.bnact2 = nn.Conv2d(8, 16, 3, padding=1), BatchNormAct(16)
        self.pool, self.fc = Pool("avg"), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bnact2(self.conv2(self.bnact1(self.conv1(x))))
        return self.fc(self.pool(x))


class TokenNet(nn.Module):
    """Token features from token ids: ``embed`` (Embedding(20, 8)), then ``proj`` (Linear(8, 8))."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj = nn.Embedding(20, 8), nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.embed(input_ids))


class TorchBackend(Backend):
    """Wraps any ``torch.nn.Module``; inputs use the module's own layout (e.g. NCHW)."""

    name = "torch"

    def owns(self, obj: object) -> bool:
        return isinstance(obj, nn.Module)

    def wrap(self, native: nn.Module, input_shape: tuple[int | None, ...] | None = None) -> TorchModel:
        kwargs = {} if input_shape is None else {"input_shape": tuple(input_shape)}
        return TorchModel(native, **kwargs)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def reference_model(self, seed: int = 0, variant: str = "sequential") -> TorchModel:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if variant == "custom":
                return TorchModel(CustomNet(), input_shape=(3, 8, 8))
            if variant == "tokens":
                return TorchModel(TokenNet())
            net = nn.Sequential(OrderedDict(
                conv1=nn.Conv2d(3, 8, 3, padding=1), bn1=nn.BatchNorm2d(8), relu1=nn.ReLU(),
                conv2=nn.Conv2d(8, 16, 3, padding=1), bn2=nn.BatchNorm2d(16), relu2=nn.ReLU(),
                pool=Pool("avg"), dropout=nn.Dropout(0.25), fc=nn.Linear(16, 4)))
        return TorchModel(net, input_shape=(3, 8, 8))

    def zoo_model(self, name: str, config: dict) -> TorchModel:
        from .zoo import BUILDERS

        return TorchModel(BUILDERS[name](config), nhwc=True)
