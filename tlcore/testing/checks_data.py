"""Conformance: data from any source, weighted losses and metrics, the same on every backend.

The same batches as arrays, a generator function and a re-iterable of batches train to the same
weights; every loss spec and weighting takes exactly PyTorch's step (checked against the numpy
references of ``tlcore.losses`` and ``tlcore.testing.reference``); metrics over batches equal numpy
on the predictions; a source with random augmentation is never cached.
"""
from __future__ import annotations

import numpy as np

import tlcore as tl

from . import layer_of, reference_finetune, sample_data
from ._kit import check
from .checks_errors import raises
from .checks_numerics import BATCH, N, head_on_pooled_features
from .reference import ReferenceOptimizer


def batches_of(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


@check
def check_arrays_generators_and_iterables_train_the_same(backend):
    states, infos = {}, {}
    for name in ("arrays", "generator function", "list of batches", "deterministic list"):
        for cache in (False, "auto"):
            ft = reference_finetune(backend, dropout=0.0)
            x, y = sample_data(ft, n=40)
            source = {"arrays": None, "generator function": lambda: iter(batches_of(x, y, 8)),
                      "list of batches": batches_of(x, y, 8),
                      "deterministic list": tl.data.Deterministic(batches_of(x, y, 8))}[name]
            args = (x, y) if source is None else (source,)
            hist = ft.fit(*args, epochs=3, batch_size=8, shuffle=False, optimizer=tl.optim.Adam(lr=1e-2), seed=2,
                          progress=False, cache_features=cache)
            states[name, cache], infos[name, cache] = ft.state(), hist.info["cache_features"]
    assert infos["arrays", "auto"] == infos["deterministic list", "auto"] == "used"
    assert "Deterministic" in infos["generator function", "auto"]  # not declared: not cached
    for key, state in states.items():
        if key[1] and infos[key] == "used":
            for n, v in states["arrays", False].items():
                np.testing.assert_allclose(state[n], v, rtol=1e-5, atol=1e-5, err_msg=f"{key} {n}")
        else:
            assert tl.changed_tensors(states["arrays", False], state) == {}, key


@check
def check_augmented_source_trains_is_never_cached_and_frozen_stays(backend):
    ft = reference_finetune(backend, dropout=0.0)
    x, y = sample_data(ft, n=48)
    rng = np.random.default_rng(7)

    def augmented():  # a new random jitter every epoch
        for i in range(0, len(x), 16):
            yield x[i:i + 16] + rng.normal(scale=0.1, size=x[i:i + 16].shape).astype(np.float32), y[i:i + 16]

    snap = tl.snapshot(ft)
    hist = ft.fit(augmented, epochs=4, optimizer=tl.optim.Adam(lr=2e-2), progress=False)
    assert hist.info["cache_features"].startswith("refused") and "Deterministic" in hist.info["cache_features"]
    assert hist["loss"][-1] < hist["loss"][0]
    tl.assert_frozen(snap, ft)
    assert "head.out.weight" in tl.changed_tensors(snap, ft.state())


#: the losses and weightings whose step must be PyTorch's: (spec, targets kind, sample weights, fit kwargs)
WEIGHTED = {
    "class_weight": (tl.losses.CrossEntropy(), "labels", False, {"class_weight": {0: 0.5, 2: 3.0}}),
    "sample_weight": (tl.losses.CrossEntropy(), "labels", True, {}),
    "soft_labels": (tl.losses.CrossEntropy(), "probabilities", False, {}),
    "label_smoothing": (tl.losses.CrossEntropy(label_smoothing=0.2), "labels", False, {}),
    "smoothing_and_class_weight": (tl.losses.CrossEntropy(label_smoothing=0.1, class_weight=[1.0, 2.0, 0.5]),
                                   "labels", True, {}),
    "bce_pos_weight": (tl.losses.BinaryCrossEntropy(pos_weight=[3.0, 0.5, 1.0]), "binary", True, {}),
    "huber": (tl.losses.Huber(delta=0.5), "values", False, {}),
}


def _targets(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "labels":
        return rng.integers(0, 3, N)
    if kind == "probabilities":
        p = rng.uniform(size=(N, 3))
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    if kind == "binary":
        return (rng.uniform(size=(N, 3)) > 0.5).astype(np.float32)
    return rng.normal(size=(N, 3)).astype(np.float32)


@check(cases={name: {"case": name} for name in WEIGHTED})
def check_weighted_loss_steps_match_numpy_reference(backend, case):
    spec, kind, weighted, kwargs = WEIGHTED[case]
    rng = np.random.default_rng(3)
    y = _targets(kind, rng)
    w = rng.uniform(0.2, 2.0, N).astype(np.float32) if weighted else None
    full = tl.losses.with_class_weight(spec, kwargs.get("class_weight"))
    opt = tl.optim.SGD(lr=0.5, momentum=0.9)
    for cache in (False, True):
        ft = head_on_pooled_features(backend, 3)
        x = rng.normal(size=(N, *ft.input_shape)).astype(np.float32)
        feats = ft.features(x).astype(np.float64)
        state = ft.state()
        params = {"weight": state["head.out.weight"].astype(np.float64), "bias": state["head.out.bias"].astype(np.float64)}
        reference = ReferenceOptimizer(opt)
        for start in range(0, N, BATCH):
            b = slice(start, start + BATCH)
            logits = feats[b] @ params["weight"].T + params["bias"]
            g = full.reference_grad(logits, y[b], None if w is None else w[b])
            params = reference.step(params, {"weight": g.T @ feats[b], "bias": g.sum(axis=0)})
        ft.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, optimizer=opt, loss=spec, sample_weight=w,
               progress=False, cache_features=cache, **kwargs)
        state = ft.state()
        for name in ("weight", "bias"):
            np.testing.assert_allclose(state[f"head.out.{name}"], params[name], rtol=2e-5, atol=2e-6,
                                       err_msg=f"{case} {name} cache={cache}")
    # negative control: the same fit without the weighting (hard labels, MSE for Huber) ends elsewhere
    plain = head_on_pooled_features(backend, 3)
    plain.fit(x, y.argmax(axis=1) if kind == "probabilities" else y, epochs=1, batch_size=BATCH, shuffle=False,
              optimizer=opt, loss=tl.losses.MSE() if isinstance(spec, tl.losses.Huber) else type(spec)(),
              progress=False)
    assert not np.allclose(plain.state()["head.out.weight"], params["weight"], rtol=1e-4, atol=1e-5)


@check
def check_metrics_over_batches_equal_numpy_on_predictions(backend):
    ft = reference_finetune(backend)
    x, y = sample_data(ft, n=50)
    xv, yv = sample_data(ft, n=30, seed=1)
    names = ["accuracy", "top_2", "f1_macro", "precision_macro", "recall_macro", "auc"]
    hist = ft.fit(x, y, epochs=2, batch_size=16, metrics=names, validation_data=(xv, yv), progress=False)
    assert set(hist.history) == {"loss", *names, "val_loss", *(f"val_{n}" for n in names), "lr"}
    assert all(len(v) == 2 for v in hist.history.values())
    got = ft.evaluate(xv, yv, batch_size=7, metrics=names)
    want = tl.metrics.compute(names, ft.predict(xv), yv, loss_spec="cross_entropy")
    for name in want:
        assert abs(got[name] - want[name]) < 1e-6 * max(1.0, abs(want[name])), name
        assert abs(hist[f"val_{name}"][-1] - want[name]) < 1e-5 * max(1.0, abs(want[name])), name
    assert layer_of("head.out") == "head"


@check
def check_bad_sources_and_weights_are_refused_before_training(backend):
    ft = reference_finetune(backend)
    x, y = sample_data(ft, n=16)
    snap = tl.snapshot(ft)
    bad = [
        (lambda: ft.fit(lambda: iter([]), progress=False), "yields no batch"),
        (lambda: ft.fit(iter(batches_of(x, y, 8)), epochs=2, progress=False), "steps_per_epoch"),
        (lambda: ft.fit(x, y, sample_weight=-np.ones(16), progress=False), "sample_weight"),
        (lambda: ft.fit(x, y, class_weight={7: 2.0}, progress=False), "class 7"),
        (lambda: ft.fit(x, np.full((16, 3), 0.5, np.float32), progress=False), "sum to 1"),
        (lambda: ft.fit(x, y, metrics=["acuracy"], progress=False), "did you mean 'accuracy'"),
        (lambda: ft.fit(x, progress=False), "need targets"),
        (lambda: ft.fit(x, y, validation_data=x, progress=False), "validation_data"),
    ]
    for run, message in bad:
        with raises(tl.TlcoreError, message):
            run()
    assert tl.changed_tensors(snap, ft.state()) == {}
    batches = batches_of(x, y, 8)
    batches[1] = (x[8:], y[8:].astype(np.float32) + 0.5)  # a later batch of another kind: named by index
    with raises(tl.DataError, "batch 1"):
        ft.fit(batches, progress=False)


@check
def check_scaled_arrays_cached_reshuffle_every_epoch_as_uncached(backend):
    """uint8 arrays declared with ``tl.data.scale`` and shuffled: the feature cache computes their
    features in order and shuffles them each epoch from the run's generator, so a cached fit equals
    the uncached one (a cache that replayed one epoch's order would not)."""
    states = []
    for cache in ("auto", False):
        ft = reference_finetune(backend, dropout=0.0)
        x, y = sample_data(ft, n=40)
        images = np.clip(x * 40 + 128, 0, 255).astype(np.uint8)
        hist = ft.fit(tl.data.scale(images, 1 / 255), y, epochs=3, batch_size=8, shuffle=True, cache_features=cache,
                      progress=False, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9))
        assert hist.info["cache_features"] == ("used" if cache else "off")
        states.append(ft.state())
    for name in states[0]:
        np.testing.assert_allclose(states[0][name], states[1][name], rtol=1e-5, atol=1e-6, err_msg=name)
