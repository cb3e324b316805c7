"""Data parallel on Keras/TensorFlow: tlcore's ``fit(strategy=tl.distribute.DataParallel(devices=k))``
against a hand-written ``tf.distribute.MirroredStrategy`` loop, for 1 and 2 replicas, in a process of
its own whose CPU is split into 2 logical devices (possible only before TensorFlow initialises).

Workload: the ``cnn`` benchmark workload (zoo ``small_cnn`` 32-64-128-256 on 32x32x3, a new linear
head with 10 classes), full fine-tuning, SGD momentum 0.9, global batch 64, ``steps`` batches per
repeat. The native loop builds the same network under ``strategy.scope()`` (mirrored variables) and
runs ``strategy.run`` of a step (``GradientTape``, the sum of per-sample losses over the global batch
size, ``keras.optimizers.SGD.apply``, which all-reduces the gradients) inside a ``tf.function``, fed
either by ``strategy.experimental_distribute_dataset`` of a ``tf.data`` pipeline or by each replica's
rows put on its device (``experimental_distribute_values_from_function``, as tlcore feeds); the
faster feed is ``native_ms`` (both are in ``native_by_feed_ms``). tlcore's
one replica is its single-device path (``DataParallel(devices=1)``). ms/step: the median over
``repeats`` interleaved repeats of a repeat's time / steps, after a warm-up repeat (tracing).

    python -m benchmarks.dp_keras --repeats 3 --steps 8
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(repeats: int, steps: int) -> list[dict]:
    """Rows ``{backend, replicas, engine, tlcore_ms, native_ms, ratio}`` for 1 and 2 replicas (or one
    row with ``error``), measured in a subprocess."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "benchmarks.dp_keras", "--worker", str(repeats), str(steps)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        return [{"backend": "keras", "error": (run.stderr.strip().splitlines() or ["failed"])[-1][:300]}]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _worker(repeats: int, steps: int) -> list[dict]:
    import numpy as np

    import tlcore as tl

    tl.get_backend("keras")  # Keras on TensorFlow
    import keras
    import tensorflow as tf

    tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                               [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, str(ROOT))
    from benchmarks import workloads

    batch = workloads.WORKLOADS["cnn"].batch
    model = workloads.build("cnn", "keras", "full")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch * steps).astype(np.int64)
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    opt = tl.optim.SGD(lr=workloads.LR, momentum=0.9)

    def tlcore_run(k: int):
        ft = workloads.build("cnn", "keras", "full")
        strategy = tl.distribute.DataParallel(devices=k)

        def once():
            ft.fit(x, y, batch_size=batch, optimizer=opt, shuffle=False, progress=False, cache_features=False,
                   strategy=strategy)
        return once

    def native_run(k: int, feed: str):
        strategy = tf.distribute.MirroredStrategy(devices=devices[:k])
        with strategy.scope():
            net = keras.models.clone_model(model.native)
            net.set_weights(model.native.get_weights())
            sgd = keras.optimizers.SGD(workloads.LR, momentum=0.9)
            sgd.build(net.trainable_variables)
        ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        data = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).prefetch(2))

        def replica(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(ce(yb, net(xb, training=True)), global_batch_size=batch)
            sgd.apply(tape.gradient(loss, net.trainable_variables), net.trainable_variables)
            return loss

        @tf.function
        def step(xb, yb):
            return strategy.reduce("sum", strategy.run(replica, args=(xb, yb)), axis=None)

        def shards(i):  # the global batch i, each replica's rows put on its device
            def rows(ctx):
                r, n = ctx.replica_id_in_sync_group, batch // k
                with tf.device(strategy.extended.worker_devices[r]):
                    lo = i * batch + r * n
                    return tf.constant(x[lo:lo + n]), tf.constant(y[lo:lo + n])
            return strategy.experimental_distribute_values_from_function(rows)

        def once():
            for xb, yb in (data if feed == "dataset" else (shards(i) for i in range(steps))):
                loss = step(xb, yb)
            float(loss)
        return once

    runs = {}
    for k in (1, 2):
        runs[k, "tlcore"] = tlcore_run(k)
        runs[k, "native"] = native_run(k, "dataset")
        runs[k, "native_values"] = native_run(k, "values")
    for once in runs.values():
        once()  # warm-up: traces
    times: dict = {key: [] for key in runs}
    for _ in range(repeats):
        for key, once in runs.items():  # interleaved
            t0 = time.perf_counter()
            once()
            times[key].append((time.perf_counter() - t0) / steps * 1000)
    rows = []
    for k in (1, 2):
        t = statistics.median(times[k, "tlcore"])
        feeds = {feed: statistics.median(times[k, key]) for feed, key in (("dataset", "native"),
                                                                          ("values", "native_values"))}
        n = min(feeds.values())  # the faster hand-written loop
        rows.append({"backend": "keras", "replicas": k, "engine": f"MirroredStrategy over {k} logical CPU device(s)",
                     "tlcore_ms": t, "native_ms": n, "ratio": t / n, "native_by_feed_ms": feeds,
                     "tlcore_all": times[k, "tlcore"], "native_all": times[k, "native"],
                     "native_values_all": times[k, "native_values"]})
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(_worker(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        import argparse

        p = argparse.ArgumentParser(prog="python -m benchmarks.dp_keras", description=__doc__.splitlines()[0])
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--steps", type=int, default=8)
        args = p.parse_args()
        print(json.dumps(measure(args.repeats, args.steps)))
