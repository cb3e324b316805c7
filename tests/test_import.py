"""`import tlcore` imports no framework; a backend imports only its own framework."""
import subprocess
import sys

import pytest

import tlcore as tl

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "flax", "optax")


def imported_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(m for m in "
                          f"{FRAMEWORKS!r} if m in sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_tlcore_imports_no_framework():
    assert imported_after("import tlcore as tl; tl.available_backends(); tl.FreezePolicy.all()") == set()


def test_detecting_a_backend_never_imports_a_framework():
    code = "import tlcore as tl\ntry:\n    tl.wrap(object())\nexcept tl.UnsupportedModelError:\n    pass"
    assert imported_after(code) == set()


@pytest.mark.skipif("torch" not in tl.available_backends(), reason="torch backend not installed")
def test_torch_backend_imports_only_torch():
    code = ("import torch, tlcore as tl\nm = tl.wrap(torch.nn.Sequential(torch.nn.Linear(3, 2)))\n"
            "tl.finetune(m, head=tl.Head.linear(2)).fit([[0., 1., 2.]], [1], progress=False)")
    assert imported_after(code) == {"torch"}
