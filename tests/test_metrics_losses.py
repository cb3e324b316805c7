"""``tlcore.losses`` against ``torch.nn.functional`` (values and autograd gradients, float64) and
``tlcore.metrics`` against scikit-learn; streaming equals one-shot; bad input is refused by name."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from tlcore.errors import DataError, OptimizerConfigError, TlcoreError
from tlcore import losses as L
from tlcore import metrics as M

torch = pytest.importorskip("torch")
F = torch.nn.functional
skm = pytest.importorskip("sklearn.metrics")

RTOL = 1e-10
N, C = 9, 4


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def labels(n: int = N, c: int = C, seed: int = 1) -> np.ndarray:
    y = rng(seed).integers(0, c, size=n)
    y[:c] = np.arange(c)                     # every class present
    return y


def soft(n: int = N, c: int = C, seed: int = 2) -> np.ndarray:
    return softmax(rng(seed).normal(size=(n, c)) * 2)


def sample_weights(n: int = N, seed: int = 3) -> np.ndarray:
    w = rng(seed).uniform(0.0, 2.0, size=n)
    w[1] = 0.0                               # a zero weight is allowed
    return w


# ---- torch: the documented weighted mean from reduction="none" ----

def torch_loss(spec: L.LossSpec, pred: np.ndarray, targets: np.ndarray, sw: np.ndarray | None):
    """``(loss, d loss / d pred)`` with torch; the weighted mean is ``sum(s * L) / sum(s * d)``."""
    z = torch.tensor(pred, dtype=torch.float64, requires_grad=True)
    n = pred.shape[0]
    s = torch.ones(n, dtype=torch.float64) if sw is None else torch.tensor(sw, dtype=torch.float64)
    if isinstance(spec, L.CrossEntropy):
        cw = spec.class_weights(pred.shape[1])
        cw_t = None if cw is None else torch.tensor(cw)
        integer = targets.ndim == 1
        t = torch.tensor(targets, dtype=torch.int64 if integer else torch.float64)
        per = F.cross_entropy(z, t, weight=cw_t, label_smoothing=spec.label_smoothing, reduction="none")
        denom = cw_t[t] if (integer and cw_t is not None) else torch.ones(n, dtype=torch.float64)
        mean = F.cross_entropy(z, t, weight=cw_t, label_smoothing=spec.label_smoothing)
    else:
        t = torch.tensor(targets, dtype=torch.float64).reshape(pred.shape)
        if isinstance(spec, L.BinaryCrossEntropy):
            pw = spec.pos_weights(1 if pred.ndim == 1 else pred.shape[1])
            pw_t = None if pw is None else torch.tensor(pw)
            elem = F.binary_cross_entropy_with_logits(z, t, pos_weight=pw_t, reduction="none")
            mean = F.binary_cross_entropy_with_logits(z, t, pos_weight=pw_t)
        elif isinstance(spec, L.Huber):
            elem = F.huber_loss(z, t, delta=spec.delta, reduction="none")
            mean = F.huber_loss(z, t, delta=spec.delta)
        else:
            elem = F.mse_loss(z, t, reduction="none")
            mean = F.mse_loss(z, t)
        per = elem.reshape(n, -1).mean(dim=1)
        denom = torch.ones(n, dtype=torch.float64)
    loss = (s * per).sum() / (s * denom).sum()
    if sw is None:                           # the formula is torch's own reduction="mean"
        assert loss.item() == pytest.approx(mean.item(), rel=1e-12)
    loss.backward()
    return loss.item(), z.grad.numpy()


def case(kind: str):
    r = rng(7)
    if kind == "ce_labels":
        return r.normal(size=(N, C)) * 3, labels()
    if kind == "ce_soft":
        return r.normal(size=(N, C)) * 3, soft()
    if kind == "ce_onehot":
        return r.normal(size=(N, C)) * 3, np.eye(C)[labels()]
    if kind == "bce_1d":
        return r.normal(size=N) * 3, (r.uniform(size=N) > 0.5).astype(float)
    if kind == "bce_multi":
        return r.normal(size=(N, 3)) * 3, r.uniform(size=(N, 3))         # soft targets too
    if kind == "reg":
        return r.normal(size=(N, 3)) * 2, r.normal(size=(N, 3))
    if kind == "reg_1d":
        return r.normal(size=N) * 2, r.normal(size=N)
    raise AssertionError(kind)


CASES = [
    ("ce", L.CrossEntropy(), "ce_labels"),
    ("ce_soft", L.CrossEntropy(), "ce_soft"),
    ("ce_smooth", L.CrossEntropy(label_smoothing=0.1), "ce_labels"),
    ("ce_smooth_soft", L.CrossEntropy(label_smoothing=0.25), "ce_soft"),
    ("ce_cw_list", L.CrossEntropy(class_weight=[0.5, 2.0, 1.0, 3.0]), "ce_labels"),
    ("ce_cw_map", L.CrossEntropy(class_weight={1: 4.0, 3: 0.0}), "ce_labels"),
    ("ce_cw_smooth", L.CrossEntropy(label_smoothing=0.2, class_weight=[0.5, 2.0, 1.0, 3.0]), "ce_labels"),
    ("ce_cw_soft", L.CrossEntropy(class_weight=[0.5, 2.0, 1.0, 3.0]), "ce_soft"),
    ("ce_cw_smooth_soft", L.CrossEntropy(label_smoothing=0.1, class_weight={0: 3.0}), "ce_soft"),
    ("bce", L.BinaryCrossEntropy(), "bce_1d"),
    ("bce_multi", L.BinaryCrossEntropy(), "bce_multi"),
    ("bce_pos", L.BinaryCrossEntropy(pos_weight=3.0), "bce_1d"),
    ("bce_pos_vec", L.BinaryCrossEntropy(pos_weight=[0.5, 2.0, 4.0]), "bce_multi"),
    ("mse", L.MSE(), "reg"),
    ("mse_1d", L.MSE(), "reg_1d"),
    ("huber", L.Huber(), "reg"),
    ("huber_small", L.Huber(delta=0.3), "reg"),
    ("huber_big_1d", L.Huber(delta=2.5), "reg_1d"),
]


@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "sample_weight"])
@pytest.mark.parametrize("spec,kind", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_loss_and_grad_match_torch(spec, kind, weighted):
    pred, y = case(kind)
    sw = sample_weights() if weighted else None
    expected, expected_grad = torch_loss(spec, pred, y, sw)
    assert spec.reference(pred, y, sample_weight=sw) == pytest.approx(expected, rel=RTOL)
    grad = spec.reference_grad(pred, y, sample_weight=sw)
    assert grad.shape == pred.shape and grad.dtype == np.float64
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-9, atol=1e-14)


def test_weighted_mean_formula_is_documented_one():
    pred, y = case("reg")
    w = sample_weights()
    per_sample = ((pred - y) ** 2).mean(axis=1)
    assert L.MSE().reference(pred, y, w) == pytest.approx(np.sum(w * per_sample) / np.sum(w), rel=1e-14)
    assert L.MSE().reference(pred, y, np.ones(N)) == pytest.approx(L.MSE().reference(pred, y), rel=1e-14)
    # an integer weight is the same as repeating the sample
    w2 = np.array([2, 1, 1, 3, 1, 1, 1, 1, 1])
    z, lab = case("ce_labels")
    spec = L.CrossEntropy(label_smoothing=0.1, class_weight=[0.5, 2.0, 1.0, 3.0])
    rep = np.repeat(np.arange(N), w2)
    assert spec.reference(z, lab, w2) == pytest.approx(spec.reference(z[rep], lab[rep]), rel=1e-12)
    num, den = spec.reference_sums(z, lab, w2)
    assert num / den == pytest.approx(spec.reference(z, lab, w2), rel=1e-15)


def test_class_and_sample_weights_combine_as_product():
    z, y = case("ce_labels")
    cw = np.array([0.5, 2.0, 1.0, 3.0])
    s = sample_weights()
    nll = -np.log(softmax(z)[np.arange(N), y])
    w = s * cw[y]
    assert L.CrossEntropy(class_weight=cw).reference(z, y, s) == pytest.approx(np.sum(w * nll) / np.sum(w), rel=1e-12)


def test_probability_targets_with_class_weights_are_not_normalised_like_torch():
    z, y = case("ce_labels")
    cw = [0.5, 2.0, 1.0, 3.0]
    spec = L.CrossEntropy(class_weight=cw)
    onehot = np.eye(C)[y]
    as_probs = spec.reference(z, onehot)
    as_labels = spec.reference(z, y)
    zt, cw_t = torch.tensor(z), torch.tensor(cw, dtype=torch.float64)
    assert as_probs == pytest.approx(F.cross_entropy(zt, torch.tensor(onehot), weight=cw_t).item(), rel=RTOL)
    assert as_labels == pytest.approx(F.cross_entropy(zt, torch.tensor(y), weight=cw_t).item(), rel=RTOL)
    # torch divides by n for probabilities, by sum(cw[y]) for labels: the same one-hot data differ
    assert as_probs * N == pytest.approx(as_labels * np.sum(np.asarray(cw)[y]), rel=1e-12)
    assert as_probs != pytest.approx(as_labels, rel=1e-3)
    # without class weights one-hot rows and labels agree
    assert L.CrossEntropy().reference(z, onehot) == pytest.approx(L.CrossEntropy().reference(z, y), rel=1e-14)


def test_negative_controls():
    z, y = case("ce_labels")
    zt, yt = torch.tensor(z), torch.tensor(y)
    ours = L.CrossEntropy(label_smoothing=0.1).reference(z, y)
    assert ours == pytest.approx(float(F.cross_entropy(zt, yt, label_smoothing=0.1)), rel=RTOL)
    assert ours != pytest.approx(float(F.cross_entropy(zt, yt, label_smoothing=0.2)), rel=1e-4)
    assert ours != pytest.approx(float(F.cross_entropy(zt, yt)), rel=1e-4)
    cw = [0.5, 2.0, 1.0, 3.0]
    weighted = L.CrossEntropy(class_weight=cw).reference(z, y)
    reversed_cw = torch.tensor(cw[::-1], dtype=torch.float64)
    assert weighted != pytest.approx(F.cross_entropy(zt, yt, weight=reversed_cw).item(), rel=1e-4)
    x, t = case("bce_1d")
    assert L.BinaryCrossEntropy(pos_weight=3.0).reference(x, t) != pytest.approx(
        L.BinaryCrossEntropy(pos_weight=2.0).reference(x, t), rel=1e-4)
    p, r = case("reg")
    assert L.Huber(delta=0.3).reference(p, r) != pytest.approx(L.Huber(delta=0.4).reference(p, r), rel=1e-4)
    s = sample_weights()
    assert L.MSE().reference(p, r, s) != pytest.approx(L.MSE().reference(p, r), rel=1e-4)
    # a sample weight of 0 really removes the sample
    keep = s > 0
    assert L.MSE().reference(p, r, s) == pytest.approx(L.MSE().reference(p[keep], r[keep], s[keep]), rel=1e-14)


def test_huber_at_the_threshold_and_extreme_logits():
    pred = np.array([1.0, -1.0, 0.5, 2.0])
    target = np.zeros(4)
    exp, grad = torch_loss(L.Huber(delta=1.0), pred, target, None)
    assert L.Huber(delta=1.0).reference(pred, target) == pytest.approx(exp, rel=1e-14)
    np.testing.assert_allclose(L.Huber(delta=1.0).reference_grad(pred, target), grad, rtol=1e-14)
    z = np.array([[1000.0, -1000.0, 0.0], [-500.0, 500.0, 0.0]])
    y = np.array([1, 1])
    exp, grad = torch_loss(L.CrossEntropy(label_smoothing=0.1), z, y, None)
    assert L.CrossEntropy(label_smoothing=0.1).reference(z, y) == pytest.approx(exp, rel=1e-12)
    np.testing.assert_allclose(L.CrossEntropy(label_smoothing=0.1).reference_grad(z, y), grad, atol=1e-15)
    x = np.array([1000.0, -1000.0])
    exp, grad = torch_loss(L.BinaryCrossEntropy(pos_weight=2.0), x, np.array([0.0, 1.0]), None)
    assert L.BinaryCrossEntropy(pos_weight=2.0).reference(x, np.array([0.0, 1.0])) == pytest.approx(exp, rel=1e-12)


# ---- specs: names, dicts, validation ----

ALL_SPECS = [c[1] for c in CASES]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=[c[0] for c in CASES])
def test_spec_dict_round_trip(spec):
    d = spec.to_dict()
    assert d["kind"] == spec.kind
    assert L.loss_from_dict(d) == spec
    assert L.loss_from_dict(json.loads(json.dumps(d))) == spec
    assert hash(L.loss_from_dict(d)) == hash(spec)
    assert dataclasses.replace(spec) == spec
    assert L.as_loss(spec) is spec


def test_names_map_to_default_specs():
    assert L.as_loss("cross_entropy") == L.CrossEntropy()
    assert L.as_loss("binary_cross_entropy") == L.BinaryCrossEntropy()
    assert L.as_loss("mse") == L.MSE() and L.as_loss("huber") == L.Huber(delta=1.0)
    assert list(L.LOSSES) == ["cross_entropy", "binary_cross_entropy", "mse", "huber"]
    with pytest.raises(L.LossConfigError, match=r"unknown loss 'hubber'; did you mean 'huber'\? Valid: "
                                                 r"'cross_entropy', 'binary_cross_entropy', 'mse', 'huber'"):
        L.as_loss("hubber")
    with pytest.raises(L.LossConfigError, match="unknown loss"):
        L.loss_from_dict({"kind": "focal"})
    with pytest.raises(L.LossConfigError, match="bad fields for loss 'mse'"):
        L.loss_from_dict({"kind": "mse", "delta": 1.0})


def test_class_weight_forms():
    assert L.CrossEntropy(class_weight={2: 3, 0: 0.5}).class_weight == ((0, 0.5), (2, 3.0))
    assert L.CrossEntropy(class_weight=np.array([1, 2])).class_weight == (1.0, 2.0)
    assert L.CrossEntropy(class_weight={2: 3.0}).class_weights(4).tolist() == [1.0, 1.0, 3.0, 1.0]
    assert L.CrossEntropy(class_weight={2: 3.0}).to_dict()["class_weight"] == {2: 3.0}
    assert L.CrossEntropy(class_weight=[1, 2]).to_dict()["class_weight"] == [1.0, 2.0]


@pytest.mark.parametrize("make,match", [
    (lambda: L.CrossEntropy(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\), got 1.0"),
    (lambda: L.CrossEntropy(label_smoothing=-0.1), r"label_smoothing must be in \[0, 1\), got -0.1"),
    (lambda: L.CrossEntropy(label_smoothing="0.1"), r"label_smoothing must be in \[0, 1\), got '0.1'"),
    (lambda: L.CrossEntropy(label_smoothing=True), r"label_smoothing must be in \[0, 1\), got True"),
    (lambda: L.CrossEntropy(class_weight=[1.0, -2.0]), r"class_weight\[1\] must be a finite number >= 0, got -2.0"),
    (lambda: L.CrossEntropy(class_weight={0: float("nan")}), r"class_weight\[0\] must be a finite number >= 0"),
    (lambda: L.CrossEntropy(class_weight={"cat": 2.0}), r"class_weight keys must be class indices .*'cat'"),
    (lambda: L.CrossEntropy(class_weight={-1: 2.0}), r"class_weight keys must be class indices .*-1"),
    (lambda: L.CrossEntropy(class_weight=[]), r"class_weight is empty"),
    (lambda: L.CrossEntropy(class_weight=[0, 0]), r"class_weight must have a weight > 0"),
    (lambda: L.CrossEntropy(class_weight="balanced"), r"class_weight must be a \{class: weight\} mapping"),
    (lambda: L.BinaryCrossEntropy(pos_weight=-1.0), r"pos_weight must be a finite number >= 0, got -1.0"),
    (lambda: L.BinaryCrossEntropy(pos_weight=[1.0, float("inf")]), r"pos_weight\[1\] must be a finite number"),
    (lambda: L.BinaryCrossEntropy(pos_weight="2"), r"pos_weight must be a number >= 0"),
    (lambda: L.Huber(delta=0), r"Huber: delta must be a finite number > 0, got 0"),
    (lambda: L.Huber(delta=float("inf")), r"Huber: delta must be a finite number > 0"),
])
def test_bad_specs_are_refused(make, match):
    with pytest.raises(L.LossConfigError, match=match) as info:
        make()
    assert isinstance(info.value, OptimizerConfigError) and isinstance(info.value, ValueError)
    assert isinstance(info.value, TlcoreError)


def test_specs_are_frozen():
    spec = L.CrossEntropy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.label_smoothing = 0.5


# ---- targets ----

def test_check_targets_converts():
    y = L.check_targets("cross_entropy", [0, 3, 1.0], 3, 4)
    assert y.dtype == np.int64 and y.tolist() == [0, 3, 1]
    p = L.check_targets(L.CrossEntropy(), soft(3), 3, C)
    assert p.dtype == np.float32 and p.shape == (3, C)
    t = L.check_targets("binary_cross_entropy", [0, 1, 0.5], 3, 1)
    assert t.dtype == np.float32 and t.shape == (3, 1)
    r = L.check_targets(L.Huber(), np.zeros((3, 2), dtype=np.int64), 3, 2)
    assert r.dtype == np.float32 and r.shape == (3, 2)
    assert L.check_targets("mse", torch.zeros(3), 3, None).shape == (3, 1)   # tensors too


@pytest.mark.parametrize("spec,y,n,outputs,match", [
    ("cross_entropy", [0, 1], 3, 4, r"3 samples but 2 targets"),
    ("cross_entropy", [0, 4, 1], 3, 4, r"labels out of range: y spans \[0, 4\] but the head has 4 outputs"),
    ("cross_entropy", [0, -1, 1], 3, 4, r"labels out of range"),
    ("cross_entropy", [0, 1.5, 1], 3, 4, r"y\[1\] = 1.5 is not an integer"),
    ("cross_entropy", [0, float("nan"), 1], 3, 4, r"NaN or infinite"),
    ("cross_entropy", [True, False, True], 3, 4, r"boolean"),
    ("cross_entropy", np.zeros((3, 2, 2)), 3, 4, r"integer class labels \(n,\) or class probabilities"),
    ("cross_entropy", [[0.5, 0.5], [0.2, 0.7], [0.0, 0.5]], 3, 2,
     r"must sum to 1 \(within 0.001\) per row; row 1 sums to 0.9: \[0.2, 0.7\]"),
    ("cross_entropy", [[1.5, -0.5], [0.5, 0.5], [1, 0]], 3, 2, r"must be in \[0, 1\]; row 0"),
    ("cross_entropy", soft(3, 3), 3, 4, r"3 class probabilities per sample but the head has 4 outputs"),
    ("cross_entropy", [[0], [1], [2]], 3, 4, r"for integer labels give shape \(n,\), e.g. y.ravel\(\)"),
    (L.CrossEntropy(class_weight={5: 2.0}), [0, 1, 2], 3, 4,
     r"class_weight names class 5 but the head has 4 outputs \(classes 0..3\)"),
    (L.CrossEntropy(class_weight=[1.0, 2.0]), [0, 1, 1], 3, 4, r"class_weight has 2 weights but the head has 4"),
    ("binary_cross_entropy", [0, 1, 2], 3, 1, r"targets in \[0, 1\]; y spans \[0.0, 2.0\]"),
    ("binary_cross_entropy", [0, 1, np.inf], 3, 1, r"NaN or infinite"),
    (L.BinaryCrossEntropy(pos_weight=[1.0, 2.0]), np.zeros((3, 3)), 3, 3, r"pos_weight has 2 weights"),
    ("mse", np.zeros((3, 2)), 3, 3, r"2 value\(s\) per sample but the model has 3 output\(s\)"),
    ("mse", ["a", "b", "c"], 3, 1, r"must be numeric"),
    ("focal", [0, 1, 1], 3, 2, r"unknown loss 'focal'"),
])
def test_check_targets_refuses(spec, y, n, outputs, match):
    err = OptimizerConfigError if spec == "focal" else DataError
    with pytest.raises(err, match=match):
        L.check_targets(spec, y, n, outputs)


def test_reference_refuses_bad_inputs():
    z, y = case("ce_labels")
    with pytest.raises(DataError, match=r"sample_weight must be >= 0; sample 2 has weight -1.0"):
        L.CrossEntropy().reference(z, y, sample_weight=[1, 1, -1, 1, 1, 1, 1, 1, 1])
    with pytest.raises(DataError, match=r"sample_weight must have shape \(9,\)"):
        L.CrossEntropy().reference(z, y, sample_weight=np.ones(3))
    with pytest.raises(DataError, match=r"sample_weight must be finite"):
        L.CrossEntropy().reference_grad(z, y, sample_weight=np.full(N, np.nan))
    with pytest.raises(DataError, match=r"sum to 0"):
        L.CrossEntropy().reference(z, y, sample_weight=np.zeros(N))
    with pytest.raises(DataError, match=r"sum to 0"):      # every sample in a class of weight 0
        L.CrossEntropy(class_weight={0: 0.0}).reference(z[:1], np.array([0]))
    with pytest.raises(DataError, match=r"must sum to 1 \(within 0.001\) per row; row 0 sums to 0.9"):
        L.CrossEntropy().reference(z, soft() * 0.9)
    with pytest.raises(DataError, match=r"class_weight names class 7"):
        L.CrossEntropy(class_weight={7: 1.0}).reference(z, y)
    with pytest.raises(DataError, match=r"logits of shape \(n, classes\)"):
        L.CrossEntropy().reference(z[:, 0], y)
    with pytest.raises(DataError, match=r"pred contains 1 NaN"):
        L.MSE().reference(np.array([0.0, np.nan]), np.zeros(2))


# ---- metrics against scikit-learn ----

def multiclass(n: int = 60, c: int = 5, seed: int = 11):
    r = rng(seed)
    y = r.integers(0, c, size=n)
    y[:c] = np.arange(c)
    z = r.normal(size=(n, c)) + 1.5 * np.eye(c)[y]     # informative but imperfect
    return z, y


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "sample_weight"])
def test_multiclass_metrics_match_sklearn(weighted):
    z, y = multiclass()
    w = rng(5).uniform(0, 3, size=len(y)) if weighted else None
    pred = z.argmax(axis=1)
    got = M.compute(["accuracy", "top_1", "top_2", "top_3", "f1_macro", "precision_macro", "recall_macro", "auc"],
                    z, y, sample_weight=w)
    exp = {
        "accuracy": skm.accuracy_score(y, pred, sample_weight=w),
        "top_1": skm.top_k_accuracy_score(y, z, k=1, sample_weight=w),
        "top_2": skm.top_k_accuracy_score(y, z, k=2, sample_weight=w),
        "top_3": skm.top_k_accuracy_score(y, z, k=3, sample_weight=w),
        "f1_macro": skm.f1_score(y, pred, average="macro", sample_weight=w, zero_division=0),
        "precision_macro": skm.precision_score(y, pred, average="macro", sample_weight=w, zero_division=0),
        "recall_macro": skm.recall_score(y, pred, average="macro", sample_weight=w, zero_division=0),
        "auc": skm.roc_auc_score(y, softmax(z), multi_class="ovr", average="macro", sample_weight=w),
    }
    assert list(got) == list(exp)
    for name in exp:
        assert got[name] == pytest.approx(exp[name], abs=1e-12), name
    assert 0.3 < got["accuracy"] < 0.95 and got["top_3"] > got["accuracy"]    # not a degenerate case
    # the one-metric functions agree
    assert M.accuracy(z, y, sample_weight=w) == got["accuracy"]
    assert M.top_k(z, y, 2, sample_weight=w) == got["top_2"]
    assert M.f1_macro(z, y, sample_weight=w) == got["f1_macro"]
    assert M.precision_macro(z, y, sample_weight=w) == got["precision_macro"]
    assert M.recall_macro(z, y, sample_weight=w) == got["recall_macro"]
    assert M.auc(z, y, sample_weight=w) == got["auc"]


def test_probability_targets_are_read_by_argmax():
    z, y = multiclass()
    names = ["accuracy", "top_2", "f1_macro", "auc"]
    probs = 0.7 * np.eye(5)[y] + 0.3 / 5
    assert M.compute(names, z, probs) == M.compute(names, z, y)
    with pytest.raises(DataError, match="must sum to 1"):
        M.compute(names, z, probs * 0.5)


def test_macro_metrics_with_missing_classes_match_sklearn():
    r = rng(4)
    y = r.integers(0, 3, size=40)              # classes 3..5 of 6 never appear as targets
    z = r.normal(size=(40, 6))
    z[:, 5] -= 10                              # and class 5 is never predicted
    pred = z.argmax(axis=1)
    assert 5 not in pred and {3, 4} & set(pred)
    for name, fn in [("f1_macro", skm.f1_score), ("precision_macro", skm.precision_score),
                     ("recall_macro", skm.recall_score)]:
        assert M.compute([name], z, y)[name] == pytest.approx(fn(y, pred, average="macro", zero_division=0), abs=1e-12)
    # one-vs-rest AUC averages over the classes present in the targets
    p = softmax(z)
    exp = np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in range(3)])
    assert M.auc(z, y) == pytest.approx(exp, abs=1e-12)
    assert math.isnan(M.auc(z, np.zeros(40, dtype=int)))      # one class: undefined


@pytest.mark.parametrize("shape", ["1d", "column"])
def test_binary_single_logit_matches_sklearn(shape):
    r = rng(8)
    y = r.integers(0, 2, size=50)
    z = r.normal(size=50) + (2 * y - 1)
    w = r.uniform(0, 2, size=50)
    logits = z if shape == "1d" else z[:, None]
    pred = (z > 0).astype(int)
    got = M.compute(["accuracy", "top_1", "top_2", "f1_macro", "precision_macro", "recall_macro", "auc"],
                    logits, y, sample_weight=w)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred, sample_weight=w), abs=1e-12)
    assert got["top_1"] == got["accuracy"] and got["top_2"] == 1.0
    assert got["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", sample_weight=w), abs=1e-12)
    assert got["precision_macro"] == pytest.approx(
        skm.precision_score(y, pred, average="macro", sample_weight=w), abs=1e-12)
    assert got["recall_macro"] == pytest.approx(skm.recall_score(y, pred, average="macro", sample_weight=w), abs=1e-12)
    assert got["auc"] == pytest.approx(skm.roc_auc_score(y, z, sample_weight=w), abs=1e-12)
    # probability targets: class 1 where > 0.5
    soft_y = np.where(y == 1, 0.8, 0.1)
    assert M.compute(["accuracy", "auc"], logits, soft_y, sample_weight=w) == {k: got[k] for k in ("accuracy", "auc")}
    # negative control: reversed scores give 1 - AUC
    assert M.auc(-logits, y, sample_weight=w) == pytest.approx(1 - got["auc"], abs=1e-12)


def test_two_class_logits_auc_ranks_the_logit_difference():
    r = rng(9)
    y = r.integers(0, 2, size=40)
    z = r.normal(size=(40, 2)) + np.eye(2)[y]
    assert M.auc(z, y) == pytest.approx(skm.roc_auc_score(y, softmax(z)[:, 1]), abs=1e-12)
    assert M.auc(z, y) != pytest.approx(skm.roc_auc_score(y, z[:, 1]), abs=1e-6)   # not the raw logit


def test_auc_with_tied_scores_matches_sklearn():
    r = rng(10)
    y = r.integers(0, 2, size=80)
    z = np.round(r.normal(size=80) + y)          # many ties
    w = r.uniform(0, 1, size=80)
    assert M.auc(z, y) == pytest.approx(skm.roc_auc_score(y, z), abs=1e-12)
    assert M.auc(z, y, sample_weight=w) == pytest.approx(skm.roc_auc_score(y, z, sample_weight=w), abs=1e-12)


def test_multilabel_with_bce_matches_sklearn():
    r = rng(12)
    Y = (r.uniform(size=(50, 3)) > 0.5).astype(int)
    Z = r.normal(size=(50, 3)) + (2 * Y - 1)
    w = r.uniform(0, 2, size=50)
    P = (Z > 0).astype(int)
    got = M.compute(["accuracy", "f1_macro", "precision_macro", "recall_macro", "auc"], Z, Y,
                    loss_spec="binary_cross_entropy", sample_weight=w)
    assert got["loss"] == pytest.approx(L.BinaryCrossEntropy().reference(Z, Y, w), rel=1e-14)
    wr = np.repeat(w, 3)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(Y.ravel(), P.ravel(), sample_weight=wr), abs=1e-12)
    assert got["f1_macro"] == pytest.approx(skm.f1_score(Y, P, average="macro", sample_weight=w), abs=1e-12)
    assert got["precision_macro"] == pytest.approx(
        skm.precision_score(Y, P, average="macro", sample_weight=w), abs=1e-12)
    assert got["recall_macro"] == pytest.approx(skm.recall_score(Y, P, average="macro", sample_weight=w), abs=1e-12)
    assert got["auc"] == pytest.approx(skm.roc_auc_score(Y, Z, average="macro", sample_weight=w), abs=1e-12)
    with pytest.raises(M.MetricError, match="top_1 is for single-label classification"):
        M.compute(["top_1"], Z, Y, loss_spec="binary_cross_entropy")
    # without the spec, three outputs are three classes
    assert M.compute(["accuracy"], Z, np.array(Y.argmax(axis=1)))["accuracy"] == pytest.approx(
        skm.accuracy_score(Y.argmax(axis=1), Z.argmax(axis=1)))


def test_regression_metrics_match_sklearn():
    r = rng(13)
    p, t, w = r.normal(size=(30, 3)), r.normal(size=(30, 3)), r.uniform(0, 2, size=30)
    got = M.compute(["mse", "mae"], p, t, sample_weight=w)
    assert got["mse"] == pytest.approx(skm.mean_squared_error(t, p, sample_weight=w), abs=1e-12)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(t, p, sample_weight=w), abs=1e-12)
    assert M.mse(p[:, 0], t[:, 0]) == pytest.approx(skm.mean_squared_error(t[:, 0], p[:, 0]), abs=1e-12)
    assert M.mae(p[:, :1], t[:, 0]) == pytest.approx(skm.mean_absolute_error(t[:, 0], p[:, 0]), abs=1e-12)
    got = M.compute(["mse"], p, t, loss_spec=L.Huber(delta=0.5))
    assert got["loss"] == pytest.approx(L.Huber(delta=0.5).reference(p, t), rel=1e-14)
    with pytest.raises(DataError, match=r"1 value\(s\) per sample but the model has 5 output\(s\)"):
        M.compute(["mse"], *multiclass())


def test_top_1_equals_accuracy_under_ties():
    z = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0]])
    y = np.array([1, 1, 2])
    got = M.compute(["accuracy", "top_1", "top_2", "top_3"], z, y)
    assert got == {"accuracy": 1 / 3, "top_1": 1 / 3, "top_2": 2 / 3, "top_3": 1.0}


def test_compute_with_loss_spec_adds_loss_first():
    z, y = multiclass()
    spec = L.CrossEntropy(label_smoothing=0.1, class_weight={0: 2.0})
    got = M.compute(["accuracy", "loss"], z, y, loss_spec=spec)
    assert list(got) == ["loss", "accuracy"]
    assert got["loss"] == pytest.approx(spec.reference(z, y), rel=1e-14)
    zt, yt = torch.tensor(z), torch.tensor(y)
    assert got["loss"] == pytest.approx(float(F.cross_entropy(zt, yt, label_smoothing=0.1, weight=torch.tensor(
        [2.0, 1, 1, 1, 1], dtype=torch.float64))), rel=RTOL)


# ---- streaming ----

STREAMS = {
    "multiclass": (["loss", "accuracy", "top_2", "f1_macro", "precision_macro", "recall_macro", "auc"],
                   "cross_entropy", lambda: multiclass(97, 5, 21)),
    "soft_targets": (["loss", "accuracy", "top_3", "auc"], L.CrossEntropy(label_smoothing=0.1),
                     lambda: (rng(3).normal(size=(97, 5)), soft(97, 5, 4))),
    "binary": (["loss", "accuracy", "f1_macro", "auc"], L.BinaryCrossEntropy(pos_weight=2.0),
               lambda: (rng(5).normal(size=97), (rng(6).uniform(size=97) > 0.4).astype(float))),
    "multilabel": (["loss", "accuracy", "recall_macro", "auc"], "binary_cross_entropy",
                   lambda: (rng(5).normal(size=(97, 3)), (rng(6).uniform(size=(97, 3)) > 0.5).astype(float))),
    "regression": (["loss", "mse", "mae"], "huber", lambda: (rng(5).normal(size=(97, 2)), rng(6).normal(size=(97, 2)))),
}


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "sample_weight"])
@pytest.mark.parametrize("which", list(STREAMS))
def test_accumulator_equals_one_shot(which, weighted):
    names, spec, make = STREAMS[which]
    z, y = make()
    w = rng(30).uniform(0, 2, size=len(z)) if weighted else None
    acc = M.Accumulator(names, loss_spec=spec)
    for start, stop in [(0, 1), (1, 33), (33, 64), (64, 97)]:
        acc.update(z[start:stop], y[start:stop], None if w is None else w[start:stop])
    assert acc.num_samples == 97
    streamed, one_shot = acc.result(), M.compute(names, z, y, loss_spec=spec, sample_weight=w)
    assert list(streamed) == list(one_shot)
    for name in one_shot:
        assert streamed[name] == pytest.approx(one_shot[name], rel=1e-12, abs=1e-15), name
    acc.reset()
    with pytest.raises(DataError, match="no batch was added"):
        acc.result()


def test_accumulator_keeps_state_after_a_bad_batch():
    z, y = multiclass()
    acc = M.Accumulator(["accuracy", "f1_macro"]).update(z[:30], y[:30])
    before = acc.result()
    with pytest.raises(DataError, match="labels out of range"):
        acc.update(z[30:], y[30:] + 5)
    with pytest.raises(DataError, match="this batch has 4 output"):
        acc.update(z[30:, :4], y[30:] % 4)
    with pytest.raises(DataError, match="sample_weight must be >= 0"):
        acc.update(z[30:], y[30:], sample_weight=-np.ones(30))
    assert acc.result() == before and acc.num_samples == 30
    with pytest.raises(DataError, match="sum to 0"):
        M.Accumulator(["accuracy"]).update(z, y, sample_weight=np.zeros(len(y))).result()


# ---- names and bad input ----

@pytest.mark.parametrize("bad,suggestion", [
    ("acuracy", "accuracy"), ("top5", "top_5"), ("top_10_accuracy", "top_10"), ("f1", "f1_macro"),
    ("roc_auc", "auc"), ("precison_macro", "precision_macro"), ("acc", "accuracy"),
])
def test_unknown_metric_suggests(bad, suggestion):
    with pytest.raises(M.MetricError, match=rf"unknown metric '{bad}'; did you mean '{suggestion}'\? Valid: "
                                            r"'accuracy', 'top_<k>' \(k >= 1, e.g. 'top_5'\), 'f1_macro'"):
        M.compute(["accuracy", bad], np.zeros((2, 3)), [0, 1])
    assert issubclass(M.MetricError, DataError) and issubclass(M.MetricError, ValueError)


def test_names_are_checked_before_the_data():
    with pytest.raises(M.MetricError, match="unknown metric 'f2'"):
        M.compute(["f2"], "not an array", None)
    with pytest.raises(M.MetricError, match="unknown metric 'nope'"):
        M.Accumulator(["accuracy", "nope"])
    with pytest.raises(M.MetricError, match=r"top_<k> needs k >= 1, got 'top_0'"):
        M.check_metric_names(["top_0"])
    with pytest.raises(M.MetricError, match="unknown metric 'top_05'"):
        M.check_metric_names(["top_05"])
    with pytest.raises(M.MetricError, match="'loss' needs a loss spec"):
        M.compute(["loss"], np.zeros((2, 3)), [0, 1])
    with pytest.raises(M.MetricError, match="metric names are strings"):
        M.check_metric_names([1])
    assert M.check_metric_names("auc") == ("auc",)
    with pytest.raises(OptimizerConfigError, match="unknown loss 'ce'"):
        M.compute(["accuracy"], np.zeros((2, 3)), [0, 1], loss_spec="ce")


def test_metrics_refuse_bad_data():
    z, y = multiclass()
    with pytest.raises(M.MetricError, match=r"top_6 needs at least 6 classes; these predictions have 5"):
        M.compute(["top_6"], z, y)
    with pytest.raises(M.MetricError, match=r"top_3 needs at least 3 classes; these predictions have 2"):
        M.compute(["top_3"], z[:, 0], y % 2)
    bad = z.copy()
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match=r"logits contains 1 NaN"):
        M.compute(["accuracy"], bad, y)
    with pytest.raises(DataError, match=r"sample_weight must be >= 0; sample 0"):
        M.compute(["accuracy"], z, y, sample_weight=np.r_[-1.0, np.ones(len(y) - 1)])
    with pytest.raises(DataError, match=r"60 samples but 59 targets"):
        M.compute(["accuracy"], z, y[:-1])
    with pytest.raises(DataError, match=r"single-output \(binary\) predictions take 0/1 labels"):
        M.compute(["accuracy"], z[:, 0], y)
    with pytest.raises(DataError, match=r"shape \(n,\) or \(n, classes\)"):
        M.compute(["accuracy"], z.reshape(60, 5, 1, 1), y)
    with pytest.raises(M.MetricError, match="top_k needs an int k >= 1"):
        M.top_k(z, y, 0)


def test_accumulator_state_round_trips_and_refuses_a_malformed_record():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(20, 3)), rng.integers(0, 3, 20)
    names = ["accuracy", "f1_macro", "auc"]
    first = M.Accumulator(names, "cross_entropy").update(z[:12], y[:12])
    again = M.Accumulator(names, "cross_entropy")
    again.load_state(*first.export_state())
    again.update(z[12:], y[12:])
    assert again.result() == M.Accumulator(names, "cross_entropy").update(z[:12], y[:12]).update(z[12:], y[12:]).result()
    record, arrays = first.export_state()
    for bad in (None, [], {**record, "num_samples": -1}, {**record, "task": "other"},
                {**record, "scalars": {"weight": "heavy"}}, {**record, "arrays": ["missing"]}):
        target = M.Accumulator(names, "cross_entropy")
        with pytest.raises(DataError, match="malformed metric state"):
            target.load_state(bad, arrays)
        assert target.num_samples == 0, "a refused state changes nothing"


def test_accumulator_nonfinite_nan_reports_nan_metrics_and_raise_refuses():
    z = np.array([[1.0, np.nan], [0.0, 1.0]])
    with pytest.raises(DataError, match="NaN"):
        M.Accumulator(["accuracy"], "cross_entropy").update(z, np.array([0, 1]))
    acc = M.Accumulator(["accuracy"], "cross_entropy", nonfinite="nan").update(z, np.array([0, 1]))
    assert acc.num_samples == 2 and all(np.isnan(v) for v in acc.result().values())
    finite = M.Accumulator(["accuracy"], "cross_entropy", nonfinite="nan").update(z[1:], np.array([1]))
    assert finite.result()["accuracy"] == 1.0, "negative control: finite logits give real metrics"
