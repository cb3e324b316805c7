"""Keras runs on TensorFlow: what happens with ``KERAS_BACKEND``, and what each import pulls in.

Each case runs in a fresh interpreter, because Keras fixes its backend at its first import."""
import os
import subprocess
import sys

import pytest

import tlcore as tl
from tlcore.testing import selected_backends

if "keras" not in selected_backends():
    pytest.skip("keras is not in TLCORE_TEST_BACKENDS", allow_module_level=True)

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "flax", "optax")
REPORT = f"\nimport sys\nprint('IMPORTED', *sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))"


def run(code: str, keras_backend: str | None = None) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("KERAS_BACKEND", None)
    if keras_backend is not None:
        env["KERAS_BACKEND"] = keras_backend
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def imported(stdout: str) -> set[str]:
    return set(next(line for line in stdout.splitlines() if line.startswith("IMPORTED")).split()[1:])


@pytest.mark.skipif("jax" not in tl.available_backends(), reason="Keras on JAX needs jax")
def test_keras_imported_with_another_backend_raises_a_named_error():
    code = ("import keras, tlcore as tl\n"
            "from tlcore_keras import KerasBackendError\n"
            "model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])\n"
            "for attempt in (lambda: tl.get_backend('keras'), lambda: tl.wrap(model)):\n"
            "    try:\n"
            "        attempt()\n"
            "    except KerasBackendError as e:\n"
            "        assert isinstance(e, tl.TlcoreError)\n"
            "        print('ERROR', e)\n")
    lines = [line for line in run(code, keras_backend="jax").splitlines() if line.startswith("ERROR")]
    assert len(lines) == 2, lines
    assert all("KERAS_BACKEND" in line and "'jax'" in line for line in lines)


def test_keras_backend_is_set_to_tensorflow_before_keras_is_imported():
    code = ("import warnings, tlcore as tl\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    tl.get_backend('keras')\n"
            "import keras\n"
            "print('BACKEND', keras.backend.backend(), any('KERAS_BACKEND' in str(w.message) for w in caught))\n"
            "m = tl.finetune(keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name='a')]),"
            " head=tl.Head.linear(2))\n"
            "m.fit([[0., 1., 2.]], [1], progress=False)" + REPORT)
    out = run(code, keras_backend="jax")
    assert "BACKEND tensorflow True" in out  # overridden, with a warning naming KERAS_BACKEND
    assert imported(out) == {"tensorflow", "keras"}  # neither torch nor JAX (which tf.lite would import)


def test_tlcore_and_the_torch_backend_never_import_tensorflow():
    code = ("import tlcore as tl, tlcore_keras\n"
            "assert 'keras' in tl.available_backends()\n"
            "import torch\n"
            "m = tl.wrap(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()))\n"
            "tl.finetune(m, head=tl.Head.linear(2)).fit([[0., 1., 2.]], [1], progress=False)" + REPORT)
    assert imported(run(code)) == {"torch"}
