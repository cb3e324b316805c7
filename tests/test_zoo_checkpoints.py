"""The portable zoo and checkpoints: same network, same numbers, on every installed backend."""
import itertools
import os

import numpy as np
import pytest

import tlcore as tl
from tlcore import checkpoint
from tlcore.datasets import digits
from tlcore.workflow import fit_state_dict
from tlcore.testing import example_shape, selected_backends
from tlcore.zoo import UnknownArchitectureError, UnknownPretrainedError
from tlcore.zoo.archs import layer_names

SMALL = {
    "mlp": dict(in_features=12, hidden=(16, 8), num_classes=3),
    "small_cnn": dict(in_channels=3, input_size=8, widths=(4, 8), num_classes=3),
    "resnet18": dict(in_channels=3, input_size=32, width=4, num_classes=3),
    "vit_tiny": dict(in_channels=3, image_size=8, patch_size=4, dim=16, depth=2, heads=2, mlp_ratio=2, num_classes=3),
}
PAIRS = list(itertools.combinations(selected_backends(), 2))


def inputs(model, n=6, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, *example_shape(model))).astype(np.float32)


@pytest.mark.parametrize("arch", list(SMALL))
def test_zoo_layers_and_canonical_state(backend, arch):
    m = tl.zoo.create(arch, backend=backend, **SMALL[arch])
    assert m.layers == layer_names(arch, m.meta["config"])
    assert m.predict(inputs(m)).shape == (6, 3)
    if arch in ("small_cnn", "resnet18"):  # convolutional zoo models take any image size, as torchvision's
        assert m.input_shape == (None, None, 3)
        assert m.predict(np.zeros((2, 40, 48, 3), np.float32)).shape == (2, 3)
    reference = tl.zoo.create(arch, backend=selected_backends()[0], **SMALL[arch]).state()
    assert {k: v.shape for k, v in m.state().items()} == {k: v.shape for k, v in reference.items()}


@pytest.mark.parametrize("arch", list(SMALL))
@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_same_weights_give_the_same_outputs_and_the_same_training_step(pair, arch):
    a, b = (tl.zoo.create(arch, backend=name, seed=3, **SMALL[arch]) for name in pair)
    assert tl.changed_tensors(a.state(), b.state()) == {}, "the numpy init must be identical"
    x = inputs(a, n=8)
    np.testing.assert_allclose(a.predict(x), b.predict(x), rtol=1e-4, atol=1e-5)
    y = np.arange(8) % 3
    for m in (a, b):
        m.fit(x, y, epochs=1, batch_size=8, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9), shuffle=False,
              progress=False)
    sa, sb = a.state(), b.state()
    # Keras' BatchNormalization keeps the biased batch variance in its moving variance, PyTorch and the
    # JAX zoo the unbiased one (a factor n/(n-1)); every other tensor must agree
    skip = "running_var" if "keras" in pair else "(nothing)"
    for name in (n for n in sa if not n.endswith(skip)):
        np.testing.assert_allclose(sa[name], sb[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_save_on_one_backend_load_on_every_backend_and_finetune_keeps_frozen_bit_identical(tmp_path):
    names = selected_backends()
    (x, y), _ = digits(classes=range(5), seed=0)
    source = tl.zoo.create("small_cnn", backend=names[0], in_channels=1, input_size=8, widths=(8, 16), num_classes=5)
    source.fit(x[:200], y[:200], epochs=1, batch_size=32, progress=False)
    path = tmp_path / "source.safetensors"
    source.save(path)
    saved, _ = checkpoint.read(path)
    (xt, yt), _ = digits(classes=range(5, 10), seed=0)
    for name in names:
        loaded = tl.load(path, backend=name)
        assert loaded.backend == name
        np.testing.assert_allclose(loaded.predict(x[:16]), source.predict(x[:16]), rtol=1e-4, atol=1e-5)
        ft = tl.finetune(loaded, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(5))
        ft.fit(xt[:60], yt[:60], epochs=2, batch_size=16, progress=False, cache_features=False)
        base = [n for n, t in ft.trainable_mask().items() if not t]
        assert base and all(n in saved for n in base)
        assert tl.changed_tensors(saved, ft.state(), base) == {}, name
        assert "head.out.weight" in ft.state()


@pytest.mark.parametrize("pair", PAIRS + [p[::-1] for p in PAIRS], ids=lambda p: "-".join(p))
def test_finetuned_checkpoint_restores_cut_head_and_policy_on_another_backend(tmp_path, pair):
    src, dst = pair
    base = tl.zoo.create("small_cnn", backend=src, **SMALL["small_cnn"])
    ft = tl.finetune(base, cut=tl.LayerCut(at="relu2"), head=tl.Head.mlp(hidden=(5,), num_classes=2),
                     freeze=tl.FreezePolicy.up_to("bn1"))
    x = inputs(ft)
    ft.fit(x, np.arange(6) % 2, epochs=1, batch_size=3, progress=False)
    ft.save(tmp_path / "ft.safetensors")
    back = tl.load(tmp_path / "ft.safetensors", backend=dst)
    assert back.layers == ft.layers and back.head == "head"
    assert back.trainable_mask() == ft.trainable_mask()
    np.testing.assert_allclose(back.predict(x), ft.predict(x), rtol=1e-4, atol=1e-5)


def test_wrapped_native_model_saves_and_loads_on_its_own_backend(tmp_path, backend):
    m = tl.get_backend(backend).reference_model(seed=1)
    ft = tl.finetune(m, cut=tl.LayerCut(at="relu2"), head=tl.Head.linear(3))
    ft.save(tmp_path / "native.safetensors")
    with pytest.raises(tl.CheckpointError, match="model="):
        tl.load(tmp_path / "native.safetensors")
    back = tl.load(tmp_path / "native.safetensors", model=tl.get_backend(backend).reference_model(seed=2).native)
    assert tl.changed_tensors(ft.state(), back.state()) == {}
    assert back.trainable_mask() == ft.trainable_mask()


def test_torchvision_layout_state_dict_loads_on_every_backend(tmp_path):
    torch = pytest.importorskip("torch", reason="writing a .pth state dict needs torch")
    cfg = dict(width=4, input_size=32, num_classes=7)
    model = tl.zoo.create("resnet18", backend="torch", seed=11, **cfg)
    sd = {k: torch.from_numpy(v) for k, v in model.state().items()}
    for k in [k for k in sd if k.endswith("running_var")]:  # torchvision also stores BatchNorm counters
        sd[k.replace("running_var", "num_batches_tracked")] = torch.tensor(5)
    torch.save(sd, tmp_path / "resnet18.pth")
    x = inputs(model)
    for name in selected_backends():
        m = tl.zoo.create("resnet18", backend=name, weights=tmp_path / "resnet18.pth", **cfg)
        np.testing.assert_allclose(m.predict(x), model.predict(x), rtol=1e-4, atol=1e-5)


def test_real_torchvision_resnet18_weights_load():
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed here")
    net = torchvision.models.resnet18(num_classes=10)
    m = tl.zoo.create("resnet18", backend="torch", num_classes=10, input_size=64)
    m.load_state(fit_state_dict(m, {k: v.numpy() for k, v in net.state_dict().items()}))
    net.eval()
    x = inputs(m, n=2)
    import torch
    with torch.no_grad():
        expected = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(m.predict(x), expected, rtol=1e-4, atol=1e-5)


def test_pretrained_digits04_is_shipped_small_and_accurate(backend):
    path = tl.zoo.WEIGHTS_DIR / "small_cnn-digits04.safetensors"
    assert path.stat().st_size < 2_000_000
    m = tl.zoo.create("small_cnn", backend=backend, pretrained="digits04")
    _, (xt, yt) = digits(classes=range(5), seed=0)
    assert m.evaluate(xt, yt)["accuracy"] > 0.95


def test_pretraining_script_reproduces_a_loadable_checkpoint(tmp_path):
    import importlib.util
    if "torch" not in tl.available_backends():
        pytest.skip("scripts/train_pretrained.py trains with PyTorch, which is not installed")
    spec = importlib.util.spec_from_file_location("train_pretrained", os.path.join(
        os.path.dirname(__file__), "..", "scripts", "train_pretrained.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--epochs", "2", "--out", str(tmp_path / "w.safetensors")])
    assert result["accuracy"] > 0.5
    loaded = tl.load(tmp_path / "w.safetensors", backend=selected_backends()[0])
    assert loaded.meta["arch"] == "small_cnn"
    shipped = tl.zoo.create("small_cnn", backend="torch", pretrained="digits04")
    assert tl.changed_tensors(shipped.state(), loaded.state()), "negative control: 2 epochs are not the shipped 200"


# ---------------------------------------------------------------- bad input
def test_vit_refuses_another_image_size_naming_image_size(backend):
    m = tl.zoo.create("vit_tiny", backend=backend, **SMALL["vit_tiny"])
    with pytest.raises(tl.DataError, match=r"image_size=8.*tl.zoo.create\('vit_tiny', image_size=\.\.\.\)"):
        m.predict(np.zeros((1, 16, 16, 3), np.float32))


def test_unknown_zoo_names_and_tags():
    with pytest.raises(UnknownArchitectureError, match="did you mean 'resnet18'"):
        tl.zoo.create("resnet81")
    with pytest.raises(UnknownPretrainedError, match="digits04"):
        tl.zoo.create("small_cnn", pretrained="imagenet")
    with pytest.raises(tl.ZooError, match="width"):
        tl.zoo.create("resnet18", widht=4)


@pytest.fixture
def saved(tmp_path):
    m = tl.zoo.create("mlp", backend=selected_backends()[0], **SMALL["mlp"])
    path = tmp_path / "mlp.safetensors"
    m.save(path)
    return m, path


def test_checkpoint_for_another_architecture_lists_mismatched_shapes(saved):
    _, path = saved
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"fc1.weight: checkpoint \(16, 12\) vs model \(16, 20\)"):
        tl.load(path, model=tl.zoo.create("mlp", backend=selected_backends()[0], in_features=20, hidden=(16, 8),
                                          num_classes=3))


@pytest.mark.parametrize("damage, error", [
    (lambda raw: raw[: len(raw) // 2], checkpoint.CheckpointCorruptedError),
    (lambda raw: raw[:-3] + bytes([raw[-3] ^ 0xFF]) + raw[-2:], checkpoint.CheckpointCorruptedError),
    (lambda raw: b"PK\x03\x04 not a checkpoint at all" * 4, checkpoint.NotACheckpointError),
])
def test_truncated_corrupted_or_foreign_files_are_refused(saved, damage, error):
    _, path = saved
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(error):
        tl.load(path)


def test_plain_safetensors_and_missing_paths(tmp_path):
    from safetensors.numpy import save_file
    save_file({"w": np.zeros(3, np.float32)}, tmp_path / "plain.safetensors")
    with pytest.raises(checkpoint.NotACheckpointError, match="not a tlcore checkpoint"):
        tl.load(tmp_path / "plain.safetensors")
    with pytest.raises(checkpoint.CheckpointNotFoundError):
        tl.load(tmp_path / "missing.safetensors")


def test_a_crash_mid_save_leaves_the_previous_file_intact(saved, monkeypatch):
    model, path = saved
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file is left behind"


def test_pth_files_are_read_weights_only_and_never_run_code(tmp_path):
    torch = pytest.importorskip("torch", reason="writing a .pth file needs torch")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"w": torch.zeros(2), "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(tl.CheckpointError):
        tl.zoo.create("mlp", weights=tmp_path / "evil.pth")
    assert not marker.exists()
