"""Processes that use several frameworks never crash, whatever order their backends are used in.

With PyTorch's default (CUDA) wheel, which CI installs, ``import tensorflow`` followed by the first
``import torch._dynamo`` (a process's first ``torch.optim`` optimizer) kills the process with a
segmentation fault: Triton's LLVM binds to TensorFlow's (see ``tlcore/native_libs.py``). Each case
runs in its own interpreter, because the crash depends on what a process loaded first.
"""
import importlib.util
import itertools
import os
import subprocess
import sys

import pytest

from tlcore.testing import selected_backends

BACKENDS = [b for b in ("torch", "keras", "jax") if b in selected_backends()]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("subprocess")]

#: fine-tune a tiny zoo model on one backend (a torch fit builds the process's first optimizer)
FIT = """
def fit(backend):
    import numpy as np, tlcore as tl
    base = tl.zoo.create("small_cnn", backend=backend, widths=(4, 8), input_size=8, num_classes=3)
    ft = tl.finetune(base, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(2))
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
    snap = tl.snapshot(ft)
    ft.fit(x, np.arange(8) % 2, epochs=1, batch_size=4, progress=False, cache_features=False)
    tl.assert_frozen(snap, ft)
"""


def run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def assert_ok(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, f"exit code {out.returncode}\n{out.stderr[-3000:]}"
    assert out.stdout.strip().endswith("OK"), out.stdout[-1000:]


@pytest.mark.parametrize("order", list(itertools.permutations(BACKENDS)), ids="-".join)
def test_every_order_of_backends_in_one_process(order):
    assert_ok(run(FIT + "".join(f"fit({b!r})\n" for b in order) + "print('OK')"))


@pytest.mark.skipif(not {"torch", "keras"} <= set(BACKENDS), reason="needs the torch and keras backends")
def test_checkpoint_loaded_on_keras_then_a_torch_fit(tmp_path):
    path = tmp_path / "m.safetensors"
    code = (FIT + "import tlcore as tl\n"
            f"m = tl.zoo.create('mlp', backend='jax', in_features=4, hidden=(3,), num_classes=2)\n"
            f"m.save({str(path)!r})\n"
            f"tl.load({str(path)!r}, backend='keras')\n"
            "fit('torch')\nprint('OK')")
    assert_ok(run(code))


@pytest.mark.skipif(not {"torch", "keras"} <= set(BACKENDS), reason="needs the torch and keras backends")
def test_tensorflow_imported_by_the_user_before_the_torch_backend():
    assert_ok(run(FIT + "import tensorflow\nfit('torch')\nimport torchvision\nprint('OK')"))


@pytest.mark.skipif(not {"torch", "keras"} <= set(BACKENDS), reason="needs the torch and keras backends")
def test_users_own_torch_code_after_the_keras_backend_and_no_cost_before():
    code = ("import sys, tlcore as tl\ntl.get_backend('keras')\n"
            "assert 'triton' not in sys.modules and 'torch' not in sys.modules, 'a keras process loads no torch part'\n"
            "import torch\nw = torch.nn.Parameter(torch.ones(2))\nopt = torch.optim.Adam([w])\n"
            "w.sum().backward(); opt.step()\nprint('OK')")
    assert_ok(run(code))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or importlib.util.find_spec("tensorflow") is None,
                    reason="Triton (PyTorch's default CUDA wheel) and TensorFlow are not both installed, so "
                           "the crash tlcore works around cannot happen here")
def test_control_without_tlcore_the_crash_is_real():
    """Negative control: the same imports without tlcore's ordering crash this very environment, so the
    tests above prove the workaround. If this fails, a new TensorFlow or Triton fixed the clash."""
    out = run("import tensorflow\nimport torch._dynamo\nprint('OK')")
    assert out.returncode == -11, f"expected SIGSEGV, got exit code {out.returncode}"
