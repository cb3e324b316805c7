"""Keras data parallel (``fit(strategy=tl.distribute.DataParallel())``): the step under TensorFlow's
``MirroredStrategy``. Two logical CPU devices exist only if TensorFlow is told before it initialises,
so the 2-replica checks run in a process of their own (``keras_dp_worker.py``): 3 steps of SGD-momentum and
of AdamW with clipping at a global batch of 16 against one device on the same data order (trainable
weights within 1e-5 relative), frozen tensors and BatchNorm statistics bit-identical to the start on
the model and on every replica, every replica's copies identical (hashes), a frozen BatchNorm never
synchronised, a BatchNorm that trains averaged over the replicas, cached features (each replica
computes its shard) and the head trained on them as on one device, the all-reduced non-finite guard,
and the errors raised before training. This process has one CPU device: ``DataParallel()`` is then
the single-device path, bit for bit."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tlcore as tl
from tlcore.testing import selected_backends

if "keras" not in selected_backends():
    pytest.skip("keras is not in TLCORE_TEST_BACKENDS", allow_module_level=True)

BACKEND = tl.get_backend("keras")  # before `import keras`: makes Keras run on TensorFlow

from tlcore_keras import distributed  # noqa: E402
from tlcore_keras.train import KerasTrainer  # noqa: E402

WORKER = Path(__file__).with_name("keras_dp_worker.py")
TOL = 1e-5


@pytest.fixture(scope="module")
def run() -> dict:
    out = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def identical(hashes: dict) -> bool:
    """Every replica's weights, optimizer slots and other state hash the same."""
    return all(len(set(h)) == 1 and len(h) == 2 for h in hashes.values())


def test_worker_has_two_logical_devices(run):
    assert run["devices"] == ["/device:CPU:0", "/device:CPU:1"]


@pytest.mark.parametrize("case", ["sgd", "adamw_clip"])
def test_two_replicas_match_one_device(run, case):
    r = run[case]
    assert r["count"] == 2 and r["steps"] == 3 and r["cache"].startswith("refused")
    assert r["trainable_rel"] < TOL
    assert r["moved"] > 1e-3  # (trained: a stuck step would match trivially)
    assert r["loss_rel"] < TOL
    assert r["frozen"] == [f"bn{i}.{k}" for i in (1, 2) for k in ("beta", "gamma", "moving_mean", "moving_variance")]
    assert r["frozen_identical"] and r["replica_states_identical_to_start"]
    assert r["synced"] == []  # a frozen BatchNorm is never synchronised
    assert identical(r["hashes"])


def test_clipping_is_active(run):
    assert run["clip_matters"] > 1e-3  # negative control: the clipped and unclipped runs differ


def test_one_device_is_the_single_device_path(run):
    assert run["one_device_identical"]
    assert run["one_device_trainer"] == ["KerasTrainer"]


def test_a_mirrored_strategy_of_ones_own_is_the_engine(run):
    assert run["engine"] == {"identical": True, "count": [2], "runs_on_it": [True]}


def test_training_batchnorm_is_averaged_over_replicas(run):
    r = run["bn_train"]
    assert r["stats_moved"] and r["synced"] == 4 and identical(r["hashes"])
    # negative control of the comparison: per-shard batch statistics are not the global batch's
    assert r["trainable_rel"] > 1e-3


def test_averaged_moving_mean_is_the_one_device_one(run):
    r = run["bn_mean"]
    assert r["moved"] and r["rel"] < TOL
    assert r["variance_rel"] > 1e-4  # negative control: the per-shard variances are not the global one


def test_cached_features_and_head(run):
    r = run["cached"]
    assert r["cache"] == ["used", "used"] and r["count"] == 2
    assert r["trainable_rel"] < TOL and r["frozen_identical"] and identical(r["hashes"])
    assert run["features_shape"] == [13, 16] and run["features_rel"] < TOL


def test_dropout_seeds_per_replica(run):
    r = run["dropout"]
    assert r["rng"] == ["dropout.seed_generator_state"] and r["seeded"] == 1
    assert r["rng_moved"] and r["rng_identical"]  # advanced as on one device
    assert r["moved"] > 1e-3 and identical(r["hashes"])


def test_fits_continue(run):
    assert run["continue_rel"] < 1e-6


def test_nonfinite_on_one_replica_stops_both(run):
    r = run["nonfinite"]
    assert isinstance(r, dict), r
    assert r["tensor"] == "loss" and r["unchanged"] and identical(r["hashes"])


def test_errors_before_training(run):
    e = run["errors"]
    assert e["batch15"][0] == "DataError" and "multiple of 2" in e["batch15"][1]
    assert e["devices3"][0] == "DistributedError"
    assert "sees 2 CPU device(s)" in e["devices3"][1] and "set_logical_device_configuration" in e["devices3"][1]
    assert run["errors_unchanged"]


# ---------------------------------------------------------------- in this process: one CPU device
def one_device_model() -> tl.Model:
    return tl.finetune(BACKEND.reference_model(seed=0), cut=tl.LayerCut(at="pool"), head=tl.Head.linear(3),
                       freeze=tl.FreezePolicy.matching(r"^bn"), seed=0)


def test_one_visible_device_is_bit_identical():
    if len(distributed.visible_devices()) != 1:
        pytest.skip("this process sees several devices")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8, 8, 3)).astype(np.float32), rng.integers(0, 3, 32)
    a, b = one_device_model(), one_device_model()
    fit = dict(batch_size=16, optimizer=tl.optim.AdamW(lr=0.01), clip_grad_norm=0.1, progress=False)
    a.fit(x, y, **fit)
    b.fit(x, y, strategy=tl.distribute.DataParallel(), **fit)
    sa, sb = a.state(), b.state()
    assert all(np.array_equal(sa[n], sb[n]) for n in sa)
    assert not np.array_equal(sb["conv1.kernel"], one_device_model().state()["conv1.kernel"])  # it trained
    assert [type(t) for t in b._trainers.values()] == [KerasTrainer]
    m = one_device_model()
    with pytest.raises(tl.DistributedError, match="set_logical_device_configuration"):
        m.fit(x, y, batch_size=16, strategy=tl.distribute.DataParallel(devices=2), progress=False)
    assert all(np.array_equal(v, one_device_model().state()[n]) for n, v in m.state().items())
