"""Keras data parallel across processes (several hosts): ``DataParallel(engine=strategy)`` with a
``tf.distribute.MultiWorkerMirroredStrategy`` made at the start of each process from ``TF_CONFIG``.
Two workers on localhost (``keras_multiworker_worker.py``), one CPU replica each, the collectives
over gRPC as between hosts: 3 steps at a global batch of 16 against one device on the same data
order (trainable weights within 1e-5), both workers ending on the same weights although worker 1
drew its head from another seed (the broadcast from replica 0), the same ``History`` on both, frozen
tensors bit-identical, a training BatchNorm's moving mean averaged over the hosts, cached features
gathered from both, only the chief writing checkpoints, ``tl.resume`` on every worker from the chief's
checkpoint, and a cluster without the engine refused."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tlcore as tl
from tlcore.testing import selected_backends

if "keras" not in selected_backends():
    pytest.skip("keras is not in TLCORE_TEST_BACKENDS", allow_module_level=True)

WORKER = Path(__file__).with_name("keras_multiworker_worker.py")
TOL = 1e-5


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch(tmp: Path) -> list[subprocess.CompletedProcess]:
    ports = ",".join(map(str, free_ports(2)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = []
    for i in range(2):
        (tmp / str(i)).mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(i), ports, str(tmp / str(i))],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return outs


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> list[dict]:
    for attempt in range(2):  # a port taken between choosing and binding it: once more on others
        outs = launch(tmp_path_factory.mktemp(f"workers{attempt}"))
        if all(o.returncode == 0 for o in outs):
            return [json.loads(o.stdout) for o in outs]
    pytest.fail("\n".join(o.stderr[-3000:] for o in outs))


def test_each_worker_runs_one_of_the_two_replicas(workers):
    assert [(w["count"], w["ids"]) for w in workers] == [(2, [0]), (2, [1])]


@pytest.mark.parametrize("case", ["sgd", "adamw_clip", "cached"])
def test_two_hosts_train_as_one_device(workers, case):
    a, b = (w[case] for w in workers)
    assert a["start"] != b["start"]  # worker 1 drew its head from another seed ...
    assert a["end"] == b["end"]  # ... and ends on worker 0's weights: the broadcast from replica 0
    for r in (a, b):
        assert r["trainable_rel"] < TOL
        assert r["frozen_identical"]
        assert r["loss"] == a["loss"]  # the same History on both workers (gathered outputs)
        assert abs(r["loss"][0] - r["one_loss"][0]) < TOL * abs(r["one_loss"][0])
    assert a["moved"] > 1e-3  # (trained: a stuck step would match trivially)


def test_cached_features_are_gathered_from_both_workers(workers):
    assert [w["cached"]["cache"] for w in workers] == ["used", "used"]


def test_a_training_batchnorm_is_averaged_over_the_hosts(workers):
    """(Checkpointed after every step: the averaging runs on every host at each checkpoint; were it
    run by the chief alone, the workers would wait on each other and the fixture time out.)"""
    a, b = (w["bn_train"] for w in workers)
    assert a["moving_mean_moved"] and a["state"] == b["state"]
    # each worker's shard gives another mean: only the average over both hosts is the 1-device one
    assert a["moving_mean_rel"] < TOL


def test_only_the_chief_writes_checkpoints(workers):
    assert workers[0]["files"] == ["train_state.safetensors"]
    assert workers[1]["files"] == []


def test_resume_on_every_worker_continues_the_run(workers):
    """Checkpointed by the chief into a shared folder, crashed after the first epoch on every worker,
    resumed with tl.resume on each: ends as the uninterrupted 1-device run."""
    a, b = (w["resumed"] for w in workers)
    assert a["end"] == b["end"] and a["loss"] == b["loss"]
    for r in (a, b):
        assert r["steps"] == 6 and len(r["loss"]) == 2  # 3 steps before the crash, 3 after
        assert r["trainable_rel"] < TOL and r["frozen_identical"]
        assert r["loss"] == pytest.approx(r["one_loss"], rel=TOL)


def test_frozen_weights_that_differ_between_hosts_are_refused_on_both(workers):
    for w in workers:
        kind, message, unchanged = w["frozen_differ"]
        assert kind == "DistributedError" and unchanged
        assert "2 tensor(s) that do not train differ between the hosts (first: 'reference/conv1/kernel')" in message


def test_a_cluster_without_the_engine_is_refused(workers):
    for w in workers:
        kind, message = w["no_engine"]
        assert kind == "DistributedError"
        assert "TF_CONFIG names a cluster of 2 tasks" in message and "DataParallel(engine=strategy)" in message


def test_engine_errors_before_training(monkeypatch):
    with pytest.raises(tl.DistributedError, match="devices=... or engine=..., not both"):
        tl.distribute.DataParallel(devices=2, engine=object())
    m = tl.finetune(tl.get_backend("keras").reference_model(seed=0), cut=tl.LayerCut(at="pool"),
                    head=tl.Head.linear(3), seed=0)
    start = m.state()
    x, y = np.zeros((4, 8, 8, 3), np.float32), np.zeros(4, np.int64)
    with pytest.raises(tl.DistributedError, match="takes a tf.distribute.MirroredStrategy or "
                                                  "MultiWorkerMirroredStrategy, got object"):
        m.fit(x, y, progress=False, strategy=tl.distribute.DataParallel(engine=object()))
    # a one-host engine where TF_CONFIG names a cluster: each process would train alone
    import tensorflow as tf

    one_host = tf.distribute.MirroredStrategy(["/cpu:0"])
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    with pytest.raises(tl.DistributedError, match=r"cluster of 2 tasks, but DataParallel\(engine=MirroredStrategy\) "
                                                  "runs on this process's devices only"):
        m.fit(x, y, progress=False, strategy=tl.distribute.DataParallel(engine=one_host))
    assert all(np.array_equal(v, start[n]) for n, v in m.state().items())
