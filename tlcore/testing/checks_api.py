"""Conformance: the shared ``Model`` API behaves the same on every backend."""
from __future__ import annotations

import numpy as np

import tlcore as tl
from tlcore.head import HeadPlan, initial_values

from . import REFERENCE_LAYERS, layer_of, reference_finetune, sample_data
from ._kit import check
from .reference import accuracy, binary_cross_entropy_with_logits, cross_entropy, mse


def close(a, b, what: str = "") -> None:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=what)


@check
def check_wrap_exposes_backend_native_layers_and_state(backend):
    m = tl.get_backend(backend).reference_model(seed=0)
    assert m.backend == backend
    assert tl.wrap(m.native).backend == backend, "the backend is inferred from the native type"
    assert m.layers == REFERENCE_LAYERS
    state = m.state()
    assert state and all(isinstance(v, np.ndarray) for v in state.values())
    assert all(layer_of(n) in REFERENCE_LAYERS for n in state), list(state)
    kinds = {t.name: t.kind for t in m.tensors}
    assert {layer_of(n) for n, k in kinds.items() if k == "bn_stat"} == {"bn1", "bn2"}
    assert set(m.trainable_mask()) == set(state)


@check
def check_cuts_by_name_index_and_drop_last_agree(backend):
    m = tl.get_backend(backend).reference_model(seed=0)
    kept = ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2"]
    x, _ = sample_data(m, n=4)
    outputs = []
    for cut in (tl.LayerCut(at="relu2"), tl.LayerCut(at=5), tl.LayerCut(at=-4), tl.LayerCut(drop_last=3)):
        ft = tl.finetune(m, cut=cut)
        assert ft.layers == kept, cut
        outputs.append(ft.predict(x))
    for out in outputs[1:]:
        close(out, outputs[0])
    assert tl.finetune(m).layers == REFERENCE_LAYERS


@check
def check_cut_at_a_nested_container_keeps_its_children(backend):
    m = tl.zoo.create("resnet18", backend=backend, width=4, num_classes=3, input_size=32)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    at_container = tl.finetune(m, cut=tl.LayerCut(at="layer2"))
    assert at_container.layers[-3:] == ["layer2", "layer2.0", "layer2.1"]
    assert tl.finetune(m, cut=tl.LayerCut(drop_last=4)).layers == at_container.layers
    at_last_child = tl.finetune(m, cut=tl.LayerCut(at="layer2.1"))
    close(at_container.predict(x), at_last_child.predict(x), "a container's output is its last child's")
    inner = tl.finetune(at_container, cut=tl.LayerCut(at="layer2.0"))
    assert inner.layers[-2:] == ["layer2", "layer2.0"]
    assert not np.allclose(inner.predict(x), at_container.predict(x)), "negative control: layer2.0 != layer2"


@check
def check_head_is_sized_from_the_cut_and_named_after_the_spec(backend):
    ft = reference_finetune(backend)
    assert ft.head == "head"
    assert ft.layers[-6:] == ["head", "head.pool", "head.fc0", "head.act0", "head.drop0", "head.out"]
    x, _ = sample_data(ft, n=5)
    assert ft.predict(x).shape == (5, 3)


@check
def check_head_starts_from_the_cores_numpy_values(backend):
    """The same head and seed start from the same weights on every backend: the core's."""
    for seed in (0, 7):
        ft = reference_finetune(backend, seed=seed)
        spec = tl.Head.mlp(hidden=(8,), num_classes=3, dropout=0.1)
        expected = initial_values(HeadPlan(spec, width=16), seed=seed)
        state = ft.state()
        for name, value in expected.items():
            np.testing.assert_array_equal(state[f"head.{name}"], value, err_msg=name)
    other = initial_values(HeadPlan(spec, width=16), seed=1)["out.weight"]
    assert not np.array_equal(other, expected["out.weight"]), "negative control: the seed matters"


@check
def check_lazy_head_equals_eager_head(backend):
    """A head built on the first batch (input shape unknown) starts and trains exactly as one built
    at once (input shape given)."""
    spec = tl.Head.mlp(hidden=(8,), num_classes=3)
    native = tl.get_backend(backend).reference_model(seed=0).native
    eager = tl.finetune(tl.wrap(native, input_shape=tl.get_backend(backend).reference_model(0).input_shape),
                        cut=tl.LayerCut(at="relu2"), head=spec, seed=5)
    lazy = tl.finetune(tl.wrap(native), cut=tl.LayerCut(at="relu2"), head=spec, seed=5)
    x, y = sample_data(eager, n=24)
    if not lazy.head_built:  # the backend cannot tell the width without data: it must say so
        try:
            lazy.state()
        except tl.HeadNotBuiltError as e:
            assert "first batch" in str(e)
        else:
            raise AssertionError("state() of a model whose head is not built must raise HeadNotBuiltError")
        assert "(built on first batch)" in str(lazy.summary())
    runs = []
    for ft in (eager, lazy):
        ft.fit(x, y, epochs=2, batch_size=8, optimizer=tl.optim.Adam(lr=1e-2), seed=1, progress=False)
        runs.append(ft.state())
    assert lazy.head_built
    assert tl.changed_tensors(runs[0], runs[1]) == {}


@check
def check_features_then_head_equal_predict(backend):
    ft = reference_finetune(backend)
    x, _ = sample_data(ft, n=10)
    close(ft.head_model().predict(ft.features(x)), ft.predict(x))


@check
def check_evaluate_matches_numpy_on_predictions(backend):
    ft = reference_finetune(backend)
    x, y = sample_data(ft, n=40)
    xv, yv = sample_data(ft, n=20, seed=1)
    hist = ft.fit(x, y, epochs=2, batch_size=16, validation_data=(xv, yv), progress=False)
    assert isinstance(hist, tl.History) and hist.epochs == 2
    assert set(hist.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    logits = ft.predict(xv)
    out = ft.evaluate(xv, yv, batch_size=7)
    assert abs(out["loss"] - cross_entropy(logits, yv)) < 1e-5
    assert out["accuracy"] == accuracy(logits, yv)
    assert abs(out["loss"] - hist["val_loss"][-1]) < 1e-5 * max(1.0, out["loss"])
    close(ft.predict(x, batch_size=7), ft.predict(x, batch_size=64))


@check
def check_other_losses_match_numpy_on_predictions(backend):
    model = tl.get_backend(backend).reference_model(seed=0)
    x, y = sample_data(reference_finetune(backend), n=32)
    targets = {"binary_cross_entropy": ((y == 0).astype(np.float32), binary_cross_entropy_with_logits),
               "mse": (x.reshape(32, -1)[:, 0], mse)}
    for loss, (target, reference) in targets.items():
        ft = tl.finetune(model, cut=tl.LayerCut(at="relu2"), head=tl.Head.linear(1))
        hist = ft.fit(x, target, epochs=2, batch_size=16, loss=loss, progress=False)
        assert hist["loss"][1] < hist["loss"][0], loss
        expected = reference(ft.predict(x).reshape(-1).astype(np.float64), target.astype(np.float64))
        assert abs(ft.evaluate(x, target, loss=loss)["loss"] - expected) < 1e-5, loss


@check
def check_training_learns_a_separable_task(backend):
    ft = reference_finetune(backend, tl.FreezePolicy.none(), dropout=0.0)
    x, y = sample_data(ft, n=96)
    before = ft.evaluate(x, y)["loss"]
    ft.fit(x, y, epochs=15, batch_size=32, optimizer=tl.optim.Adam(lr=1e-2), progress=False)
    assert ft.evaluate(x, y)["loss"] < 0.5 * before


@check
def check_summary_totals_add_up(backend):
    ft = reference_finetune(backend)
    s = ft.summary()
    state, mask = ft.state(), ft.trainable_mask()
    kinds = {t.name: t.kind for t in ft.tensors}
    params = [n for n, k in kinds.items() if k in ("param", "bn_param")]
    assert s.total_params == sum(state[n].size for n in params)
    assert s.trainable_params == sum(state[n].size for n in params if mask[n])
    assert s.total_params == s.trainable_params + s.non_trainable_params
    assert s.buffers == sum(state[n].size for n, k in kinds.items() if k in ("bn_stat", "buffer")) > 0
    text = str(s)
    assert "frozen" in text and "conv1" in text and f"Buffers (BatchNorm statistics and other state): {s.buffers:,}" in text
