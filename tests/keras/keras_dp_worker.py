"""Run by ``test_keras_distributed.py`` in its own process: TensorFlow's CPU split into 2 logical
devices (possible only before TensorFlow initialises), then data-parallel fits of the reference model
against 1-device fits on the same data order. Prints one JSON object of measurements (the test
asserts on them)."""
import hashlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import tlcore as tl  # noqa: E402

BACKEND = tl.get_backend("keras")  # Keras on TensorFlow, before anything imports keras

import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)

from tlcore_keras.distributed import MirroredTrainer  # noqa: E402

DP = tl.distribute.DataParallel()
FIT = dict(batch_size=16, shuffle=False, progress=False)
RNG = np.random.default_rng(0)
X = RNG.normal(size=(48, 8, 8, 3)).astype(np.float32)  # 3 steps of a global batch of 16
Y = RNG.integers(0, 3, 48)


def model(freeze, cut="pool"):
    """The reference net cut at ``cut`` (``pool``: before its dropout) with a new 3-class head."""
    return tl.finetune(BACKEND.reference_model(seed=0), cut=tl.LayerCut(at=cut), head=tl.Head.linear(3),
                       freeze=freeze, seed=0)


FROZEN_BN = tl.FreezePolicy.matching(r"^bn")  # both BatchNorms frozen (inference mode), both convs train


def rel(a: dict, b: dict, names) -> float:
    """The largest relative difference over the tensors ``names``."""
    return max(float(np.abs(a[n] - b[n]).max() / max(np.abs(a[n]).max(), 1e-12)) for n in names)


def digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def trainers(m, kind=MirroredTrainer) -> list:
    return [t for t in m._trainers.values() if isinstance(t, kind)]


def replicas(trainer) -> dict:
    """Hashes of every replica's copies, and whether each replica's non-trainable copies (frozen
    weights, BatchNorm statistics) are bit-identical to the model's values at the start."""
    values = trainer.replica_values()
    return {"weights": [digest(v["weights"]) for v in values],
            "slots": [digest(a for s in v["slots"] for a in s.values()) for v in values],
            "states": [digest(v["states"]) for v in values]}


def compare(opt, clip=None) -> dict:
    one, dp = model(FROZEN_BN), model(FROZEN_BN)
    start = dp.state()
    native = dp.native
    start_states = [v.numpy() for v in native.non_trainable_variables]
    h1 = one.fit(X, Y, optimizer=opt, clip_grad_norm=clip, **FIT)
    hist = dp.fit(X, Y, optimizer=opt, clip_grad_norm=clip, strategy=DP, **FIT)
    a, b = one.state(), dp.state()
    mask = dp.trainable_mask()
    (trainer,) = trainers(dp)
    hashes = replicas(trainer)
    per_replica = trainer.replica_values()
    return {
        "steps": hist.info["steps"], "cache": hist.info["cache_features"], "count": trainer.count,
        "trainable_rel": rel(a, b, [n for n in a if mask[n]]),
        "moved": min(float(np.abs(b[n] - start[n]).max()) for n in a if mask[n]),
        "frozen": sorted(n for n in a if not mask[n]),
        "frozen_identical": all(np.array_equal(b[n], start[n]) for n in a if not mask[n]),
        "replica_states_identical_to_start": all(
            all(np.array_equal(s, s0) for s, s0 in zip(v["states"], start_states)) for v in per_replica),
        "synced": trainer.synced, "hashes": hashes,
        "loss_rel": abs(hist["loss"][0] - h1["loss"][0]) / abs(h1["loss"][0]),
    }


def main() -> dict:
    out: dict = {"devices": [d.name for d in tf.config.list_logical_devices("CPU")]}
    sgd, adamw = tl.optim.SGD(lr=0.1, momentum=0.9), tl.optim.AdamW(lr=0.01, weight_decay=0.05)
    out["sgd"] = compare(sgd)
    out["adamw_clip"] = compare(adamw, clip=0.05)
    # negative control: the clipping is active (an unclipped run ends elsewhere)
    a, b = model(FROZEN_BN), model(FROZEN_BN)
    a.fit(X, Y, optimizer=adamw, clip_grad_norm=0.05, strategy=DP, **FIT)
    b.fit(X, Y, optimizer=adamw, strategy=DP, **FIT)
    out["clip_matters"] = rel(a.state(), b.state(), [n for n, t in a.trainable_mask().items() if t])

    # DataParallel(devices=1) is the single-device path, bit for bit
    a, b = model(FROZEN_BN), model(FROZEN_BN)
    a.fit(X, Y, optimizer=adamw, **FIT)
    b.fit(X, Y, optimizer=adamw, strategy=tl.distribute.DataParallel(devices=1), **FIT)
    sa, sb = a.state(), b.state()
    out["one_device_identical"] = all(np.array_equal(sa[n], sb[n]) for n in sa)
    out["one_device_trainer"] = [type(t).__name__ for t in b._trainers.values()]

    # the user's own MirroredStrategy as the engine: the same step as DataParallel()'s, bit for bit
    a, b = model(FROZEN_BN), model(FROZEN_BN)
    a.fit(X, Y, optimizer=adamw, strategy=DP, **FIT)
    mine = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    b.fit(X, Y, optimizer=adamw, strategy=tl.distribute.DataParallel(engine=mine), **FIT)
    sa, sb = a.state(), b.state()
    out["engine"] = {"identical": all(np.array_equal(sa[n], sb[n]) for n in sa),
                     "count": [t.count for t in trainers(b)], "runs_on_it": [t.strategy is mine for t in trainers(b)]}

    # a BatchNorm that trains: its statistics move, are averaged over the replicas (identical copies);
    # negative control of the comparison: per-shard batch statistics do not give the 1-device result
    a, b = model(tl.FreezePolicy.none()), model(tl.FreezePolicy.none())
    start = b.state()
    a.fit(X, Y, optimizer=sgd, **FIT)
    b.fit(X, Y, optimizer=sgd, strategy=DP, **FIT)
    sa, sb = a.state(), b.state()
    (trainer,) = trainers(b)
    out["bn_train"] = {
        "stats_moved": all(not np.array_equal(sb[n], start[n]) for n in sb if "moving" in n),
        "synced": len(trainer.synced), "hashes": replicas(trainer),
        "trainable_rel": rel(sa, sb, [n for n, t in b.trainable_mask().items() if t])}

    # bn1 trains behind the frozen conv1: the mean of the replicas' moving means (each from its shard)
    # is the one-device moving mean (the moving variance is not: shard variances miss the spread)
    a, b = model(tl.FreezePolicy.up_to("conv1", bn="train")), model(tl.FreezePolicy.up_to("conv1", bn="train"))
    start = b.state()
    a.fit(X, Y, optimizer=sgd, **FIT)
    b.fit(X, Y, optimizer=sgd, strategy=DP, **FIT)
    out["bn_mean"] = {"moved": not np.array_equal(b.state()["bn1.moving_mean"], start["bn1.moving_mean"]),
                      "rel": rel(a.state(), b.state(), ["bn1.moving_mean"]),
                      "variance_rel": rel(a.state(), b.state(), ["bn1.moving_variance"])}

    # feature caching: everything before the head frozen; each replica computes its shard's features
    a, b = model(tl.FreezePolicy.all()), model(tl.FreezePolicy.all())
    ha = a.fit(X, Y, optimizer=sgd, cache_features=True, **FIT)
    hb = b.fit(X, Y, optimizer=sgd, cache_features=True, strategy=DP, **FIT)
    sa, sb = a.state(), b.state()
    head = b.head_model()
    (trainer,) = trainers(head)
    out["cached"] = {"cache": [ha.info["cache_features"], hb.info["cache_features"]],
                     "trainable_rel": rel(sa, sb, [n for n, t in b.trainable_mask().items() if t]),
                     "frozen_identical": all(np.array_equal(sb[n], a.state()[n]) for n, t in b.trainable_mask().items()
                                             if not t),
                     "hashes": replicas(trainer), "count": trainer.count}
    # the features of 13 samples (not a multiple of 2: padded) split over the replicas, against one device
    ref = b.features(X[:13])
    b._data_parallel = DP
    try:
        split = b.features(X[:13])
    finally:
        b._data_parallel = None
    out["features_rel"] = float(np.abs(split - ref).max() / np.abs(ref).max())
    out["features_shape"] = list(split.shape)

    # a dropout before the head: each replica draws from its own seed; the seed states advance as on one
    # device (the XOR undone), and the replicas' copies stay identical
    a, b = model(FROZEN_BN, cut="dropout"), model(FROZEN_BN, cut="dropout")
    start = b.state()
    a.fit(X, Y, optimizer=sgd, **FIT)
    b.fit(X, Y, optimizer=sgd, strategy=DP, **FIT)
    sa, sb = a.state(), b.state()
    rngs = [t.name for t in b.tensors if t.kind == "rng"]
    (trainer,) = trainers(b)
    out["dropout"] = {"rng": rngs, "rng_identical": all(np.array_equal(sa[n], sb[n]) for n in rngs),
                      "seeded": len(trainer.seeded), "hashes": replicas(trainer),
                      "rng_moved": all(not np.array_equal(sb[n], start[n]) for n in rngs),
                      "moved": min(float(np.abs(sb[n] - start[n]).max()) for n, t in b.trainable_mask().items()
                                   if t and n not in rngs)}

    # two fits of one epoch continue each other as one fit of two epochs
    a, b = model(FROZEN_BN), model(FROZEN_BN)
    a.fit(X, Y, epochs=2, optimizer=adamw, strategy=DP, **FIT)
    b.fit(X, Y, epochs=1, optimizer=adamw, strategy=DP, **FIT)
    b.fit(X, Y, epochs=1, optimizer=adamw, strategy=DP, **FIT)
    sa, sb = a.state(), b.state()
    out["continue_rel"] = rel(sa, sb, list(sa))

    # a non-finite loss on replica 1's shard only: both replicas refuse the step (the all-reduced guard)
    bad = X.copy()
    bad[12] = 3e38  # finite, but overflows in the first conv; in replica 1's shard (rows 8-15) of the first batch
    m = model(FROZEN_BN)
    start = m.state()
    try:
        m.fit(bad, Y, optimizer=sgd, strategy=DP, **FIT)
        out["nonfinite"] = "not raised"
    except tl.TrainingDiverged as e:
        (trainer,) = trainers(m)
        out["nonfinite"] = {"tensor": e.tensor, "unchanged": all(np.array_equal(v, start[n])
                                                                 for n, v in m.state().items()),
                            "hashes": replicas(trainer)}

    # errors before training
    m = model(FROZEN_BN)
    start = m.state()
    errors = {}
    for name, kwargs in [("batch15", dict(batch_size=15, strategy=DP)),
                         ("devices3", dict(batch_size=16, strategy=tl.distribute.DataParallel(devices=3)))]:
        try:
            m.fit(X, Y, optimizer=sgd, shuffle=False, progress=False, **kwargs)
            errors[name] = "no error"
        except tl.TlcoreError as e:
            errors[name] = [type(e).__name__, str(e)]
    out["errors"] = errors
    out["errors_unchanged"] = all(np.array_equal(v, start[n]) for n, v in m.state().items())
    return out


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
