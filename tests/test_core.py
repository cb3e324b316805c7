"""The framework-free core: cuts, policies, heads, specs, data checks, the freeze check."""
import numpy as np
import pytest

import tlcore as tl
from tlcore.data import batch_slices
from tlcore.losses import check_targets
from tlcore.metrics import compute
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
    with pytest.raises(tl.LayerNotFoundError, match=r"out of range: integers count the 4 top-level layers"):
        tl.LayerCut(at=4).resolve(LAYERS)
    with pytest.raises(tl.CutError):
        tl.LayerCut(at="fc", drop_last=1)
    with pytest.raises(tl.CutError, match="every layer"):
        tl.LayerCut(drop_last=4).resolve(LAYERS)
    for bad in (True, 1.0, ["fc"]):
        with pytest.raises(tl.CutError, match="layer name or an int"):
            tl.LayerCut(at=bad)


def test_integers_count_top_level_layers_so_at_minus_n_plus_1_is_drop_last_n():
    for n in range(3):
        assert tl.LayerCut(at=-(n + 1) - 1).resolve(LAYERS) == tl.LayerCut(drop_last=n + 1).resolve(LAYERS)
    assert tl.LayerCut(at=1).resolve(LAYERS) == "layer1"  # not "layer1.0", the 2nd entry of the dotted list
    assert tl.FreezePolicy.up_to(-2).resolve(TENSORS, LAYERS).mask == tl.FreezePolicy.up_to("layer2").resolve(
        TENSORS, LAYERS).mask


def test_a_classifier_with_weightless_trailing_layers_counts_as_one_top_level_layer():
    layers = ["conv", "pool", "dropout", "logits", "flatten", "predictions"]  # keras.applications' top
    weighted = {"conv", "logits"}
    assert tl.LayerCut(drop_last=1).resolve(layers, weighted) == "dropout"
    assert tl.LayerCut(at=-2).resolve(layers, weighted) == "dropout"
    assert tl.LayerCut(at=-1).resolve(layers, weighted) == "predictions"
    assert tl.LayerCut(drop_last=1).resolve(layers) == "flatten", "negative control: without weights, one by one"
    with pytest.raises(tl.CutError, match="conv.*logits\\+flatten\\+predictions"):
        tl.LayerCut(drop_last=4).resolve(layers, weighted)


def test_a_cut_keeps_the_children_of_a_container_it_keeps():
    from tlcore.cut import kept_layers
    assert kept_layers(LAYERS, "layer1") == ["stem", "layer1", "layer1.0", "layer1.1"]
    assert kept_layers(LAYERS, "layer1.0") == ["stem", "layer1", "layer1.0"]
    assert kept_layers(LAYERS, None) == LAYERS
    from tlcore.cut import dropped_layers
    assert dropped_layers(LAYERS, kept_layers(LAYERS, "layer1.0")) == ["layer1.1", "layer2", "fc"]


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
    assert tl.Head.linear(np.int64(3)).num_classes == 3 and type(tl.Head.linear(np.int64(3)).num_classes) is int
    for bad in (dict(num_classes=0), dict(num_classes=True), dict(num_classes=2.0), dict(num_classes=2, hidden="8"),
                dict(num_classes=2, activation="swish2"), dict(num_classes=2, pool="median"), dict(num_classes=2, dropout=1)):
        with pytest.raises(tl.HeadError):
            tl.Head(**bad)


def test_head_plan_pools_by_layout_and_initial_values_depend_on_seed_and_shape_only():
    from tlcore.head import HeadPlan, initial_values, plan_head
    spec = tl.Head.mlp(hidden=(4,), num_classes=2)
    assert plan_head(spec, (16, 5, 5), channels_last=False).width == 16
    assert plan_head(spec, (5, 5, 16), channels_last=True).width == 16
    assert plan_head(spec, (7, 32), channels_last=False).width == 32  # tokens x dims: the dims
    assert plan_head(spec, (None, None, 8), channels_last=True).width == 8
    assert plan_head(tl.Head.linear(2, pool="flatten"), (None, None, 8), channels_last=True) is None
    assert plan_head(tl.Head.linear(2, pool="flatten"), (2, 3, 8), channels_last=True).width == 48
    a = initial_values(HeadPlan(spec, 16, (16, 5, 5)), seed=3)
    b = initial_values(HeadPlan(spec, 16), seed=3)  # the same width from a checkpoint: the same values
    assert a.keys() == {"fc0.weight", "fc0.bias", "out.weight", "out.bias"}
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == np.float32 for k in a)
    assert a["fc0.weight"].shape == (4, 16) and np.abs(a["fc0.weight"]).max() <= 0.25
    assert not np.array_equal(a["out.weight"], initial_values(HeadPlan(spec, 16), seed=4)["out.weight"])


def test_bad_optimizer_values_are_refused_at_construction():
    for make in (lambda: tl.optim.SGD(lr=0.0), lambda: tl.optim.Adam(lr=-1e-3),
                 lambda: tl.optim.AdamW(lr=1e-3, weight_decay=-0.1), lambda: tl.optim.RMSprop(lr=float("nan")),
                 lambda: tl.optim.SGD(lr=0.1, nesterov=True)):
        with pytest.raises(tl.OptimizerConfigError):
            make()


def test_unknown_backend_lists_installed_ones_and_unknown_objects_are_refused():
    with pytest.raises(tl.BackendNotFoundError) as info:
        tl.wrap(object(), backend="mxnet")
    for name in tl.available_backends():
        assert repr(name) in str(info.value)
    with pytest.raises(tl.UnsupportedModelError, match="no backend recognises"):
        tl.wrap({"not": "a model"})


def test_input_shapes_and_seeds_are_checked():
    from tlcore.data import check_input_shape, check_seed
    assert check_input_shape((3, None, np.int64(8))) == (3, None, 8)
    for bad in ("32x32", (0, 4), (3.0, 4), (True,), 5):
        with pytest.raises(tl.DataError, match="input_shape"):
            check_input_shape(bad)
    assert check_seed(np.uint32(7)) == 7
    for bad in (-1, 1.5, "x", True, 2**32):
        with pytest.raises(tl.DataError, match="seed"):
            check_seed(bad)


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
        check_targets("cross_entropy", np.array([0, 5]), 2, 3)
    with pytest.raises(tl.DataError, match=r"\[0, 1\]"):
        check_targets("binary_cross_entropy", np.array([0.0, 2.0]), 2, 1)


def test_numpy_metrics_match_definitions():
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    out = compute(["accuracy"], logits, np.array([0, 0]), loss_spec="cross_entropy")
    expected = -np.mean([2 - np.log(np.exp(2) + 1), 0 - np.log(1 + np.e)])
    assert out["loss"] == pytest.approx(expected) and out["accuracy"] == 0.5


def test_snapshot_and_assert_frozen_on_plain_dicts():
    class Fake:  # assert_frozen only needs state() and trainable_mask()
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
