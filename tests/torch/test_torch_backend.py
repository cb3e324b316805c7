"""What only the PyTorch backend has: torch.fx cuts of non-sequential modules, input inference."""
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
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = self.a(x)
        return self.b(x)


def test_fx_cut_inside_a_block_keeps_the_functional_tail_and_the_names():
    torch.manual_seed(0)
    m = tl.wrap(Residual(), input_shape=(3, 6, 6))
    assert m.layers == ["stem", "layer1", "layer1.0", "layer1.1", "fc"]
    ft = tl.finetune(m, cut=tl.LayerCut(at="layer1.0"), head=tl.Head.linear(2))
    assert "layer1.1.conv.weight" not in ft.state() and "layer1.0.bn.running_mean" in ft.state()
    x = np.random.default_rng(0).normal(size=(4, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():
        m.native.eval()
        expected = m.native.layer1[0](m.native.stem(torch.from_numpy(x))).mean((2, 3))
    np.testing.assert_allclose(ft._features(x).mean((2, 3)), expected.numpy(), rtol=1e-6)  # relu(+x) included
    snap = tl.snapshot(ft)
    ft.fit(x, np.array([0, 1, 0, 1]), epochs=2, batch_size=2, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.1),
           progress=False, cache_features=False)
    assert tl.assert_frozen(snap, ft)
    assert "head.out.weight" in tl.changed_tensors(snap, ft.state())


def test_untraceable_model_gets_a_clear_cut_error():
    with pytest.raises(tl.CutError, match="torch.fx could not trace"):
        tl.finetune(tl.wrap(Dynamic()), cut=tl.LayerCut(at="a"))


def test_input_shape_is_inferred_where_the_first_layer_tells():
    assert tl.wrap(nn.Sequential(nn.Linear(5, 2))).input_shape == (5,)
    conv = tl.wrap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    assert conv.input_shape == (3, None, None)
    with pytest.raises(tl.DataError, match="dimensions"):
        conv.predict(np.zeros((2, 3, 8), np.float32))
    with pytest.raises(tl.CutError, match="input_shape"):
        tl.finetune(conv, head=tl.Head.linear(2))
    assert tl.finetune(conv, head=tl.Head.linear(2), input_shape=(3, 5, 5)).predict(np.zeros((1, 3, 5, 5))).shape == (1, 2)


def test_frozen_parameters_get_no_grad_and_no_optimizer_state():
    ft = tl.finetune(tl.wrap(Residual(), input_shape=(3, 6, 6)), cut=tl.LayerCut(at="layer1"), head=tl.Head.linear(2))
    x = np.random.default_rng(1).normal(size=(8, 3, 6, 6)).astype(np.float32)
    ft.fit(x, np.arange(8) % 2, optimizer=tl.optim.Adam(lr=1e-2), progress=False, cache_features=False)
    frozen = [p for n, p in ft.native.named_parameters() if not ft.trainable_mask()[n]]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
