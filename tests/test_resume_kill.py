"""A run SIGKILLed at random moments and resumed with ``tl.resume`` in a new process ends bit-identical
to a run never interrupted (same backend), and within 1e-4 of it when continued on another backend.
Each process is tests/resume_worker.py (AdamW + cosine + staged unfreezing + dropout, a checkpoint
every 2 steps)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tlcore.testing import selected_backends

WORKER = Path(__file__).with_name("resume_worker.py")
#: kills per backend (at least 10 in all across torch, Keras and JAX)
KILLS = {"torch": 4, "keras": 3, "jax": 3}
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("subprocess")]


def run(backend: str, folder: Path, out: Path, dropout: float, kill_delay: float | None = None) -> tuple[int, str]:
    """Run the worker; with ``kill_delay``, SIGKILL it that many seconds after it reports the end of
    an epoch it trained (not the one it resumed in). Returns its exit code and the position it resumed at ('' for a fresh start)."""
    p = subprocess.Popen([sys.executable, str(WORKER), backend, str(folder), str(out), str(dropout)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    resumed, first = "", 0
    try:
        for line in p.stdout:
            if line.startswith("resumed"):
                resumed, first = line.strip(), int(line.split()[3]) + 1
            if line.startswith("epoch") and int(line.split()[1]) >= first and kill_delay is not None:
                time.sleep(kill_delay)
                p.send_signal(signal.SIGKILL)
                break
        _, err = p.communicate(timeout=240)
    finally:
        p.kill()
    if p.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"the worker failed ({p.returncode}):\n{err[-3000:]}")
    return p.returncode, resumed


def result(out: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(str(out) + ".npz", allow_pickle=False) as f:
        state = {k: f[k] for k in f.files}
    return state, json.loads(Path(str(out) + ".json").read_text())


@pytest.mark.parametrize("backend", [b for b in KILLS if b in selected_backends()])
def test_killed_at_random_moments_and_resumed_equals_the_uninterrupted_run(backend, tmp_path):
    assert run(backend, tmp_path / "whole", tmp_path / "whole", 0.2)[0] == 0
    expected, expected_log = result(tmp_path / "whole")
    rng = np.random.default_rng(sum(map(ord, backend)))
    kills, positions = 0, []
    for _ in range(KILLS[backend]):
        code, resumed = run(backend, tmp_path / "run", tmp_path / "out", 0.2, kill_delay=float(rng.uniform(0, 0.02)))
        positions.append(resumed)
        kills += code == -signal.SIGKILL
        if code == 0:
            break
    code, resumed = run(backend, tmp_path / "run", tmp_path / "out", 0.2)
    positions.append(resumed)
    print(f"{backend}: {kills} kills; resumed {positions[1:]}")
    assert code == 0 and kills == KILLS[backend], f"every planned kill happened mid-run ({kills})"
    assert len(set(positions[1:])) == len(positions) - 1, f"each resume started elsewhere: {positions}"
    state, log = result(tmp_path / "out")
    assert log == expected_log, "History and learning rates identical"
    changed = [k for k in expected if not np.array_equal(expected[k], state[k])]
    assert not changed, f"not bit-identical after {kills} kills: {changed}"


@pytest.mark.skipif(len(selected_backends()) < 2, reason="needs two backends")
def test_a_run_killed_on_torch_continues_on_the_other_backends(tmp_path):
    """Without dropout (each framework draws its own masks), resumed on Keras or JAX, the final weights
    are within 1e-4 relative of the uninterrupted torch run (Keras keeps the biased batch variance in
    its moving variance, so that statistic is left out there)."""
    source = selected_backends()[0]
    assert run(source, tmp_path / "whole", tmp_path / "whole", 0.0)[0] == 0
    expected, _ = result(tmp_path / "whole")
    assert run(source, tmp_path / "run", tmp_path / "killed", 0.0, kill_delay=0.005)[0] == -signal.SIGKILL
    for other in [b for b in selected_backends() if b != source]:
        folder = tmp_path / f"run_{other}"
        shutil.copytree(tmp_path / "run", folder)
        code, resumed = run(other, folder, tmp_path / other, 0.0)
        assert code == 0 and resumed.startswith("resumed at epoch"), resumed
        state, _ = result(tmp_path / other)
        assert set(state) == set(expected)
        for name, value in expected.items():
            if name.endswith("num_batches_tracked") or (other == "keras" and name.endswith("running_var")):
                continue
            np.testing.assert_allclose(state[name], value, rtol=1e-4, atol=1e-5, err_msg=f"{source} -> {other}: {name}")
