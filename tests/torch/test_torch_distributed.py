"""Data parallel on PyTorch (issue #17): 2 gloo processes under ``torchrun`` (tests/torch/torch_dp_worker.py)
against the same runs in this process on one device.

Each replica trains on its half of every global batch of 16 (3 steps): its trainable weights must be
the single-device run's within 1e-5 (SGD with momentum; AdamW with weight decay, sample weights and
clipping), its frozen tensors (BatchNorm statistics included, a frozen BatchNorm inside the trained
path) bit-identical to the start, every replica's state identical; History is the same on both ranks,
only rank 0 writes checkpoints and progress; the cached-feature run computes half the features per
rank and trains the head as the single-device cached run does.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tlcore as tl  # noqa: E402
from tlcore_torch.distributed import TORCHRUN_ENV  # noqa: E402

pytestmark = pytest.mark.xdist_group("subprocess")

WORKER = Path(__file__).with_name("torch_dp_worker.py")
_spec = importlib.util.spec_from_file_location("torch_dp_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

RANKS = (0, 1)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Run the worker under torchrun (2 gloo processes on a free port); its output folder and reports."""
    out = tmp_path_factory.mktemp("dp")
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(out)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in RANKS]


@pytest.fixture(scope="module")
def single() -> dict:
    """The same scenarios in this process on one device (no strategy)."""
    ft, hists, after_first = worker.sgd(None, progress=False)
    runs = {"sgd": (after_first, hists[:1]), "sgd2": (ft.state(), hists[1:])}
    for name in ("adamw", "cached", "bn_trains", "diverges", "resumed"):
        ft, hists = getattr(worker, name)(None)
        runs[name] = (ft.state(), hists)
    return runs


def states(out: Path, name: str) -> list[dict[str, np.ndarray]]:
    return [dict(np.load(out / f"{name}_rank{r}.npz")) for r in RANKS]


def digest(state: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode() + np.ascontiguousarray(state[k]).tobytes())
    return h.hexdigest()


def start_state(freeze: tl.FreezePolicy) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    ft = worker.model(freeze)
    return ft.state(), ft.trainable_mask()


def assert_close(got: np.ndarray, want: np.ndarray, name: str, rel: float = 1e-5) -> None:
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    assert err <= rel * max(float(np.max(np.abs(want))), 1e-12), f"{name}: max |diff| {err:.3g}"


@pytest.mark.parametrize("name, freeze", [("sgd", worker.FROZEN), ("adamw", worker.FROZEN)])
def test_two_replicas_train_as_one_device(replicas, single, name, freeze):
    out, _ = replicas
    start, mask = start_state(freeze)
    want = single[name][0]
    ranks = states(out, name)
    assert digest(ranks[0]) == digest(ranks[1])  # every replica holds the same weights
    trained = [k for k in start if mask[k] and start[k].dtype.kind == "f"]
    assert {k.split(".")[0] for k in trained} == {"conv2", "head"}
    for state in ranks:
        for k in trained:
            assert_close(state[k], want[k], k)
            assert np.max(np.abs(state[k] - start[k])) > 1e-4, f"{k} did not train"  # negative control
        for k in start:
            if not mask[k]:  # conv1, bn1 and bn2 (weights and statistics): never synced, never updated
                assert np.array_equal(state[k], start[k]), f"frozen {k} changed"


def test_policy_change_between_fits_rewraps(replicas, single):
    out, _ = replicas
    after_first = states(out, "sgd")[0]
    want = single["sgd2"][0]
    for state in states(out, "sgd2"):
        for k in ("conv2.weight", "conv2.bias"):  # frozen by the second fit's policy
            assert np.array_equal(state[k], after_first[k])
        for k in ("head.out.weight", "head.out.bias"):
            assert_close(state[k], want[k], k)
            assert not np.array_equal(state[k], after_first[k])


def test_history_is_the_same_on_every_rank(replicas, single):
    _, reports = replicas
    for name in ("sgd", "adamw", "cached", "bn_trains", "diverges"):
        got = [[run["history"] for run in rep[name]] for rep in reports]
        assert got[0] == got[1], name
        if name == "bn_trains":
            continue  # per-replica BatchNorm statistics: not the one-device run (checked below)
        want = single["sgd"][1] + single["sgd2"][1] if name == "sgd" else single[name][1]
        assert len(got[0]) == len(want)
        for run, h in zip(got[0], want):
            assert run.keys() == h.history.keys()
            for key, values in run.items():
                assert values == pytest.approx(h.history[key], rel=1e-5), (name, key)


def test_resume_under_torchrun_continues_the_run(replicas, single):
    """A run checkpointed by rank 0, crashed after its first epoch and resumed with tl.resume on every
    rank ends as the uninterrupted one-device run (weights, frozen state, History)."""
    out, reports = replicas
    want, (h,) = single["resumed"]
    ranks = states(out, "resumed")
    assert digest(ranks[0]) == digest(ranks[1])
    start, mask = start_state(worker.FROZEN)
    for k in start:
        if mask[k]:
            assert_close(ranks[0][k], want[k], k)
            assert np.max(np.abs(ranks[0][k] - start[k])) > 1e-4, f"{k} did not train"  # negative control
        else:
            assert np.array_equal(ranks[0][k], start[k]), f"frozen {k} changed"
    for rep in reports:
        (run,) = rep["resumed"]
        assert run["info"]["steps"] == h.info["steps"] == 6  # the run's steps: 3 before the crash, 3 after
        assert len(run["history"]["loss"]) == 2
        assert run["history"]["loss"] == pytest.approx(h.history["loss"], rel=1e-5)


def test_only_rank0_writes_checkpoints_and_progress(replicas):
    out, reports = replicas
    assert (out / "ckpt0" / "train_state.safetensors").is_file()
    assert not (out / "ckpt1").exists() or not any((out / "ckpt1").iterdir())
    assert [rep["sgd"][0]["info"]["checkpoint_writes"] for rep in reports] == [1, 0]
    assert "epoch 1/1" in reports[0]["progress"]
    assert reports[1]["progress"] == ""


def test_cached_features_are_sharded(replicas, single):
    out, reports = replicas
    for rep in reports:
        assert rep["cached_rows"] == [worker.N // 2]  # each replica computed its half of the features
        assert rep["cached"][0]["info"]["cache_features"] == "used"
    # outside a fit, rank 0 alone computes all of them (no collective)
    assert reports[0]["features_outside_fit"] == [worker.N, [worker.N]]
    want = single["cached"][0]
    ranks = states(out, "cached")
    assert digest(ranks[0]) == digest(ranks[1])
    start, mask = start_state(tl.FreezePolicy.all())
    for state in ranks:
        for k in start:
            if mask[k]:
                assert_close(state[k], want[k], k)
            else:
                assert np.array_equal(state[k], start[k]), k


def test_trainable_batchnorm_statistics_are_averaged(replicas, single):
    out, _ = replicas
    ranks = states(out, "bn_trains")
    assert digest(ranks[0]) == digest(ranks[1])
    start, _ = start_state(tl.FreezePolicy.up_to("conv1", bn="train"))
    want = single["bn_trains"][0]
    # bn1 sees the frozen conv1's output: the replicas' averaged running mean is the one-device one
    assert not np.allclose(ranks[0]["bn1.running_mean"], start["bn1.running_mean"])
    assert_close(ranks[0]["bn1.running_mean"], want["bn1.running_mean"], "bn1.running_mean")
    assert int(ranks[0]["bn1.num_batches_tracked"]) == 3


def test_a_nonfinite_step_is_refused_on_every_rank(replicas, single):
    out, reports = replicas
    infos = [rep["diverges"][0]["info"] for rep in reports]
    # the overflow is in rank 1's rows only; both ranks refuse the step and report the same
    assert infos[0] == infos[1] == {"steps": 2, "cache_features": infos[0]["cache_features"],
                                    "diverged": {"epoch": 0, "step": 2, "tensor": "loss"}}
    assert single["diverges"][1][0].info["diverged"] == infos[0]["diverged"]
    ranks = states(out, "diverges")
    assert digest(ranks[0]) == digest(ranks[1])
    want = single["diverges"][0]
    for k in ("conv2.weight", "head.out.weight"):
        assert_close(ranks[0][k], want[k], k)  # the weights of the last finite step (2 steps)


def test_bad_inputs_raise_named_errors_before_training(replicas):
    _, reports = replicas
    for rep in reports:
        errors = rep["errors"]
        assert errors["odd_batch"][0] == "DataError" and "multiple of 2" in errors["odd_batch"][1]
        assert errors["devices_3"][0] == "DistributedError" and "2 process(es)" in errors["devices_3"][1]
        assert errors["unchanged"]
        # frozen weights that differ between the ranks: refused on both alike, nothing trained
        kind, message = errors["frozen_differ"]
        assert kind == "DistributedError" and "2 tensor(s) that do not train differ between the ranks (first: 'conv1.weight')" in message
        assert "seed the initialisation alike" in message and errors["frozen_differ_unchanged"]


def test_without_a_process_group(monkeypatch):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    ft, (x, y) = worker.model(worker.FROZEN), worker.dataset()
    before = ft.state()
    with pytest.raises(tl.DistributedError, match="torchrun"):
        ft.fit(x, y, batch_size=16, strategy=tl.distribute.DataParallel())
    with pytest.raises(tl.DistributedError, match=r"engine=object\) is for the keras backend .* leave engine=None"):
        ft.fit(x, y, batch_size=16, strategy=tl.distribute.DataParallel(engine=object()))
    assert all(np.array_equal(before[k], v) for k, v in ft.state().items())
    assert not torch.distributed.is_initialized()
    # one device asked for: the single-device fit itself
    one, _ = worker.adamw(tl.distribute.DataParallel(devices=1))
    plain, _ = worker.adamw(None)
    assert digest(one.state()) == digest(plain.state())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_group_from_torchrun_env_is_the_single_device_fit(monkeypatch):
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    plain, hp = worker.adamw(None)
    try:
        dp, hd = worker.adamw(tl.distribute.DataParallel())
        assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1  # tlcore initialised it
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert digest(dp.state()) == digest(plain.state())  # bit-identical
    assert hd[0].history == hp[0].history
