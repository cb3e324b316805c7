"""Hugging Face transformers models (built from tiny configs, random weights, no downloads) wrapped as
they are: Hugging Face names as cut points, dict inputs with integer token ids and attention masks,
``ModelOutput``s, cuts without ``torch.fx``, sequence heads, freezing, saving."""
import numpy as np
import pytest

import tlcore as tl

torch = pytest.importorskip("torch", reason="the torch backend is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

TINY = dict(vocab_size=100, num_labels=3)
BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **TINY)


def build(family: str):
    torch.manual_seed(0)
    T = transformers
    return {
        "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**BERT)),
        "bert_base": lambda: T.BertModel(T.BertConfig(**BERT)),
        "distilbert": lambda: T.DistilBertForSequenceClassification(
            T.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **TINY)),
        "gpt2": lambda: T.GPT2ForSequenceClassification(
            T.GPT2Config(n_embd=32, n_layer=2, n_head=2, pad_token_id=0, bos_token_id=1, eos_token_id=1, **TINY)),
        "llama": lambda: T.LlamaForSequenceClassification(T.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            pad_token_id=0, bos_token_id=1, eos_token_id=1, **TINY)),
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
            patch_size=4, num_labels=3)),
    }[family]()


def tokens(n=8, t=10, seed=0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(t)[None] < rng.integers(4, t + 1, (n, 1))).astype(np.int64)
    return {"input_ids": rng.integers(2, 100, (n, t)) * mask, "attention_mask": mask}


def images(n=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)


def test_layers_are_the_hugging_face_names_in_the_order_they_run():
    assert tl.wrap(build("bert")).layers == [
        "bert", "bert.embeddings", "bert.encoder", "bert.encoder.layer", "bert.encoder.layer.0",
        "bert.encoder.layer.1", "bert.pooler", "dropout", "classifier"]
    # DistilBERT registers `dropout` after `classifier` but runs it before: the listing follows the run
    assert tl.wrap(build("distilbert")).layers[-3:] == ["pre_classifier", "dropout", "classifier"]
    assert tl.wrap(build("gpt2")).layers[-3:] == ["transformer.h.1", "transformer.ln_f", "score"]


def test_model_outputs_and_integer_token_ids_are_understood():
    net = build("bert")
    x = tokens()
    net.eval()
    with torch.no_grad():
        expected = net(**{k: torch.from_numpy(v) for k, v in x.items()}).logits.numpy()
    np.testing.assert_allclose(tl.wrap(net).predict(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family, pool", [("bert", "cls"), ("distilbert", "mean"), ("gpt2", "last"), ("llama", "max")])
def test_drop_last_replaces_the_classifier_and_frozen_tensors_stay_bit_identical(family, pool):
    m = tl.wrap(build(family))
    ft = tl.finetune(m, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(2, pool=pool))
    x, y = tokens(), np.arange(8) % 2
    snap = tl.snapshot(ft.build(x))
    assert not any(n.startswith(("classifier", "score")) for n in snap)
    ft.fit(x, y, epochs=2, batch_size=4, optimizer=tl.optim.AdamW(lr=1e-2), progress=False)
    tl.assert_frozen(snap, ft)
    assert "head.out.weight" in tl.changed_tensors(snap, ft.state())
    part = {k: v[:3] for k, v in x.items()}
    np.testing.assert_allclose(ft.predict(part), ft.predict(x)[:3], rtol=1e-5, atol=1e-6)


def test_cut_inside_the_encoder_passes_the_attention_mask_and_freezes_what_the_policy_says():
    m = tl.wrap(build("bert"))
    ft = tl.finetune(m, cut=tl.LayerCut(at="bert.encoder.layer.1"), head=tl.Head.linear(2, pool="mean"),
                     freeze=tl.FreezePolicy.up_to("bert.encoder.layer.0"))
    x, y = tokens(), np.arange(8) % 2
    ft.build(x)
    mask = ft.trainable_mask()
    assert not any(mask[n] for n in mask if n.startswith(("bert.embeddings", "bert.encoder.layer.0.")))
    assert all(mask[n] for n in mask if n.startswith("bert.encoder.layer.1.") and "weight" in n)
    assert not any(n.startswith(("bert.pooler", "classifier")) for n in mask)
    # the features are layer 1's hidden states, mean-pooled over the tokens the mask keeps
    net = m.native
    net.eval()
    with torch.no_grad():
        hidden = net.bert(**{k: torch.from_numpy(v) for k, v in x.items()}).last_hidden_state.numpy()
    keep = x["attention_mask"][..., None]
    np.testing.assert_allclose(ft.features(x), (hidden * keep).sum(1) / keep.sum(1), rtol=1e-4, atol=1e-5)
    snap = tl.snapshot(ft)
    ft.fit(x, y, epochs=1, batch_size=4, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-2),
           progress=False)
    tl.assert_frozen(snap, ft)
    assert "bert.encoder.layer.1.output.dense.weight" in tl.changed_tensors(snap, ft.state())


def test_matching_policy_freezes_the_embeddings():
    ft = tl.finetune(build("bert"), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(2),
                     freeze=tl.FreezePolicy.matching(r"embeddings"))
    frozen = {n for n, t in ft.trainable_mask().items() if not t}
    assert frozen and all("embeddings" in n for n in frozen)
    assert {n for n in ft.state() if "embeddings" in n} == frozen


def test_vit_image_model_with_a_class_token_head():
    m = tl.wrap(build("vit"))
    ft = tl.finetune(m, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(2, pool="cls"))
    x = images()
    net = m.native
    net.eval()
    with torch.no_grad():
        hidden = net.vit(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    np.testing.assert_allclose(ft.features(x), hidden[:, 0], rtol=1e-4, atol=1e-5)
    snap = tl.snapshot(ft)
    ft.fit(x, np.arange(8) % 2, epochs=1, batch_size=4, progress=False)
    tl.assert_frozen(snap, ft)


def test_your_own_head_module_trains_and_is_saved(tmp_path):
    head = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    ft = tl.finetune(build("bert_base"), cut=tl.LayerCut(at="pooler"), head=head)
    assert ft.layers[-4:] == ["head", "head.0", "head.1", "head.2"]
    x, y = tokens(), np.arange(8) % 2
    snap = tl.snapshot(ft)
    hist = ft.fit(x, y, epochs=3, batch_size=4, optimizer=tl.optim.Adam(lr=1e-2), progress=False)
    assert hist.info["cache_features"].startswith("refused: layers before the head are random")  # BERT's dropout
    tl.assert_frozen(snap, ft)
    assert {"head.0.weight", "head.2.bias"} <= set(tl.changed_tensors(snap, ft.state()))
    ft.save(tmp_path / "own_head.safetensors")
    with pytest.raises(tl.CheckpointError, match="head=<native head module>"):
        tl.load(tmp_path / "own_head.safetensors", model=build("bert_base"))
    fresh_head = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    back = tl.load(tmp_path / "own_head.safetensors", model=build("bert_base"), head=fresh_head)
    assert tl.changed_tensors(ft.state(), back.state()) == {}
    np.testing.assert_allclose(back.predict(x), ft.predict(x), rtol=1e-5, atol=1e-6)


def test_save_and_load_round_trip_is_exact(tmp_path):
    ft = tl.finetune(build("gpt2"), cut=tl.LayerCut(at="transformer.h.0"), head=tl.Head.linear(2, pool="last"))
    x = tokens()
    ft.fit(x, np.arange(8) % 2, epochs=1, batch_size=4, progress=False)
    ft.save(tmp_path / "gpt2.safetensors")
    back = tl.load(tmp_path / "gpt2.safetensors", model=build("gpt2"))
    assert back.layers == ft.layers and back.trainable_mask() == ft.trainable_mask()
    assert tl.changed_tensors(ft.state(), back.state()) == {}
    np.testing.assert_array_equal(back.predict(x), ft.predict(x))


def test_bad_inputs_and_cut_names_get_named_errors():
    m = tl.wrap(build("bert"))
    with pytest.raises(tl.DataError, match="x has no 'input_ids'"):
        m.predict({"attention_mask": np.ones((2, 5), np.int64)})
    with pytest.raises(tl.DataError, match="did you mean 'attention_mask'"):
        m.predict({"input_ids": np.ones((2, 5), np.int64), "atention_mask": np.ones((2, 5), np.int64)})
    with pytest.raises(tl.LayerNotFoundError, match=r"'encoder.layer.1'.*'bert.encoder.layer.1'"):
        tl.finetune(m, cut=tl.LayerCut(at="encoder.layer.1"))  # another family's style: the valid names are listed
    with pytest.raises(tl.DataError, match="different lengths"):
        m.predict({"input_ids": np.ones((2, 5), np.int64), "attention_mask": np.ones((3, 5), np.int64)})
