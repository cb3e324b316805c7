"""The Keras step's loss specs and weights take exactly PyTorch's steps: class weights, sample weights,
soft labels, label smoothing (PyTorch's, not Keras'), ``pos_weight`` and Huber, on the compiled step
(``KerasTrainer``) and the shared graph loop of a head on cached features (``SharedStepTrainer``);
the steps return the outputs of their training forward pass, and weights add at most one trace."""
import numpy as np
import pytest

import tlcore as tl
from tlcore.losses import BinaryCrossEntropy, CrossEntropy, Huber, MSE
from tlcore.optim import TrainSpec
from tlcore.testing import reference_finetune, sample_data, selected_backends
from tlcore.testing.reference import ReferenceOptimizer

if "keras" not in selected_backends():
    pytest.skip("keras is not in TLCORE_TEST_BACKENDS", allow_module_level=True)

BACKEND = tl.get_backend("keras")  # before `import keras`: makes Keras run on TensorFlow

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

try:  # the conftest imports torch before tensorflow, as one process needs
    import torch
    F = torch.nn.functional
except ImportError:  # pragma: no cover
    torch = None
from tlcore_keras import train as ktrain  # noqa: E402
from tlcore_keras.train import KerasTrainer, SharedStepTrainer  # noqa: E402

needs_torch = pytest.mark.skipif(torch is None, reason="comparing with torch needs torch")

BATCH, CLASSES = 8, 3
HEAD = ("head.fc0.weight", "head.fc0.bias", "head.out.weight", "head.out.bias")
OPT = tl.optim.SGD(lr=0.5, momentum=0.9)  # linear in the gradient: a wrong scale of the loss shows

#: (loss spec, targets, sample weights?, fit's class_weight)
CASES = {
    "class_weight": (CrossEntropy(), "labels", False, {0: 0.5, 2: 3.0}),
    "sample_weight": (CrossEntropy(), "labels", True, None),
    "class_and_sample_weight": (CrossEntropy(class_weight=[1.0, 2.0, 0.5]), "labels", True, None),
    "soft_labels_weighted": (CrossEntropy(), "probabilities", True, None),
    "soft_labels_smoothing_class_weight": (CrossEntropy(label_smoothing=0.2, class_weight=[0.5, 1.0, 2.0]),
                                           "probabilities", False, None),
    "label_smoothing": (CrossEntropy(label_smoothing=0.2), "labels", False, None),
    "smoothing_class_and_sample_weight": (CrossEntropy(label_smoothing=0.1), "labels", True, [1.0, 2.0, 0.5]),
    "bce_pos_weight": (BinaryCrossEntropy(pos_weight=[3.0, 0.5, 1.0]), "binary", True, None),
    "bce_scalar_pos_weight_soft": (BinaryCrossEntropy(pos_weight=2.0), "binary_soft", False, None),
    "huber": (Huber(delta=0.5), "values", False, None),
    "huber_weighted": (Huber(delta=2.0), "values", True, None),
    "mse_weighted": (MSE(), "values", True, None),
}


def targets(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "labels":
        y = rng.integers(0, CLASSES, n)
        y[:CLASSES] = np.arange(CLASSES)
        return y
    if kind == "probabilities":
        p = rng.uniform(size=(n, CLASSES)) ** 2
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    if kind == "binary":
        return (rng.uniform(size=(n, CLASSES)) > 0.5).astype(np.float32)
    if kind == "binary_soft":
        return rng.uniform(size=(n, CLASSES)).astype(np.float32)
    return (rng.normal(size=(n, CLASSES)) * 2).astype(np.float32)


def case_data(case: str, n: int, seed: int = 0):
    spec, kind, weighted, cw = CASES[case]
    rng = np.random.default_rng(seed)
    y = targets(kind, n, rng)
    w = rng.uniform(0.0, 2.0, n).astype(np.float32) if weighted else None
    if w is not None:
        w[1] = 0.0  # a zero weight is allowed
    return spec, y, w, cw, tl.losses.with_class_weight(spec, cw)


# ------------------------------------------------------------------------------------ torch
def torch_loss(spec, z, y: np.ndarray, w: np.ndarray | None):
    """PyTorch's own loss: ``reduction="mean"`` without sample weights, else the documented weighted
    mean of ``reduction="none"``: ``sum(w * l) / sum(w * d)``."""
    reduction = "mean" if w is None else "none"
    d = None
    if isinstance(spec, CrossEntropy):
        cw = spec.class_weights(z.shape[1])
        cw = None if cw is None else torch.tensor(cw, dtype=torch.float32)
        t = torch.from_numpy(y)
        per = F.cross_entropy(z, t, weight=cw, label_smoothing=spec.label_smoothing, reduction=reduction)
        if cw is not None and t.ndim == 1:
            d = cw[t]
    else:
        t = torch.from_numpy(y)
        if isinstance(spec, BinaryCrossEntropy):
            pw = spec.pos_weights(z.shape[1])
            pw = None if pw is None else torch.tensor(pw, dtype=torch.float32)
            per = F.binary_cross_entropy_with_logits(z, t, pos_weight=pw, reduction=reduction)
        elif isinstance(spec, Huber):
            per = F.huber_loss(z, t, delta=spec.delta, reduction=reduction)
        else:
            per = F.mse_loss(z, t, reduction=reduction)
        if w is not None:
            per = per.mean(dim=1)
    if w is None:
        return per
    s = torch.from_numpy(w)
    return (s * per).sum() / (s * (torch.ones_like(per) if d is None else d)).sum()


def torch_steps(state: dict, feats: np.ndarray, y: np.ndarray, w: np.ndarray | None, spec,
                batches: list) -> tuple[dict, list]:
    """The MLP head (fc0, relu, out) trained by ``torch.optim.SGD`` on ``feats``: new head state and
    each step's logits (before its update)."""
    fc0, out = (torch.nn.Linear(*state[f"{name}.weight"].shape[::-1]) for name in ("head.fc0", "head.out"))
    with torch.no_grad():
        for layer, name in ((fc0, "head.fc0"), (out, "head.out")):
            layer.weight.copy_(torch.from_numpy(state[f"{name}.weight"]))
            layer.bias.copy_(torch.from_numpy(state[f"{name}.bias"]))
    params = [fc0.weight, fc0.bias, out.weight, out.bias]
    opt = torch.optim.SGD(params, lr=OPT.lr, momentum=OPT.momentum)
    logits = []
    for b in batches:
        z = out(torch.relu(fc0(torch.from_numpy(feats[b]))))
        logits.append(z.detach().numpy().copy())
        loss = torch_loss(spec, z, y[b], None if w is None else w[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: p.detach().numpy() for n, p in zip(HEAD, params)}, logits


def slices(n: int, size: int = BATCH) -> list:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# ------------------------------------------------------------------------------------ fit = torch
@needs_torch
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("cache", [False, True], ids=["compiled_step", "cached_head_loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_fit_takes_pytorchs_steps(case, cache, steps):
    """One and two steps of ``fit`` equal the same steps in torch (the whole model through its compiled
    step, or the head on cached features in one graph loop), and the epoch loss is the numpy reference's
    on the step's training outputs."""
    n = BATCH * steps
    ft = reference_finetune("keras", dropout=0.0)
    x, _ = sample_data(ft, n=n)
    spec, y, w, cw, full = case_data(case, n)
    start = ft.state()
    feats = ft.features(x)
    hist = ft.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, optimizer=OPT, loss=spec, class_weight=cw,
                  sample_weight=w, progress=False, cache_features=cache)
    assert hist.info["cache_features"] == ("used" if cache else "off")
    expected, logits = torch_steps(start, feats, y, w, full, slices(n))
    state = ft.state()
    for name in HEAD:
        np.testing.assert_allclose(state[name], expected[name], rtol=2e-5, atol=2e-6, err_msg=f"{case} {name}")
    assert abs(hist["loss"][0] - full.reference(np.concatenate(logits), y, w)) < 1e-5 * max(1.0, hist["loss"][0])
    # negative control: without the weighting (hard labels, MSE for Huber, no weights) torch ends elsewhere
    plain = MSE() if isinstance(spec, Huber) else type(spec)()
    hard = y.argmax(axis=1) if y.dtype == np.float32 and isinstance(spec, CrossEntropy) else y
    other, _ = torch_steps(start, feats, hard, None, plain, slices(n))
    assert not np.allclose(other["head.out.weight"], expected["head.out.weight"], rtol=1e-4, atol=1e-5), \
        "the weighting must change the step"


def test_fit_follows_the_numpy_reference_on_the_whole_head_over_epochs():
    """Without torch: the head's gradient from ``spec.reference_grad`` (back through fc0 and relu in
    numpy) and ``ReferenceOptimizer``, over two epochs with a short last batch."""
    spec = CrossEntropy(label_smoothing=0.1, class_weight=[1.0, 2.0, 0.5])
    n = 20
    for cache in (False, True):
        ft = reference_finetune("keras", dropout=0.0)
        x, y = sample_data(ft, n=n)
        w = np.random.default_rng(5).uniform(0.2, 2.0, n).astype(np.float32)
        feats = ft.features(x).astype(np.float64)
        p = {k: v.astype(np.float64) for k, v in ft.state().items() if k in HEAD}
        ref = ReferenceOptimizer(OPT)
        for _ in range(2):
            for b in slices(n):
                h = feats[b] @ p["head.fc0.weight"].T + p["head.fc0.bias"]
                a = np.maximum(h, 0.0)
                g = spec.reference_grad(a @ p["head.out.weight"].T + p["head.out.bias"], y[b], w[b])
                gh = (g @ p["head.out.weight"]) * (h > 0)
                p = ref.step(p, {"head.out.weight": g.T @ a, "head.out.bias": g.sum(0),
                                 "head.fc0.weight": gh.T @ feats[b], "head.fc0.bias": gh.sum(0)})
        ft.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, optimizer=OPT, loss=spec, sample_weight=w,
               progress=False, cache_features=cache)
        state = ft.state()
        for name in HEAD:
            np.testing.assert_allclose(state[name], p[name], rtol=5e-5, atol=5e-6, err_msg=f"{name} cache={cache}")
    wrong = reference_finetune("keras", dropout=0.0)  # negative control: the sample weights ignored
    wrong.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, optimizer=OPT, loss=spec, progress=False)
    assert not np.allclose(wrong.state()["head.out.weight"], p["head.out.weight"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ the loss itself
@pytest.mark.parametrize("case", list(CASES))
def test_weighted_loss_and_its_gradient_equal_the_numpy_reference(case):
    spec, y, w, cw, full = case_data(case, 9, seed=1)
    z = np.random.default_rng(2).normal(size=(9, CLASSES)).astype(np.float32) * 3
    logits = tf.Variable(z)
    with tf.GradientTape() as tape:
        value = ktrain.weighted_loss(logits, tf.constant(y), None if w is None else tf.constant(w), full)
    grad = tape.gradient(value, logits).numpy()
    np.testing.assert_allclose(float(value), full.reference(z, y, w), rtol=1e-5)
    np.testing.assert_allclose(grad, full.reference_grad(z, y, w), rtol=1e-4, atol=1e-6)
    if full != type(spec)():  # negative control: the spec's weighting changes the gradient
        assert not np.allclose(grad, type(spec)().reference_grad(z, y, None), rtol=1e-3, atol=1e-5)


def test_keras_own_smoothing_and_class_weights_differ_from_pytorchs():
    """Negative control, why the backend writes the formulas itself: Keras' ``label_smoothing`` with
    ``class_weight`` applied as sample weights (how ``keras.Model.fit`` applies it) weighs the whole
    smoothed loss by the label's class and divides by the batch size; PyTorch weighs each class's term
    and divides by the labels' summed weights."""
    z = np.random.default_rng(0).normal(size=(6, CLASSES)).astype(np.float32) * 2
    y = np.array([0, 1, 2, 2, 1, 2])
    spec = CrossEntropy(label_smoothing=0.2, class_weight=[0.5, 1.0, 3.0])
    cw = spec.class_weights(CLASSES)
    ours = float(ktrain.weighted_loss(tf.constant(z), tf.constant(y), None, spec))
    np.testing.assert_allclose(ours, spec.reference(z, y), rtol=1e-6)
    keras_own = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2)
    theirs = float(keras_own(np.eye(CLASSES)[y], z, sample_weight=cw[y]))
    assert abs(theirs - ours) > 1e-2
    unweighted = float(ktrain.weighted_loss(tf.constant(z), tf.constant(y), None, CrossEntropy(label_smoothing=0.2)))
    np.testing.assert_allclose(float(keras_own(np.eye(CLASSES)[y], z)), unweighted, rtol=1e-5), \
        "without class weights both smooth the same way"


def test_weights_summing_to_zero_give_nan_as_in_pytorch():
    z = tf.constant(np.ones((2, CLASSES), np.float32))
    value = ktrain.weighted_loss(z, tf.constant([0, 1]), tf.constant([0.0, 0.0]), CrossEntropy())
    assert np.isnan(float(value))


# ------------------------------------------------------------------------------------ outputs and traces
@needs_torch
def test_steps_and_the_cached_epoch_return_each_steps_training_outputs():
    ktrain.clear_cache()  # a step of its own (one a model of the same structure traced before would serve)
    ft = reference_finetune("keras", dropout=0.0)
    x, y = sample_data(ft, n=20)
    w = np.random.default_rng(1).uniform(0.5, 2.0, 20).astype(np.float32)
    spec = TrainSpec(OPT, CrossEntropy(label_smoothing=0.1, class_weight=[1.0, 2.0, 0.5]))
    start, feats = ft.state(), ft.features(x)
    _, expected = torch_steps(start, feats, y, w, spec.loss, slices(20))

    trainer = ft._make_trainer(spec)  # the whole model's compiled step
    assert isinstance(trainer, KerasTrainer)
    before = ft.predict(x[:8])
    outs = [trainer.step(x[b], y[b], w[b]) for b in slices(20)]
    assert all(isinstance(o, np.ndarray) and o.dtype == np.float32 for o in outs)
    assert [o.shape for o in outs] == [(8, 3), (8, 3), (4, 3)]
    np.testing.assert_allclose(outs[0], before, rtol=1e-5, atol=1e-6)  # frozen BN, no dropout: as predict
    for got, want in zip(outs, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert trainer.compilations == 1, "a short last batch does not trace again"

    ft.load_state(start)
    head = ft.head_model()
    shared = head._make_trainer(spec)
    assert isinstance(shared, SharedStepTrainer)
    calls = []
    outs = shared.epoch(feats, y, w, slices(20), calls.append)
    shared.finish()
    assert calls == [3] and [o.shape for o in outs] == [(8, 3), (8, 3), (4, 3)]
    for got, want in zip(outs, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(shared.step(feats[:8], y[:8]), head.predict(feats[:8]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cache", [False, True])
def test_sample_weights_add_one_trace_at_most_and_class_weights_are_constants(cache):
    spec = CrossEntropy(label_smoothing=0.125 if cache else 0.0625, class_weight=[1.0, 2.0, 0.5])  # fresh keys
    kw = dict(batch_size=16, loss=spec, optimizer=tl.optim.Adam(lr=1e-2), progress=False, cache_features=cache)
    ft = reference_finetune("keras", dropout=0.0)
    x, y = sample_data(ft, n=40)  # 16 + 16 + 8
    w = np.random.default_rng(0).uniform(0.5, 2.0, 40).astype(np.float32)
    assert ft.fit(x, y, **kw).info["compilations"] == 1
    assert ft.fit(x, y, sample_weight=w, **kw).info["compilations"] == 1
    assert ft.fit(x, y, sample_weight=w, **kw).info["compilations"] == 0
    assert ft.fit(x, y, **kw).info["compilations"] == 0
    if cache:  # another model with the same head shares both traces
        other = reference_finetune("keras", dropout=0.0, seed=1)
        assert other.fit(x, y, sample_weight=w, **kw).info["compilations"] == 0
        assert other.fit(x, y, **kw).info["compilations"] == 0


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_weighted_losses_train_in_mixed_precision_with_float32_losses(precision):
    spec = CrossEntropy(label_smoothing=0.1, class_weight=[1.0, 2.0, 0.5])
    results = {}
    for p in ("float32", precision):
        ft = reference_finetune("keras", tl.FreezePolicy.up_to("bn1"), dropout=0.0)
        x, y = sample_data(ft, n=32)
        w = np.random.default_rng(0).uniform(0.5, 2.0, 32).astype(np.float32)
        snap = tl.snapshot(ft)
        hist = ft.fit(x, y, epochs=2, batch_size=8, loss=spec, sample_weight=w, optimizer=tl.optim.SGD(lr=0.05),
                      progress=False, cache_features=False, precision=p)
        tl.assert_frozen(snap, ft)
        results[p] = hist["loss"]
    assert np.isfinite(results[precision]).all()
    np.testing.assert_allclose(results[precision], results["float32"], rtol=5e-2)
