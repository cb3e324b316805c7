"""Real data in: DataLoaders, tf.data, map-style datasets, memmaps and tensors, on every backend;
progress reporting; bounded memory. (The framework-free sources are in the conformance kit.)"""
import importlib.util
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tlcore as tl
from tlcore.testing import reference_finetune, sample_data, selected_backends

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_TF = importlib.util.find_spec("tensorflow") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="a torch DataLoader needs torch")
needs_tf = pytest.mark.skipif(not HAS_TF, reason="a tf.data.Dataset needs tensorflow")


def fitted(backend, *args, **kw):
    ft = reference_finetune(backend, dropout=0.0)
    kw = {"epochs": 2, "batch_size": 8, "shuffle": False, "optimizer": tl.optim.Adam(lr=1e-2), "seed": 1,
          "progress": False, "cache_features": False, **kw}
    hist = ft.fit(*args, **kw)
    return ft, hist


def data_for(backend, n=32):
    return sample_data(reference_finetune(backend), n=n)


@needs_torch
@pytest.mark.parametrize("backend", selected_backends())
def test_a_torch_dataloader_feeds_every_backend_exactly_as_arrays(backend):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    x, y = data_for(backend)
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=8, shuffle=False)
    a, _ = fitted(backend, x, y)
    b, hist = fitted(backend, loader)
    assert tl.changed_tensors(a.state(), b.state()) == {}
    np.testing.assert_array_equal(b.predict(loader), b.predict(x))
    assert b.evaluate(loader)["loss"] == pytest.approx(b.evaluate(x, y)["loss"], rel=1e-6)
    assert hist.info["cache_features"] == "off"


class CountingBatches:
    """A re-iterable source of (x, y) batches that counts how often it is started and read."""

    def __init__(self, x, y, batch):
        self.x, self.y, self.batch, self.started, self.read = x, y, batch, 0, 0

    def __iter__(self):
        self.started += 1
        for i in range(0, len(self.x), self.batch):
            self.read += 1
            yield self.x[i:i + self.batch], self.y[i:i + self.batch]


def test_a_loader_is_started_once_per_epoch_and_each_batch_read_once():
    """The batch fit peeks at to check the data is the first of the first epoch, not read again by
    a second iteration (which would start a loader's workers and its sampler's shuffle twice)."""
    backend = selected_backends()[0]
    x, y = data_for(backend)
    source = CountingBatches(x, y, 8)
    a, _ = fitted(backend, x, y)
    b, hist = fitted(backend, source)
    assert tl.changed_tensors(a.state(), b.state()) == {}
    assert (source.started, source.read, hist.info["steps"]) == (2, 8, 8)
    b.predict(source)
    assert (source.started, source.read) == (3, 12)


@needs_tf
@pytest.mark.parametrize("backend", selected_backends())
def test_a_tf_data_pipeline_feeds_every_backend_exactly_as_arrays(backend):
    if backend == "keras":
        tl.get_backend("keras")  # Keras must be imported on TensorFlow before tensorflow pulls it in
    import tensorflow as tf

    x, y = data_for(backend)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    a, _ = fitted(backend, x, y)
    b, _ = fitted(backend, ds)
    assert tl.changed_tensors(a.state(), b.state()) == {}
    with pytest.raises(tl.DataError, match="repeats forever.*steps_per_epoch"):
        fitted(backend, ds.repeat())
    c, hist = fitted(backend, ds.repeat(), steps_per_epoch=4)
    assert tl.changed_tensors(a.state(), c.state()) == {} and hist.info["steps"] == 8


@needs_torch
def test_a_map_style_dataset_is_batched_and_shuffled_by_tlcore_as_arrays_are():
    import torch
    from torch.utils.data import TensorDataset

    backend = "torch" if "torch" in selected_backends() else selected_backends()[0]
    x, y = data_for(backend, n=30)
    a, _ = fitted(backend, x, y, shuffle=True)
    b, _ = fitted(backend, TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), shuffle=True)
    assert tl.changed_tensors(a.state(), b.state()) == {}
    c, _ = fitted(backend, x, y, shuffle=True, seed=5)
    assert tl.changed_tensors(a.state(), c.state()), "negative control: another shuffle trains differently"


@pytest.mark.parametrize("backend", selected_backends())
def test_tensors_of_every_framework_are_arrays(backend):
    x, y = data_for(backend)
    as_tensor = {"torch": lambda a: __import__("torch").from_numpy(a),
                 "jax": lambda a: __import__("jax.numpy").numpy.asarray(a)}
    for name, make in as_tensor.items():
        if importlib.util.find_spec(name) is None:
            continue
        a, _ = fitted(backend, x, y)
        b, _ = fitted(backend, make(x), make(y))
        assert tl.changed_tensors(a.state(), b.state()) == {}, name


def test_a_memmap_is_never_read_whole_into_memory(tmp_path):
    """Peak numpy memory of a fit from a 16,000-image uint8 memmap (47 MiB on disk) stays far below
    the float32 copy of it (188 MiB): about 24 MiB of batches in flight, the same for 4,000 images;
    negative control: that copy, made on purpose, is measured as such."""
    import tracemalloc

    backend = selected_backends()[0]
    base = tl.zoo.create("small_cnn", backend=backend, widths=(4, 8), input_size=32, num_classes=3)
    ft = tl.finetune(base, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(3))
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(16000, 32, 32, 3))
    mm[:] = 7
    mm.flush()
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    y = np.arange(16000) % 3
    kw = dict(epochs=1, batch_size=250, progress=False, cache_features=False)
    ft.fit(tl.data.scale(mm[:500], 1 / 255), y[:500], **kw)  # imports and compiling, not measured
    whole = mm.size * 4 / 2 ** 20
    tracemalloc.start()
    try:
        ft.fit(tl.data.scale(mm, 1 / 255), y, **kw)
        peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
        tracemalloc.reset_peak()
        copy = np.asarray(mm, dtype=np.float32)
        control = tracemalloc.get_traced_memory()[1] / 2 ** 20
    finally:
        tracemalloc.stop()
    assert control >= 0.9 * whole and copy.size == mm.size, "negative control: a whole copy is measured"
    assert peak < whole / 4, f"the fit allocated {peak:.1f} MiB of numpy memory for a {whole:.1f} MiB float copy"


def test_rows_of_a_memmap_read_from_its_file_equal_numpy_indexing(tmp_path):
    from tlcore.data import read_rows, take

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 5, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    raw = np.memmap(tmp_path / "raw.bin", dtype=np.int16, mode="w+", offset=7, shape=(300, 6))
    raw[:] = rng.integers(-999, 999, size=raw.shape)
    raw.flush()
    for mm in (np.load(tmp_path / "a.npy", mmap_mode="r"), np.load(tmp_path / "a.npy", mmap_mode="r")[37:250],
               np.memmap(tmp_path / "raw.bin", dtype=np.int16, mode="r", offset=7, shape=(300, 6))[5:]):
        index = rng.permutation(len(mm))[:64]
        np.testing.assert_array_equal(take(mm, index), np.asarray(mm)[index])
        assert read_rows(mm, index) is not None, "read from the file, not through the mapping"
    edited = np.load(tmp_path / "a.npy", mmap_mode="c")
    edited[3] = 42.0  # in this process only: the file does not have it, so rows must come from the map
    assert read_rows(edited, np.array([3])) is None and (take(edited, np.array([3])) == 42.0).all()
    live = np.load(tmp_path / "a.npy", mmap_mode="r+")
    live[4] = -1.0  # a shared map writes the file's pages: a read sees it
    assert (read_rows(live, np.array([4])) == -1.0).all()


def test_a_uint8_memmap_larger_than_a_batch_is_scaled_batch_by_batch(tmp_path):
    backend = selected_backends()[0]
    x, y = data_for(backend)
    pixels = np.clip((x - x.min()) / (x.max() - x.min()) * 255, 0, 255).astype(np.uint8)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=pixels.shape)
    mm[:] = pixels
    mm.flush()
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    with pytest.warns(UserWarning, match=r"uint8.*tl.data.scale\(x, 1 / 255\)"):
        fitted(backend, mm, y, epochs=1)
    a, _ = fitted(backend, (pixels / np.float32(255)).astype(np.float32), y)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # declared: no warning
        b, _ = fitted(backend, tl.data.scale(mm, 1 / 255), y)
    for name, value in a.state().items():
        np.testing.assert_allclose(b.state()[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_scaled_batch_is_converted_and_scaled_in_one_array_with_the_values_of_two_steps():
    """``tl.data.scale`` converts and multiplies in one pass: the values of converting to float32 and
    then scaling, bit for bit, with one batch-sized float32 array instead of two; integers and bools
    are converted, not scaled. Negative control: the two steps are measured at two arrays."""
    import tracemalloc

    from tlcore.data import batch_dtypes
    from tlcore.sources import _times

    rng = np.random.default_rng(0)
    two_steps = lambda a, f: np.multiply(batch_dtypes(a), np.float32(f), dtype=np.float32)  # noqa: E731
    for dtype in (np.uint8, np.float16, np.float32, np.float64):
        a = (rng.random((64, 5, 3)) * 255).astype(dtype)
        for factor in (1 / 255, 3.7, -0.1):
            out = _times(a, factor)
            assert out.dtype == np.float32 and np.array_equal(out, two_steps(a, factor)), (dtype, factor)
    ints, flags = np.arange(6).reshape(3, 2), np.array([True, False])
    assert _times(ints, 0.5).dtype == np.int64 and _times(ints, 0.5).tolist() == ints.tolist()
    assert _times(flags, 2.0).dtype == np.bool_
    parts = _times({"a": rng.random((4, 2)), "b": (ints.astype(np.int32),)}, 2.0)
    assert parts["a"].dtype == np.float32 and parts["b"][0].dtype == np.int64

    pixels = rng.integers(0, 256, (250, 64, 64, 3), dtype=np.uint8)
    batch = pixels.size * 4
    peaks = []
    for scale in (_times, two_steps):
        tracemalloc.start()
        try:
            scale(pixels, 1 / 255)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[0] < 1.1 * batch, peaks
    assert peaks[1] > 1.9 * batch, "negative control: converting, then scaling, holds two batches"


def test_the_feature_cache_keeps_small_batches_in_a_few_blocks_with_their_values():
    """The in-memory cache copies each batch's small arrays (features, targets, weights) into large
    blocks: a fit that caches the features of many batches keeps a few allocations, not one per
    batch (which fragments the heap, see README "Benchmarks"). Values, dtypes and shapes are kept; a
    batch as large as half a block is kept as it is. Negative control: with blocks too small for a
    batch, each batch is its own array."""
    from tlcore.sources import Batch
    from tlcore.training import FeatureCache

    rng = np.random.default_rng(0)
    batches = [Batch(rng.normal(size=(25, 8)).astype(np.float32), rng.integers(0, 3, 25),
                     None if i % 2 else rng.random(25)) for i in range(200)]
    batches.append(Batch(rng.normal(size=(7, 8))[:, ::2], np.arange(7, dtype=np.int32), None))  # not contiguous
    bases = {}
    for block in (1 << 16, 64):
        cache = FeatureCache(block=block)
        for b in batches:
            cache.add(b)
        kept = list(cache.batches(np.random.default_rng(0)))
        for b, k in zip(batches, kept, strict=True):
            for a, c in zip(b, k):
                assert (a is None) == (c is None)
                if a is not None:
                    assert c.dtype == a.dtype and np.array_equal(c, a) and c.flags.aligned
                    assert c.flags.c_contiguous or block == 64  # kept as given there
        bases[block] = {id(k.x if k.x.base is None else k.x.base) for k in kept}
        if block > 64:  # a copy: the cache does not change when the caller's array does
            batches[0].x[0, 0] = 1e9
            assert kept[0].x[0, 0] != 1e9
    assert len(bases[1 << 16]) <= 2 + 201 * 25 * (8 * 4 + 8 * 2 + 64) // (1 << 16), bases[1 << 16]
    assert len(bases[64]) == 201, "negative control: batches larger than half a block are kept one by one"


def test_progress_is_a_line_per_epoch_off_a_terminal(capsys, caplog):
    backend = selected_backends()[0]
    x, y = data_for(backend)
    fitted(backend, x, y, epochs=2, progress="epoch", metrics=["accuracy", "f1_macro"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and lines[1].startswith("epoch 2/2 - loss ") and "f1_macro" in lines[1]
    with caplog.at_level(logging.INFO, logger="tlcore"):
        fitted(backend, x, y, epochs=1, progress="epoch")
    assert any(r.getMessage().startswith("epoch 1/1 - loss") for r in caplog.records), "through logging when set up"
    assert capsys.readouterr().err.count("epoch 1/1") == 0
    with pytest.raises(tl.DataError, match="progress"):
        fitted(backend, x, y, progress="verbose")


MEMORY = textwrap.dedent("""
    import resource, sys, numpy as np, tlcore as tl
    n, backend = int(sys.argv[1]), sys.argv[2]
    base = tl.zoo.create("small_cnn", backend=backend, widths=(4, 8), input_size=64, num_classes=3)
    ft = tl.finetune(base, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(3))
    def images():  # generated a batch at a time: the whole set would be n * 48 KiB
        rng = np.random.default_rng(0)
        for i in range(0, n, 250):
            m = min(250, n - i)
            yield rng.normal(size=(m, 64, 64, 3)).astype(np.float32), rng.integers(0, 3, m)
    ft.fit(images, epochs=1, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


@pytest.mark.slow
@pytest.mark.xdist_group("subprocess")
def test_memory_is_bounded_by_the_batch_not_the_data_set():
    backend = "torch" if "torch" in selected_backends() else selected_backends()[0]
    peak = {}
    for n in (500, 20_000):  # 20,000 images of 64x64x3 float32 are 983 MB
        out = subprocess.run([sys.executable, "-c", MEMORY, str(n), backend], capture_output=True, text=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        peak[n] = int(out.stdout.split()[-1])
    assert peak[20_000] <= 1.5 * peak[500], peak


def test_channels_last_images_for_a_channels_first_model_get_the_transpose_to_use():
    if "torch" not in selected_backends():
        pytest.skip("needs the torch backend (a channels-first native model)")
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2))
    ft = tl.finetune(tl.wrap(net), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(2))
    images, y = np.zeros((8, 16, 16, 3), np.float32), np.arange(8) % 2
    with pytest.raises(tl.DataError, match=r"channels first: pass x\.transpose\(0, 3, 1, 2\)"):
        ft.fit(images, y, progress=False)
    hist = ft.fit(images.transpose(0, 3, 1, 2), y, progress=False)  # what the message says works
    assert hist.epochs == 1
