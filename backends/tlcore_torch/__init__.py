"""tlcore's PyTorch backend. Importing this package does not import torch; ``backend.py`` does."""
from tlcore.registry import BackendSpec

SPEC = BackendSpec(name="torch", target="tlcore_torch.backend:TorchBackend", requires=("torch",), roots=("torch",))
