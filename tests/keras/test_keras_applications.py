"""Real Keras models (``keras.applications``, random weights): cut at an inner layer, freeze, attach a
head, fine-tune a few steps; the frozen part stays bit-identical and the trainable part moves."""
import numpy as np
import pytest

import tlcore as tl
from tlcore.testing import selected_backends

if "keras" not in selected_backends():
    pytest.skip("keras is not in TLCORE_TEST_BACKENDS", allow_module_level=True)

tl.get_backend("keras")  # before `import keras`: makes Keras run on TensorFlow

import keras  # noqa: E402

APPS = {
    # name: (constructor, inner layer to cut at, freeze up to, a tensor the policy leaves trainable)
    "MobileNetV3Small": (lambda: keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, include_top=False),
        "expanded_conv_2_add", "expanded_conv_1_project_bn", "expanded_conv_2_expand_bn.moving_mean"),
    "ResNet50": (lambda: keras.applications.ResNet50(input_shape=(32, 32, 3), weights=None, include_top=False),
                 "conv3_block1_out", "conv2_block3_out", "conv3_block1_1_bn.moving_variance"),
}


@pytest.mark.parametrize("name", list(APPS))
def test_application_cut_freeze_head_finetune(name):
    make, cut_at, freeze_to, moving = APPS[name]
    m = tl.wrap(make())
    assert cut_at in m.layers and m.input_shape == (32, 32, 3)
    ft = tl.finetune(m, cut=tl.LayerCut(at=cut_at), head=tl.Head.mlp(hidden=(16,), num_classes=3, dropout=0.1),
                     freeze=tl.FreezePolicy.up_to(freeze_to))
    assert ft.layers[ft.layers.index(cut_at) + 1] == "head"
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 255, size=(8, 32, 32, 3)).astype(np.float32), rng.integers(0, 3, 8)
    snap = tl.snapshot(ft)
    frozen = [n for n, t in snap.mask.items() if not t]
    assert frozen and any(".moving_mean" in n for n in frozen)
    hist = ft.fit(x, y, epochs=1, batch_size=4, optimizer=tl.optim.AdamW(lr=1e-3, weight_decay=0.05),
                  progress=False)
    assert hist.info["cache_features"].startswith("refused") and np.isfinite(hist["loss"]).all()
    assert tl.assert_frozen(snap, ft) == frozen
    changed = tl.changed_tensors(snap, ft.state())
    assert moving in changed and "head.out.weight" in changed  # negative control: the rest trains
    assert ft.predict(x).shape == (8, 3)
