"""Run twice by ``test_keras_multiworker.py``, as the two workers of a ``TF_CONFIG`` cluster on
localhost (``argv``: this worker's index, the two ports, a folder of its own): the
``MultiWorkerMirroredStrategy`` made first, as TensorFlow requires, then data-parallel fits of the
reference model on it against 1-device fits in this process on the same data order. Worker 1 builds
its head from another seed, so only the broadcast from replica 0 can make the workers agree. Prints
one JSON object of measurements (the test asserts on them)."""
import hashlib
import json
import os
import sys
from pathlib import Path

INDEX, PORTS, FOLDER = int(sys.argv[1]), sys.argv[2].split(","), Path(sys.argv[3])
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in PORTS]},
                                      "task": {"type": "worker", "index": INDEX}})
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import tlcore as tl  # noqa: E402

BACKEND = tl.get_backend("keras")  # Keras on TensorFlow, before anything imports keras

import tensorflow as tf  # noqa: E402

ENGINE = tf.distribute.MultiWorkerMirroredStrategy()  # before TensorFlow runs anything

from tlcore_keras.distributed import MirroredTrainer, replica_ids  # noqa: E402

DP = tl.distribute.DataParallel(engine=ENGINE)
FIT = dict(batch_size=16, shuffle=False, progress=False)
RNG = np.random.default_rng(0)
X = RNG.normal(size=(48, 8, 8, 3)).astype(np.float32)  # 3 steps of a global batch of 16
Y = RNG.integers(0, 3, 48)
FROZEN_BN = tl.FreezePolicy.matching(r"^bn")  # both BatchNorms frozen (inference mode), both convs train


def model(freeze, seed=0):
    """The reference net cut before its dropout with a new 3-class head drawn from ``seed``."""
    return tl.finetune(BACKEND.reference_model(seed=0), cut=tl.LayerCut(at="pool"), head=tl.Head.linear(3),
                       freeze=freeze, seed=seed)


def rel(a: dict, b: dict, names) -> float:
    return max(float(np.abs(a[n] - b[n]).max() / max(np.abs(a[n]).max(), 1e-12)) for n in names)


def digest(state: dict, names) -> str:
    h = hashlib.sha256()
    for n in sorted(names):
        h.update(np.ascontiguousarray(state[n]).tobytes())
    return h.hexdigest()


def compare(freeze, opt, clip=None, checkpoint: dict | None = None, **kw) -> dict:
    """A 1-device fit and a data-parallel one (head from this worker's seed; ``checkpoint``: its
    checkpoint arguments) on the same data."""
    one, dp = model(freeze), model(freeze, seed=INDEX)
    start = dp.state()
    trained = [n for n, t in dp.trainable_mask().items() if t]
    h1 = one.fit(X, Y, optimizer=opt, clip_grad_norm=clip, **FIT, **kw)
    hist = dp.fit(X, Y, optimizer=opt, clip_grad_norm=clip, strategy=DP, **FIT, **kw, **(checkpoint or {}))
    a, b = one.state(), dp.state()
    trainer = [t for m in (dp, dp.head_model()) for t in m._trainers.values() if isinstance(t, MirroredTrainer)]
    return {"start": digest(start, trained), "end": digest(b, trained), "trainable_rel": rel(a, b, trained),
            "moved": min(float(np.abs(b[n] - start[n]).max()) for n in trained),
            # a BatchNorm training behind the frozen conv1: its moving mean is the 1-device one
            "moving_mean_rel": rel(a, b, ["bn1.moving_mean"]),
            "moving_mean_moved": not np.array_equal(b["bn1.moving_mean"], start["bn1.moving_mean"]),
            "frozen_identical": all(np.array_equal(b[n], start[n]) for n in b if n not in trained),
            "loss": hist["loss"], "one_loss": h1["loss"], "cache": hist.info["cache_features"],
            "trainers": len(trainer), "state": digest(b, [n for n in b if "moving" in n])}


class Crash(Exception):
    """A simulated crash."""


class CrashAtFirstEpochEnd(tl.callbacks.Callback):
    """Crashes at the end of the first epoch (its last step checkpointed, the epoch's end not)."""

    def on_epoch_end(self, epoch, logs, model):
        raise Crash


def barrier() -> None:
    """Every worker reaches this point before any goes on (an all-reduce of a constant)."""
    ENGINE.reduce("SUM", ENGINE.run(lambda: tf.constant(1.0)), axis=None).numpy()


def resumed(folder: Path) -> dict:
    """2 shuffled epochs of 3 steps, AdamW: uninterrupted on one device, against a data-parallel run
    checkpointed every 3 steps into the shared ``folder`` (the chief writes), crashed at the first
    epoch's end on every worker, and continued by ``tl.resume(folder)`` on every worker."""
    kw = dict(epochs=2, batch_size=16, optimizer=tl.optim.AdamW(lr=1e-2, weight_decay=0.05), seed=8,
              progress=False)
    one = model(FROZEN_BN)
    want = one.fit(X, Y, **kw)
    try:
        model(FROZEN_BN, seed=INDEX).fit(X, Y, strategy=DP, checkpoint_dir=folder, checkpoint_every=3,
                                         callbacks=[CrashAtFirstEpochEnd()], **kw)
    except Crash:
        pass
    barrier()  # the chief has written the state every worker reads
    ft = tl.resume(folder, model=BACKEND.reference_model(seed=1).native)  # (its weights: the saved ones)
    hist = ft.fit(X, Y, strategy=DP, checkpoint_dir=folder, **kw)
    a, b = one.state(), ft.state()
    trained = [n for n, t in ft.trainable_mask().items() if t]
    return {"trainable_rel": rel(a, b, trained), "end": digest(b, trained), "steps": hist.info["steps"],
            "frozen_identical": all(np.array_equal(a[n], b[n]) for n in b if n not in trained),
            "loss": hist["loss"], "one_loss": want["loss"]}


def main() -> dict:
    out: dict = {"count": ENGINE.num_replicas_in_sync, "ids": list(replica_ids(ENGINE))}
    sgd, adamw = tl.optim.SGD(lr=0.1, momentum=0.9), tl.optim.AdamW(lr=0.01, weight_decay=0.05)
    out["sgd"] = compare(FROZEN_BN, sgd, checkpoint=dict(checkpoint_dir=FOLDER / "ckpt", checkpoint_every=1))
    out["files"] = sorted(p.name for p in (FOLDER / "ckpt").glob("*")) if (FOLDER / "ckpt").exists() else []
    out["adamw_clip"] = compare(FROZEN_BN, adamw, clip=0.05)
    # (checkpointed after every step: the moving statistics' averaging, a collective, runs on every
    # host at each checkpoint, not on the chief alone)
    out["bn_train"] = compare(tl.FreezePolicy.up_to("conv1", bn="train"), sgd,
                              checkpoint=dict(checkpoint_dir=FOLDER / "ckpt_bn", checkpoint_every=1))
    out["cached"] = compare(tl.FreezePolicy.all(), sgd, cache_features=True)
    out["resumed"] = resumed(FOLDER.parent / "shared")
    # worker 1 builds the network from another seed: its frozen BatchNorm agrees (ones and zeros), its
    # frozen conv1 does not; refused on both workers alike, before training
    odd = tl.finetune(BACKEND.reference_model(seed=INDEX), cut=tl.LayerCut(at="pool"), head=tl.Head.linear(3),
                      freeze=tl.FreezePolicy.up_to("bn1"), seed=0)
    start = odd.state()
    try:
        odd.fit(X, Y, optimizer=sgd, strategy=DP, **FIT)
        out["frozen_differ"] = "no error"
    except tl.TlcoreError as e:
        out["frozen_differ"] = [type(e).__name__, str(e),
                                all(np.array_equal(v, start[n]) for n, v in odd.state().items())]
    try:  # a cluster without the engine: refused, before training
        model(FROZEN_BN).fit(X, Y, optimizer=sgd, strategy=tl.distribute.DataParallel(), **FIT)
        out["no_engine"] = "no error"
    except tl.TlcoreError as e:
        out["no_engine"] = [type(e).__name__, str(e)]
    return out


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
