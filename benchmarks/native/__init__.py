"""Hand-written training loops, one per framework, as fast and idiomatic as we can write them.

Each module defines ``Native(model, mode)`` working on ``model.native`` (the framework object) and
freezing by hand: ``train_epoch(x, y, batch)``, ``forward(x, batch)``, ``optimizer_state_bytes()``.
"""
