"""Data parallel on JAX (``fit(strategy=tl.distribute.DataParallel())``, ``tlcore_jax.distributed``):
two forced XLA host devices train as one device on the same global batches (SGD with momentum, AdamW
with clipping), frozen tensors stay bit-identical on every replica, every replica holds the same
weights, the step compiles once, a frozen BatchNorm is never synchronised (the compiled step
all-reduces the trainable gradients only) while a trainable one normalises over the global batch,
cached features are computed shard by shard, one device is exactly the single-device path, and two
processes after ``jax.distributed.initialize()`` train as one device too.

JAX fixes its devices when it starts, so the runs on two devices are made by ``jax_dp_worker.py`` in
processes of their own (started together, once for this module); the tests assert on what they
measured."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tlcore as tl
from tlcore.testing import sample_data

pytest.importorskip("flax", reason="the JAX backend (jax, flax, optax) is not installed")
import jax  # noqa: E402

from tlcore_jax.distributed import DataParallelTrainer  # noqa: E402

WORKER = Path(__file__).with_name("jax_dp_worker.py")
TOL = 1e-5
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _result(proc: subprocess.Popen, out: Path) -> dict:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == 0, f"{proc.args} failed:\n{err[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The worker's measurements: ``devices`` (one process, 2 forced host devices) and ``processes``
    (2 processes of 1 CPU device each, a coordinator on localhost), started together."""
    folder = tmp_path_factory.mktemp("dp")
    port = _free_port()
    jobs = {"devices": ([sys.executable, str(WORKER), "devices", str(folder / "devices.json")], _env(2),
                        folder / "devices.json")}
    for rank in range(2):
        out = folder / f"process{rank}.json"
        cmd = [sys.executable, str(WORKER), "process", str(rank), str(port), str(out)]
        jobs[f"process{rank}"] = (cmd, _env(None), out)
    procs = {k: (subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out)
             for k, (cmd, env, out) in jobs.items()}
    results = {k: _result(proc, out) for k, (proc, out) in procs.items()}
    return {"devices": results["devices"], "processes": [results["process0"], results["process1"]]}


@pytest.fixture(scope="module")
def devices(runs) -> dict:
    assert runs["devices"]["device_count"] == 2
    return runs["devices"]


# ---------------------------------------------------------------- two devices against one


@pytest.mark.parametrize("run", ["sgd", "adamw", "sgd_bn"])
def test_two_devices_train_as_one_device_on_the_global_batch(devices, run):
    r = devices[run]
    assert r["moved"] > 1e-3, "the trainable tensors trained (the comparison is not of untouched values)"
    assert r["rel_diff"] <= TOL, f"{run}: trainable tensors differ by {r['rel_diff']:.2e} relative"
    # negative control: the same run on another data order is far outside the tolerance
    assert r["control_other_order"] > 1e-3
    assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-6)
    assert r["rng_identical"], "dropout draws the same keys on the sharded batch"


def test_trainable_batchnorm_normalises_over_the_global_batch(devices):
    r = devices["sgd_bn"]
    assert {"bn2.mean", "bn2.var"} <= set(r["trainable"]), "bn2's moving statistics compared within 1e-5"
    assert r["rel_diff"] <= TOL
    # the step all-reduces bn2's batch sums (the forward pass's statistics and their backward): more
    # all-reduced tensors than trainable gradients
    hlo = devices["hlo_trainable_bn"]
    assert len(hlo["allreduced"]) > len(hlo["trainable"])


def test_frozen_batchnorm_never_syncs_and_frozen_tensors_stay_bit_identical_on_every_replica(devices):
    for run in ("sgd", "adamw"):
        r = devices[run]
        assert {"bn1.mean", "bn1.var", "bn2.mean", "bn2.var", "conv1.kernel"} <= set(r["frozen"])
        assert r["frozen_identical"], f"{run}: a frozen tensor changed"
        assert r["replicas"]["const_count"] == len(r["frozen"])
        assert r["replicas"]["const_equal_start"], f"{run}: a replica's frozen tensor differs from the start"
    hlo = devices["hlo_frozen_bn"]
    assert hlo["allreduced"] == hlo["trainable"], "only the trainable gradients are all-reduced (and the loss)"
    assert hlo["scalars"] <= 2
    assert hlo["shard_input"] and not hlo["whole_input"], "each device runs its half of the batch"


@pytest.mark.parametrize("run", ["sgd", "adamw", "sgd_bn"])
def test_every_replica_holds_the_same_weights_and_the_model_one_copy(devices, run):
    r = devices[run]["replicas"]
    assert r["type"] == "DataParallelTrainer"
    assert r["devices"] == [2] and r["replicated"], "parameters, state and optimizer state on both devices"
    assert r["equal"], "the replicas' copies differ"
    assert devices[run]["module_devices"] == [1], "fit writes one copy back to the module"


@pytest.mark.parametrize("run", ["sgd", "adamw", "sgd_bn"])
def test_the_step_compiles_once_and_is_shared(devices, run):
    first, again, other_model = devices[run]["compilations"]
    assert (first, again, other_model) == (1, 0, 0)


def test_cached_features_are_computed_per_shard_and_train_the_head_as_on_one_device(devices):
    r = devices["cached"]
    assert r["used"] == ["used", "used"]
    assert r["rel_diff"] <= TOL
    assert r["features_shape"] == [15, 16] and r["features_diff"] <= 1e-6, "an odd batch is padded, then cut"
    assert r["shard_input"] and not r["whole_input"], "each device computes the features of its shard"


def test_a_stream_of_batches_trains_as_on_one_device_and_refuses_a_batch_that_does_not_split(devices):
    r = devices["stream"]
    assert r["rel_diff"] <= TOL
    assert np.allclose(r["loss"][0], r["loss"][1], rtol=1e-6)
    assert r["odd_batch"] is not None and r["odd_batch"][0] == "DataError"
    assert "15 samples does not split over 2 replicas" in r["odd_batch"][1]


def test_one_device_of_two_is_exactly_the_single_device_path(devices):
    assert devices["devices1"] == {"identical": True, "type": "JaxTrainer"}


def test_what_cannot_split_or_run_is_refused_before_training(devices):
    e = devices["errors"]
    assert e["batch15"][0] == "DataError" and "15" in e["batch15"][1] and "2 replicas" in e["batch15"][1]
    assert e["last_batch"][0] == "DataError" and "13 of the 45" in e["last_batch"][1]
    assert e["devices3"][0] == "DistributedError"
    assert "JAX sees 2" in e["devices3"][1] and "--xla_force_host_platform_device_count=3" in e["devices3"][1]
    assert e["unchanged"], "a refused fit trained nothing"


# ---------------------------------------------------------------- two processes


def _rel_diff(a: dict, b: dict, names) -> float:
    return max(float(np.max(np.abs(np.asarray(a[n]) - np.asarray(b[n]))) / max(np.max(np.abs(b[n])), 1e-12))
               for n in names)


def test_two_processes_train_as_one_device(runs, devices):
    first, second = runs["processes"]
    assert [first["process_index"], second["process_index"]] == [0, 1]
    assert first["process_count"] == second["process_count"] == 2
    assert first["replicas"] == [2, 0] and second["replicas"] == [2, 1]
    assert first["hash"] == second["hash"], "both processes end with the same weights"
    assert first["loss"] == second["loss"], "and the same History"
    assert first["compilations"] == 1
    # against the same runs on one device (made by the devices worker)
    one, one_cached = devices["adamw"]["one_device_state"], devices["cached"]["one_device_state"]
    trainable = [n for n in first["trainable"] if n in one]
    assert {"conv2.kernel", "head.out.weight"} <= set(trainable)
    for r in (first, second):
        assert _rel_diff(r["state"], one, trainable) <= TOL
        assert r["cached_used"] == "used"
        assert _rel_diff(r["cached_state"], one_cached, ["head.out.weight", "head.out.bias"]) <= TOL
    # negative control: another single-device run (SGD) is far outside the tolerance
    assert _rel_diff(first["state"], devices["sgd"]["one_device_state"], trainable) > 1e-3


# ---------------------------------------------------------------- one device (this process)


@pytest.mark.skipif(jax.device_count() != 1, reason="this process has more than one device")
def test_one_device_strategy_is_bit_identical_to_no_strategy():
    def run(strategy):
        ft = tl.finetune(tl.get_backend("jax").reference_model(seed=0), cut=tl.LayerCut(drop_last=1),
                         head=tl.Head.linear(3), freeze=tl.FreezePolicy.matching(r"^(conv1|bn)"), seed=0)
        x, y = sample_data(ft, n=48)
        hist = ft.fit(x, y, epochs=2, batch_size=16, optimizer=tl.optim.AdamW(lr=1e-2), clip_grad_norm=0.05,
                      progress=False, strategy=strategy)
        return ft, hist

    plain, with_strategy = run(None), run(tl.distribute.DataParallel())
    a, b = plain[0].state(), with_strategy[0].state()
    assert all(a[n].tobytes() == b[n].tobytes() for n in a)
    assert plain[1].history == with_strategy[1].history
    assert not any(isinstance(t, DataParallelTrainer) for t in with_strategy[0]._trainers.values())
    # negative control: a different run is not bit-identical
    ft, _ = run(None)
    ft.fit(*sample_data(ft, n=16), epochs=1, batch_size=16, progress=False, optimizer=tl.optim.AdamW(lr=1e-2))
    assert any(ft.state()[n].tobytes() != a[n].tobytes() for n in a)


@pytest.mark.skipif(jax.device_count() != 1, reason="this process has more than one device")
def test_more_devices_than_there_are_is_a_distributed_error_naming_the_flag():
    ft = tl.finetune(tl.get_backend("jax").reference_model(seed=0), cut=tl.LayerCut(drop_last=1),
                     head=tl.Head.linear(3))
    x, y = sample_data(ft, n=16)
    with pytest.raises(tl.DistributedError, match=r"JAX sees 1 cpu device.*xla_force_host_platform_device_count=2"):
        ft.fit(x, y, batch_size=16, progress=False, strategy=tl.distribute.DataParallel(devices=2))
    assert np.all([not isinstance(t, DataParallelTrainer) for t in ft._trainers.values()])


def test_an_engine_is_refused_naming_what_jax_runs_on():
    ft = tl.finetune(tl.get_backend("jax").reference_model(seed=0), cut=tl.LayerCut(drop_last=1),
                     head=tl.Head.linear(3))
    x, y = sample_data(ft, n=16)
    before = ft.state()
    with pytest.raises(tl.DistributedError, match=r"engine=object\) is for the keras backend .*jax.devices\(\)"):
        ft.fit(x, y, batch_size=16, progress=False, strategy=tl.distribute.DataParallel(engine=object()))
    assert all(np.array_equal(before[n], v) for n, v in ft.state().items())
