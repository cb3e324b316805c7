"""The benchmark workloads: the same zoo networks, data and modes on every backend."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import tlcore as tl
from tlcore.testing import example_shape

MODES = ("full", "frozen", "frozen_clip", "forward")
CLIP = 1.0
LR = 0.01


@dataclass(frozen=True)
class Workload:
    arch: str
    config: dict
    batch: int = 64
    #: the backends that have this workload (None: every backend)
    backends: tuple[str, ...] | None = None
    #: the modes measured; "partial" trains the last blocks and the head (see ``policy_for``)
    modes: tuple[str, ...] = MODES


WORKLOADS = {
    # four 3x3 Conv-BN-ReLU blocks 32-64-128-256 (2x2 max pools between), global average pool, linear
    "cnn": Workload("small_cnn", dict(in_channels=3, input_size=32, widths=(32, 64, 128, 256), num_classes=10)),
    "resnet18": Workload("resnet18", dict(in_channels=3, input_size=32, width=16, num_classes=10)),
    "vit_tiny": Workload("vit_tiny", dict(in_channels=3, image_size=32, patch_size=4, dim=96, depth=4, heads=3,
                                          num_classes=10)),
    # Hugging Face BertForSequenceClassification, 4 blocks of width 128, on 64 tokens; dropout off so
    # the frozen encoder is deterministic and its features can be cached (the dropout rule)
    "bert": Workload("hf_bert", dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=512, vocab_size=1000, max_position_embeddings=128,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=10),
                     batch=32, backends=("torch",), modes=("full", "partial", "frozen", "frozen_clip", "forward")),
}
SEQ_LEN = 64
#: the layers a "partial" fine-tune freezes: everything up to the block before the last two
PARTIAL_UP_TO = {"bert": "bert.encoder.layer.1"}


def policy_for(mode: str, workload: str = "") -> tl.FreezePolicy:
    if mode == "partial":
        return tl.FreezePolicy.up_to(PARTIAL_UP_TO[workload])
    return tl.FreezePolicy.none() if mode == "full" else tl.FreezePolicy.all()


def base_model(workload: str, backend: str, seed: int = 0) -> tl.Model:
    w = WORKLOADS[workload]
    if w.arch == "hf_bert":
        import torch
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(seed)
        return tl.wrap(BertForSequenceClassification(BertConfig(**w.config)))
    return tl.zoo.create(w.arch, backend=backend, seed=seed, **w.config)


def build(workload: str, backend: str, mode: str, seed: int = 0) -> tl.Model:
    """The network cut before its classifier with a new linear head (the class token for BERT),
    frozen as ``mode`` says."""
    if WORKLOADS[workload].arch != "hf_bert":
        return tl.finetune(base_model(workload, backend, seed), cut=tl.LayerCut(drop_last=1),
                           head=tl.Head.linear(10), freeze=policy_for(mode, workload), seed=seed)
    ft = tl.finetune(base_model(workload, backend, seed), cut=tl.LayerCut(at="bert"),
                     head=tl.Head.linear(10, pool="cls"), freeze=policy_for(mode, workload), seed=seed)
    return ft.build({"input_ids": np.ones((1, SEQ_LEN), np.int64)})  # the head is sized from one example


def data(model: tl.Model, n: int, seed: int = 0):
    """``(x, y)``: images of the model's input shape, or token ids and an attention mask for BERT."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.int64)
    if example_shape_or_none(model) is None:
        return {"input_ids": rng.integers(1, 1000, (n, SEQ_LEN)),
                "attention_mask": np.ones((n, SEQ_LEN), np.int64)}, y
    return rng.normal(size=(n, *example_shape(model))).astype(np.float32), y


def augmented_loader(x: np.ndarray, y: np.ndarray, batch: int, seed: int = 0):
    """A torch ``DataLoader`` over ``x, y`` whose dataset flips each image left-right at random (a
    cheap augmentation, in numpy, in the loading process), in order, yielding torch tensors."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Flipped(Dataset):
        def __init__(self):
            self.rng = np.random.default_rng(seed)

        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            image = x[i][:, ::-1] if self.rng.random() < 0.5 else x[i]
            return torch.from_numpy(np.ascontiguousarray(image)), int(y[i])

    return DataLoader(Flipped(), batch_size=batch, shuffle=False)


def example_shape_or_none(model: tl.Model):
    try:
        return example_shape(model)
    except ValueError:
        return None
