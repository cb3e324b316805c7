"""Hugging Face PEFT adapters read by ``tl.Adapter.from_peft``: a LoRA adapter PEFT trained and saved
on a torch model gives PEFT's outputs through tlcore, and loads onto the same zoo base on Keras and
JAX with its layout converted."""
import copy
import json

import numpy as np
import pytest

import tlcore as tl
from tlcore.testing import selected_backends
from tlcore.testing.checks_adapters import VIT, vit, vit_data

torch = pytest.importorskip("torch", reason="PEFT adapters are made with torch, which is not installed")
peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")

TARGETS = ["qkv", "proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A PEFT LoRA adapter (random A and B, so it changes the outputs) on the torch zoo ViT, saved
    with PEFT's own save_pretrained, and PEFT's outputs on a batch."""
    out = tmp_path_factory.mktemp("peft")
    module = copy.deepcopy(vit("torch").native).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(module, config)
    model.save_pretrained(out)
    x, _ = vit_data(8)
    with torch.no_grad():
        expected = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    return out, x, expected


def test_peft_files_are_peft_layout(peft_dir):
    out, _, _ = peft_dir
    arrays = tl.checkpoint.read_state_dict(out / "adapter_model.safetensors")
    a = arrays["base_model.model.blocks.0.attn.qkv.lora_A.weight"]
    b = arrays["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert a.shape == (4, VIT["dim"]) and b.shape == (3 * VIT["dim"], 4) and np.abs(b).max() > 0


@pytest.mark.parametrize("backend", selected_backends())
def test_a_peft_adapter_gives_peft_outputs_on_every_backend(peft_dir, backend):
    out, x, expected = peft_dir
    spec = tl.Adapter.from_peft(out / "adapter_model.safetensors")
    assert spec.rank == 4 and spec.scale == 2.0 and len(spec.targets) == 4 * VIT["depth"]
    plain = vit(backend)
    ft = tl.finetune(plain, adapter=spec)
    got = ft.predict(x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert not np.allclose(plain.predict(x), expected, atol=1e-3), "negative control: the adapter matters"


def test_peft_features_tlcore_does_not_have_are_refused(peft_dir, tmp_path):
    out, _, _ = peft_dir
    config = json.loads((out / "adapter_config.json").read_text())
    for key, value, match in (("use_dora", True, "DoRA"), ("bias", "all", "trains biases"),
                              ("peft_type", "IA3", "only LORA")):
        with pytest.raises(tl.AdapterError, match=match):
            tl.Adapter.from_peft(out / "adapter_model.safetensors", config={**config, key: value})
    rslora = tl.Adapter.from_peft(out / "adapter_model.safetensors", config={**config, "use_rslora": True})
    assert rslora.scale == pytest.approx(8 / 4 ** 0.5)
    with pytest.raises(tl.AdapterError, match="cannot read the PEFT config"):
        tl.Adapter.from_peft(out / "adapter_model.safetensors", config=tmp_path / "missing.json")
