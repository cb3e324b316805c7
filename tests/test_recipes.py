"""Fine-tuning recipes as portable specs: schedules against PyTorch's and Hugging Face's, layer groups,
callbacks, History.plot, fastai's fine_tune, and the same trajectory on every backend."""
import dataclasses
import importlib.util
import itertools

import numpy as np
import pytest

import tlcore as tl
from tlcore.schedules import Constant, Cosine, Linear, MultiStep, OneCycle, ScheduleError, Warmup
from tlcore.testing import selected_backends

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_HF = importlib.util.find_spec("transformers") is not None


def torch_rates(make_scheduler, steps: int) -> np.ndarray:
    import torch

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = make_scheduler(opt)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(rates)


@pytest.mark.skipif(not HAS_TORCH, reason="the reference schedulers are PyTorch's")
def test_schedules_equal_pytorch_and_hugging_face_schedulers():
    import torch.optim.lr_scheduler as S

    n = 40
    got = OneCycle(max_lr=0.1, total_steps=n, pct_start=0.25, div=10, final_div=100).lr_at(np.arange(n))
    want = torch_rates(lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=n, pct_start=0.25, div_factor=10,
                                              final_div_factor=100, cycle_momentum=False), n)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    got = MultiStep(0.1, milestones=(5, 12, 30), gamma=0.3).lr_at(np.arange(n))
    np.testing.assert_allclose(got, torch_rates(lambda o: S.MultiStepLR(o, [5, 12, 30], gamma=0.3), n), rtol=1e-12)
    if HAS_HF:
        from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

        for ours, theirs in ((Cosine(peak_lr=0.1, total_steps=n, warmup_steps=7), get_cosine_schedule_with_warmup),
                             (Linear(peak_lr=0.1, total_steps=n, warmup_steps=7), get_linear_schedule_with_warmup)):
            want = torch_rates(lambda o: theirs(o, num_warmup_steps=7, num_training_steps=n), n)
            np.testing.assert_allclose(ours.lr_at(np.arange(n)), want, rtol=1e-12, atol=1e-15)


def test_schedule_tables_and_their_closed_form():
    np.testing.assert_array_equal(Constant(0.3).lr_at(np.arange(4)), [0.3] * 4)
    assert Cosine(peak_lr=1.0, total_steps=10, final_lr=0.1).lr_at(10) == pytest.approx(0.1)
    assert Cosine(peak_lr=1.0, total_steps=10, final_lr=0.1).lr_at(1000) == pytest.approx(0.1), "stays at its end"
    warm = Warmup(4, MultiStep(0.2, milestones=(6,), gamma=0.5))
    np.testing.assert_allclose(warm.lr_at(np.arange(8)), [0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.1, 0.1])
    spec = tl.optim.AdamW(lr=Cosine(peak_lr=1e-3, total_steps=100, warmup_steps=10), weight_decay=0.05, no_decay="1d")
    assert tl.optim.optimizer_from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("make, message", [
    (lambda: Cosine(peak_lr=1e-3, total_steps=10, warmup_steps=10), "greater than warmup_steps"),
    (lambda: Linear(peak_lr=-1e-3, total_steps=10), "peak_lr"),
    (lambda: Cosine(peak_lr=float("nan"), total_steps=10), "peak_lr"),
    (lambda: MultiStep(0.1, milestones=(5, 3)), "increasing"),
    (lambda: OneCycle(max_lr=0.1, total_steps=10, pct_start=1.5), "pct_start"),
    (lambda: Warmup(0, Constant(0.1)), "steps"),
    (lambda: tl.optim.SGD(lr=Cosine(peak_lr=1e-3, total_steps=5), lr_mult="fast"), "lr_mult"),
    (lambda: tl.optim.SGD(lr=0.1, no_decay="("), "no_decay"),
])
def test_bad_schedules_and_optimizer_options_are_named_errors(make, message):
    with pytest.raises(tl.OptimizerConfigError, match=message):
        make()


def test_unfreeze_schedules_and_callbacks_are_checked():
    with pytest.raises(tl.FreezePolicyError, match="increasing"):
        tl.UnfreezeSchedule([(0, tl.FreezePolicy.all()), (3, tl.FreezePolicy.none()), (2, tl.FreezePolicy.all())])
    with pytest.raises(tl.FreezePolicyError, match="start at epoch 0"):
        tl.UnfreezeSchedule([(2, tl.FreezePolicy.all())])
    with pytest.raises(tl.callbacks.CallbackError, match="patience"):
        tl.callbacks.EarlyStopping(patience=-1)
    with pytest.raises(tl.callbacks.CallbackError, match="did you mean 'val_loss'"):
        tl.callbacks.check_callbacks([tl.callbacks.EarlyStopping(monitor="val_los")], ["loss", "val_loss", "lr"])
    stop = tl.callbacks.EarlyStopping(monitor="accuracy", patience=0)
    assert stop.mode == "max" and [stop.on_epoch_end(e, {"accuracy": a}, None) for e, a in
                                   enumerate([0.5, 0.6, 0.6])] == [False, False, True]


def test_history_plot_draws_every_metric_and_the_learning_rate():
    hist = tl.History({"loss": [1.0, 0.6], "accuracy": [0.5, 0.7], "val_loss": [1.1, 0.8], "lr": [0.1, 0.05]})
    fig = hist.plot()
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "lr"]
    assert len(fig.axes[0].lines) == 2 and len(fig.axes[2].lines) == 1


# ---------------------------------------------------------------- on models
SMALL = dict(in_channels=3, input_size=8, widths=(4, 8), num_classes=3)


def zoo_finetune(backend: str) -> tl.Model:
    base = tl.zoo.create("small_cnn", backend=backend, seed=3, **SMALL)
    return tl.finetune(base, cut=tl.LayerCut(drop_last=1), head=tl.Head.mlp(hidden=(6,), num_classes=3), seed=1)


def test_layer_groups_auto_follow_the_blocks_from_input_to_head():
    backend = selected_backends()[0]
    ft = tl.finetune(tl.zoo.create("resnet18", backend=backend, width=4, num_classes=3, input_size=32),
                     cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(2))
    groups = tl.LayerGroups.auto(ft)
    assert list(groups.labels) == ["conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                                   "layer3.1", "layer4.0", "layer4.1", "head"]
    decay = tl.LayerDecay(0.5, groups).multipliers()
    assert decay[-1] == 1.0 and decay[0] == 0.5 ** 10
    table = ft.describe_groups(tl.optim.AdamW(lr=1e-3, lr_mult=tl.LayerDecay(0.5, groups), no_decay="1d"))
    assert table.splitlines()[2].startswith("0 conv1") and "0.0009765" in table and "(no_decay)" in table


@pytest.mark.skipif(len(selected_backends()) < 2, reason="needs two backends to compare")
def test_describe_groups_is_the_same_on_every_backend():
    tables = set()
    for backend in selected_backends():
        ft = zoo_finetune(backend)
        groups = tl.LayerGroups.auto(ft)
        tables.add(ft.describe_groups(tl.optim.AdamW(lr=1e-3, lr_mult=tl.LayerDecay(0.7, groups), no_decay="1d")))
    assert len(tables) == 1, tables


RECIPES = {
    "adamw": tl.optim.AdamW(lr=Cosine(peak_lr=5e-3, total_steps=20, warmup_steps=3), weight_decay=0.05,
                            no_decay="1d"),
    "sgd_momentum": tl.optim.SGD(lr=Cosine(peak_lr=0.05, total_steps=20, warmup_steps=3), momentum=0.9,
                                 weight_decay=1e-3, no_decay="1d"),
}


def run_recipe(backend: str, name: str) -> tuple[list[float], dict]:
    ft = zoo_finetune(backend)
    opt = dataclasses.replace(RECIPES[name], lr_mult=tl.LayerDecay(0.75, tl.LayerGroups.auto(ft)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    plan = tl.UnfreezeSchedule([(0, tl.FreezePolicy.all()), (5, tl.FreezePolicy.up_to("bn1")),
                                (10, tl.FreezePolicy.none())])
    hist = ft.fit(x, y, epochs=20, batch_size=16, shuffle=False, optimizer=opt, freeze=plan, progress=False)
    return hist["loss"], ft.state()


@pytest.mark.slow
@pytest.mark.skipif(len(selected_backends()) < 2, reason="needs two backends to compare")
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_same_recipe_gives_the_same_trajectory_on_every_backend(recipe):
    """Cosine + layer decay + no_decay + staged unfreezing, 20 steps, float32: per-step losses and
    final weights within 1e-4 relative (Keras keeps the biased batch variance in its moving variance,
    so that statistic is compared apart)."""
    runs = {b: run_recipe(b, recipe) for b in selected_backends()}
    for (a, (la, sa)), (b, (lb, sb)) in itertools.combinations(runs.items(), 2):
        np.testing.assert_allclose(la, lb, rtol=1e-4, err_msg=f"{a} vs {b} losses")
        for n in sa:
            if n.endswith("running_var") and "keras" in (a, b):
                continue
            np.testing.assert_allclose(sa[n], sb[n], rtol=1e-4, atol=1e-5, err_msg=f"{a} vs {b}: {n}")


def test_fastai_fine_tune_freezes_then_unfreezes_with_discriminative_rates():
    backend = selected_backends()[0]
    ft = zoo_finetune(backend)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 3, 24)
    start = tl.snapshot(ft)
    first, second = tl.recipes.fine_tune(ft, x, y, epochs=2, freeze_epochs=1, base_lr=1e-2, batch_size=8,
                                         progress=False)
    assert first.epochs == 1 and second.epochs == 2
    assert first.info["cache_features"] == "used" and second.info["cache_features"].startswith("refused")
    assert 0.4e-2 < max(first.info["lr_steps"]) <= 1e-2   # one cycle up to base_lr (3 steps: near it)
    assert 0.4 * 5e-3 < max(second.info["lr_steps"]) <= 5e-3  # then up to base_lr / 2
    assert "conv1.weight" in tl.changed_tensors(start, ft.state())
