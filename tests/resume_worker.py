"""One training process for tests/test_resume_kill.py, which SIGKILLs it at random moments.

    python tests/resume_worker.py BACKEND FOLDER OUT DROPOUT

Continues the run saved in FOLDER when there is one (``tl.resume``), else starts it; prints a line
per finished epoch; writes the final state and History to OUT (.npz, .json). The recipe touches every
piece of training state: AdamW + cosine schedule, staged unfreezing (a cached head-only stage, then
BatchNorm layers that train), dropout, a checkpoint every 2 steps (6 steps per epoch).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import tlcore as tl

EPOCHS, STEPS_PER_EPOCH = 6, 6


class Tell(tl.callbacks.Callback):
    def on_epoch_end(self, epoch, logs, model):
        print(f"epoch {epoch}", flush=True)


def main(backend: str, folder: str, out: str, dropout: float) -> None:
    stages = [(0, tl.FreezePolicy.all()), (2, tl.FreezePolicy.up_to("bn1")), (4, tl.FreezePolicy.none())]
    opt = tl.optim.AdamW(lr=tl.schedules.Cosine(peak_lr=1e-2, total_steps=EPOCHS * STEPS_PER_EPOCH,
                                                 warmup_steps=3), weight_decay=0.05)
    base = tl.zoo.create("small_cnn", backend=backend, seed=3, in_channels=3, input_size=8, widths=(4, 8),
                         num_classes=3)
    ft = tl.finetune(base, cut=tl.LayerCut(drop_last=1), head=tl.Head.mlp(hidden=(6,), num_classes=3, dropout=dropout),
                     seed=1)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 8 * STEPS_PER_EPOCH)
    x = (rng.normal(size=(len(y), 8, 8, 3)) + y[:, None, None, None] - 1).astype(np.float32)
    if (Path(folder) / "train_state.safetensors").exists():
        ft = tl.resume(folder, backend=backend)
        print(f"resumed at epoch {ft._resume_point.epoch} batch {ft._resume_point.batch}", flush=True)
    hist = ft.fit(x, y, epochs=EPOCHS, batch_size=8, optimizer=opt, freeze=tl.UnfreezeSchedule(stages),
                  progress=False, seed=7, checkpoint_dir=folder, checkpoint_every=2, callbacks=[Tell()])
    np.savez(out + ".npz", **ft.state())
    Path(out + ".json").write_text(json.dumps({"history": hist.history, "lr_steps": hist.info["lr_steps"]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
