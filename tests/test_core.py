"""The framework-free core: cuts, policies, heads, specs, data checks, the freeze check."""
import numpy as np
import pytest

import tlcore as tl
from tlcore.data import as_targets, batch_slices, loss_and_metrics
from tlcore.freeze import TensorInfo

LAYERS = ["stem", "layer1", "layer1.0", "layer1.1", "layer2", "fc"]
TENSORS = [
    TensorInfo("root_token", "", "param"),
    TensorInfo("stem.weight", "stem", "param"),
    TensorInfo("layer1.0.conv.weight", "layer1.0", "param"),
    TensorInfo("layer1.0.bn.weight", "layer1.0", "bn_param", "layer1.0.bn"),
    TensorInfo("layer1.0.bn.running_mean", "layer1.0", "bn_stat", "layer1.0.bn"),
    TensorInfo("layer1.1.conv.weight", "layer1.1", "param"),
    TensorInfo("layer2.weight", "layer2", "param"),
    TensorInfo("layer2.const", "layer2", "buffer"),
    TensorInfo("layer2.drop.count", "layer2", "rng"),
    TensorInfo("fc.weight", "fc", "param"),
    TensorInfo("head.out.weight", "head.out", "param"),
]


def frozen(policy, head="head"):
    return [n for n, t in policy.resolve(TENSORS, LAYERS + ["head", "head.out"], head=head).mask.items() if not t]


def test_layer_cut_resolution():
    assert tl.LayerCut(at="layer1.0").resolve(LAYERS) == "layer1.0"
    assert tl.LayerCut(at=-1).resolve(LAYERS) == "fc"
    assert tl.LayerCut(drop_last=2).resolve(LAYERS) == "layer1"
    assert tl.LayerCut().resolve(LAYERS) is None
    with pytest.raises(tl.LayerNotFoundError, match="did you mean 'layer2'"):
        tl.LayerCut(at="layer3").resolve(LAYERS)
    with pytest.raises(tl.LayerNotFoundError, match="out of range"):
        tl.LayerCut(at=6).resolve(LAYERS)
    with pytest.raises(tl.CutError):
        tl.LayerCut(at="fc", drop_last=1)
    with pytest.raises(tl.CutError, match="every layer"):
        tl.LayerCut(drop_last=4).resolve(LAYERS)


def test_policy_all_freezes_the_base_never_the_head_and_keeps_rng_and_buffers_honest():
    assert frozen(tl.FreezePolicy.all()) == [t.name for t in TENSORS if t.kind != "rng" and not t.name.startswith("head")]
    assert frozen(tl.FreezePolicy.none()) == ["layer2.const"]  # a constant buffer never trains


def test_policy_up_to_includes_nested_children_and_root_tensors():
    assert frozen(tl.FreezePolicy.up_to("layer1")) == [
        "root_token", "stem.weight", "layer1.0.conv.weight", "layer1.0.bn.weight", "layer1.0.bn.running_mean",
        "layer1.1.conv.weight", "layer2.const"]
    assert "layer1.1.conv.weight" not in frozen(tl.FreezePolicy.up_to("layer1.0"))
    assert frozen(tl.FreezePolicy.up_to(1)) == frozen(tl.FreezePolicy.up_to("layer1"))


def test_batchnorm_is_frozen_as_a_unit_or_trained_with_bn_train():
    assert "layer1.0.bn.running_mean" in frozen(tl.FreezePolicy.matching(r"bn\.weight"))
    assert not [n for n in frozen(tl.FreezePolicy.all(bn="train")) if ".bn." in n]


def test_policy_errors():
    with pytest.raises(tl.FreezePolicyError, match="freezes no tensor"):
        frozen(tl.FreezePolicy.matching("^nothing"))
    with pytest.raises(tl.LayerNotFoundError, match="did you mean"):
        frozen(tl.FreezePolicy.up_to("layer_2"))
    with pytest.raises(tl.FreezePolicyError):
        tl.FreezePolicy.matching("(")
    with pytest.raises(tl.FreezePolicyError):
        tl.FreezePolicy.all(bn="sometimes")


def test_head_specs():
    assert [n for n, _ in tl.Head.mlp(hidden=(4, 3), num_classes=2).layers()] == ["pool", "fc0", "act0", "fc1", "act1", "out"]
    assert tl.Head.from_dict(tl.Head.mlp(hidden=(4,), num_classes=2, dropout=0.5).to_dict()).dropout == 0.5
    for bad in (dict(num_classes=0), dict(num_classes=2, activation="swish2"), dict(num_classes=2, pool="max")):
        with pytest.raises(tl.HeadError):
            tl.Head(**bad)


def test_optimizer_specs_round_trip_and_validate():
    spec = tl.optim.AdamW(lr=3e-4, betas=(0.8, 0.9), weight_decay=0.1)
    assert tl.optim.optimizer_from_dict(spec.to_dict()) == spec
    assert tl.optim.AdamW(lr=1e-3).weight_decay == 0.01
    with pytest.raises(tl.OptimizerConfigError, match="betas"):
        tl.optim.Adam(lr=1e-3, betas=(0.9, 1.5))


def test_data_checks_and_seeded_batching():
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    a = [b.tolist() for b in batch_slices(10, 3, True, rng1)]
    assert a == [b.tolist() for b in batch_slices(10, 3, True, rng2)]
    assert sorted(sum(a, [])) == list(range(10)) and [len(b) for b in a] == [3, 3, 3, 1]
    assert [np.arange(10)[s].tolist() for s in batch_slices(5, 2, False, rng1)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(tl.DataError, match="out of range"):
        as_targets(np.array([0, 5]), 2, "cross_entropy", 3)
    with pytest.raises(tl.DataError, match=r"\[0, 1\]"):
        as_targets(np.array([0.0, 2.0]), 2, "binary_cross_entropy", 1)


def test_numpy_metrics_match_definitions():
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    out = loss_and_metrics(logits, np.array([0, 0]), "cross_entropy")
    expected = -np.mean([2 - np.log(np.exp(2) + 1), 0 - np.log(1 + np.e)])
    assert out["loss"] == pytest.approx(expected) and out["accuracy"] == 0.5


def test_snapshot_and_assert_frozen_on_plain_dicts():
    class Fake:  # the check only needs state() and trainable_mask()
        def __init__(self, state):
            self._s = state

        def state(self):
            return self._s

        def trainable_mask(self):
            return {"a": False, "b": True}

    before = {"a": np.zeros(3), "b": np.zeros(3)}
    assert tl.assert_frozen(before, Fake({"a": np.zeros(3), "b": np.ones(3)})) == ["a"]
    with pytest.raises(tl.FrozenWeightsChanged, match="a: max"):
        tl.assert_frozen(before, Fake({"a": np.array([0, 0, 2.0]), "b": np.ones(3)}))
