"""What only the PyTorch backend has: cuts of any ``nn.Module`` by running its own forward, heads
that size themselves, torchvision and timm models."""
import numpy as np
import pytest

import tlcore as tl

torch = pytest.importorskip("torch", reason="the torch backend is not installed")
nn = torch.nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)  # ends in functions, not in a module


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.layer1 = nn.Sequential(Block(4), Block(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.layer1(self.stem(x)).mean((2, 3)))


class Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx could not trace it
            x = self.a(x)
        return self.c(self.b(x))


class CallsLaterLayerFirst(nn.Module):
    """Registers ``late`` before ``early`` but calls ``early`` first."""

    def __init__(self, conv: bool = False):
        super().__init__()
        make = (lambda: nn.Conv2d(3, 3, 1)) if conv else (lambda: nn.Linear(3, 3))
        self.late, self.early = make(), make()

    def forward(self, x):
        return self.late(self.early(x))


def images(n=4, c=3, size=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, c, size, size)).astype(np.float32)


def test_cut_inside_a_block_runs_the_models_own_forward_and_keeps_the_names():
    torch.manual_seed(0)
    m = tl.wrap(Residual(), input_shape=(3, 6, 6))
    assert m.layers == ["stem", "layer1", "layer1.0", "layer1.1", "fc"]
    ft = tl.finetune(m, cut=tl.LayerCut(at="layer1.0"), head=tl.Head.linear(2))
    assert "layer1.1.conv.weight" not in ft.state() and "layer1.0.bn.running_mean" in ft.state()
    x = images()
    with torch.no_grad():
        m.native.eval()
        expected = m.native.layer1[0](m.native.stem(torch.from_numpy(x))).mean((2, 3))
    np.testing.assert_allclose(ft.features(x), expected.numpy(), rtol=1e-6)  # relu(+x) included, then pooled
    snap = tl.snapshot(ft)
    ft.fit(x, np.array([0, 1, 0, 1]), epochs=2, batch_size=2, progress=False, cache_features=False,
           optimizer=tl.optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.1))
    assert tl.assert_frozen(snap, ft)
    assert "head.out.weight" in tl.changed_tensors(snap, ft.state())


def test_model_with_data_dependent_control_flow_is_cut_and_takes_each_branch():
    torch.manual_seed(0)
    m = tl.wrap(Dynamic())
    ft = tl.finetune(m, cut=tl.LayerCut(at="b"), head=tl.Head.linear(2))
    assert ft.layers == ["a", "b", "head", "head.pool", "head.out"]
    x = np.array([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]], np.float32)
    net = m.native
    with torch.no_grad():
        positive = net.b(net.a(torch.from_numpy(x[:1]))).numpy()
        negative = net.b(torch.from_numpy(x[1:])).numpy()
    np.testing.assert_allclose(ft.features(x[:1]), positive, rtol=1e-6)
    np.testing.assert_allclose(ft.features(x[1:]), negative, rtol=1e-6)


def test_layers_are_listed_in_the_order_they_run_when_an_example_input_is_known():
    m = tl.wrap(CallsLaterLayerFirst())  # input shape (3,) from its first Linear: one example run
    assert m.layers == ["early", "late"]
    assert tl.finetune(m, cut=tl.LayerCut(drop_last=1)).layers == ["early"]


def test_a_layer_removed_by_the_cut_but_called_before_it_is_named():
    ft = tl.finetune(tl.wrap(CallsLaterLayerFirst(conv=True)), cut=tl.LayerCut(at="late"))
    assert ft.layers == ["late"], "no input shape: registration order"
    with pytest.raises(tl.CutError, match="layer 'early' was removed by the cut at 'late'"):
        ft.predict(np.zeros((1, 3, 2, 2), np.float32))


def test_head_waits_for_its_first_batch_when_the_width_is_unknown():
    conv = tl.wrap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert conv.input_shape == (3, None, None)
    with pytest.raises(tl.DataError, match="dimensions"):
        conv.predict(np.zeros((2, 3, 8), np.float32))
    ft = tl.finetune(conv, head=tl.Head.linear(2))
    assert not ft.head_built and ft.head == "head"
    with pytest.raises(tl.HeadNotBuiltError, match="first batch"):
        ft.trainable_mask()
    with pytest.raises(tl.HeadNotBuiltError, match="first batch"):
        ft.save("unused.safetensors")
    assert "(built on first batch)" in str(ft.summary())
    assert ft.predict(np.zeros((1, 3, 5, 5), np.float32)).shape == (1, 2)
    assert ft.head_built and ft.state()["head.out.weight"].shape == (2, 4)
    assert ft.predict(np.zeros((1, 3, 9, 7), np.float32)).shape == (1, 2), "any image size after that"


def test_given_input_shape_builds_at_once_and_is_checked():
    ft = tl.finetune(tl.wrap(nn.Sequential(nn.Conv2d(3, 4, 3))), head=tl.Head.linear(2), input_shape=(3, 5, 5))
    assert ft.head_built
    with pytest.raises(tl.DataError, match=r"per-sample shape \(3, 6, 6\); the model takes \(3, 5, 5\)"):
        ft.predict(np.zeros((1, 3, 6, 6), np.float32))


def test_frozen_parameters_get_no_grad_and_no_optimizer_state():
    ft = tl.finetune(tl.wrap(Residual()), cut=tl.LayerCut(at="layer1"), head=tl.Head.linear(2))
    x = images(n=8, seed=1)
    ft.fit(x, np.arange(8) % 2, optimizer=tl.optim.Adam(lr=1e-2), progress=False, cache_features=False)
    frozen = [p for n, p in ft.native.named_parameters() if "head" not in n]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)


def test_requires_grad_changed_behind_tlcores_back_is_refused_at_fit():
    ft = tl.finetune(tl.wrap(Residual()), cut=tl.LayerCut(at="layer1"), head=tl.Head.linear(2))
    x = images()
    ft.predict(x)
    ft.native.body.body.stem.weight.requires_grad_(True)
    snap = tl.snapshot(ft)
    with pytest.raises(tl.FreezePolicyError, match=r"requires_grad of \['stem.weight'\]"):
        ft.fit(x, np.arange(4) % 2, progress=False)
    assert tl.changed_tensors(snap, ft.state()) == {}


# ---------------------------------------------------------------- torchvision and timm
torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")


def test_torchvision_resnet_without_input_shape_cut_at_layer3():
    torch.manual_seed(0)
    ft = tl.finetune(tl.wrap(torchvision.models.resnet18()), cut=tl.LayerCut(at="layer3"), head=tl.Head.linear(4))
    assert [n for n in ft.layers if n.startswith("layer3")] == ["layer3", "layer3.0", "layer3.1"]
    assert "layer4" not in ft.layers and not ft.head_built
    x = images(n=8, size=32)
    snap = tl.snapshot(ft)
    hist = ft.fit(x, np.arange(8) % 4, epochs=2, batch_size=4, progress=False)
    assert hist.info["cache_features"] == "used"
    assert ft.state()["head.out.weight"].shape == (4, 256)
    tl.assert_frozen(snap, ft)


def test_torchvision_drop_last_sizes_the_head_from_the_classifier_without_data():
    ft = tl.finetune(tl.wrap(torchvision.models.resnet18()), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(3))
    assert ft.head_built and ft.state()["head.out.weight"].shape == (3, 512)
    assert ft.predict(images(n=2, size=32)).shape == (2, 3)
    vgg = torchvision.models.vgg11()  # avgpool is 7x7, not global: the width needs data
    assert not tl.finetune(tl.wrap(vgg), cut=tl.LayerCut(at="avgpool"), head=tl.Head.linear(3)).head_built


timm = pytest.importorskip("timm", reason="timm is not installed")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_050"])
def test_timm_batchnormact_networks_keep_the_freeze_guarantee(name):
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=10)
    ft = tl.finetune(tl.wrap(net), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(5))
    assert ft.head_built, "timm's classifier tells the width"
    x = images(n=8, size=64)
    snap = tl.snapshot(ft)
    full = ft.predict(x)
    assert tl.changed_tensors(snap, ft.state()) == {}, "predict must not move BatchNorm statistics"
    np.testing.assert_allclose(ft.predict(x[:2]), full[:2], rtol=1e-4, atol=1e-5)
    ft.fit(x, np.arange(8) % 5, epochs=1, batch_size=4, progress=False, cache_features=False,
           optimizer=tl.optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-2))
    tl.assert_frozen(snap, ft)
    ft.unfreeze()
    before = tl.snapshot(ft)
    ft.fit(x, np.arange(8) % 5, epochs=1, batch_size=4, progress=False)
    stats = [t.name for t in ft.tensors if t.kind == "bn_stat" and t.name.endswith("running_mean")]
    moved = tl.changed_tensors(before, ft.state(), stats)
    assert len(moved) == len(stats) > 10, "negative control: unfrozen BatchNorm statistics move"


@pytest.mark.parametrize("name, kw", [("convnext_atto", {}), ("vit_tiny_patch16_224", {"img_size": 32}),
                                      ("resnet18", {})])
def test_timm_drop_last_gives_timms_own_pooled_pre_logits_features(name, kw):
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=7, **kw)
    ft = tl.finetune(tl.wrap(net), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(3))
    assert ft.head_built, "timm tells the width: no input_shape, no data needed"
    reference = timm.create_model(name, pretrained=False, num_classes=7, **kw)
    reference.load_state_dict(net.state_dict())
    reference.reset_classifier(0)  # timm's own way to get the pooled features
    reference.eval()
    x = images(n=3, size=32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(ft.features(x), expected)
    assert ft.state()[f"{ft.head}.out.weight"].shape == (3, expected.shape[1])


# ---------------------------------------------------------------- precision and your own head
@pytest.mark.parametrize("precision, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                              ("float32", torch.float32)])
def test_mixed_precision_computes_in_the_dtype_and_keeps_float32_weights(precision, dtype):
    ft = tl.finetune(tl.wrap(Residual(), input_shape=(3, 6, 6)), cut=tl.LayerCut(at="layer1"),
                     head=tl.Head.linear(2), freeze=tl.FreezePolicy.up_to("stem"))
    seen = []
    hook = ft.native.body.body.layer1[1].conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x, y = images(n=8), np.arange(8) % 2
    snap = tl.snapshot(ft)
    ft.fit(x, y, epochs=2, batch_size=4, precision=precision, progress=False, cache_features=False)
    hook.remove()
    assert set(seen) == {dtype}
    tl.assert_frozen(snap, ft)
    assert {p.dtype for p in ft.native.parameters()} == {torch.float32}
    assert "layer1.1.conv.weight" in tl.changed_tensors(snap, ft.state())


def test_unknown_precision_is_refused_before_training():
    ft = tl.finetune(tl.wrap(Residual(), input_shape=(3, 6, 6)), head=tl.Head.linear(2))
    snap = tl.snapshot(ft)
    with pytest.raises(tl.OptimizerConfigError, match="did you mean 'float16'"):
        ft.fit(images(), np.arange(4) % 2, precision="float61", progress=False)
    assert tl.changed_tensors(snap, ft.state()) == {}


def test_your_own_head_module_trains_on_cached_features_as_without():
    results = {}
    for cache in (False, True):
        torch.manual_seed(0)
        head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(), nn.Linear(8, 2))
        ft = tl.finetune(tl.wrap(Residual(), input_shape=(3, 6, 6)), cut=tl.LayerCut(at="layer1"), head=head)
        assert ft.layers[-5:] == ["head", "head.0", "head.1", "head.2", "head.3"]
        hist = ft.fit(images(n=12), np.arange(12) % 2, epochs=3, batch_size=4, progress=False, cache_features=cache)
        results[cache] = (ft.state(), hist.info["cache_features"])
    assert results[True][1] == "used" and results[False][1] == "off"
    for name, value in results[False][0].items():
        np.testing.assert_allclose(results[True][0][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    with pytest.raises(tl.UnsupportedModelError, match="torch.nn.Module"):
        tl.finetune(tl.wrap(Residual()), head=lambda z: z)
