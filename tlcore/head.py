"""Framework-neutral head specs: what to attach after the cut.

A head pools 4-D features (``pool="avg"``: global average; ``"flatten"``), then runs its hidden
dense layers (activation, optional dropout) and a final dense layer with ``num_classes`` outputs.
Backends build it and size it from the cut model's output.

Example:
    >>> from tlcore import Head
    >>> Head.linear(num_classes=5).layers()
    [('pool', 'pool'), ('out', 'dense')]
    >>> [n for n, _ in Head.mlp(hidden=(64,), num_classes=5, dropout=0.1).layers()]
    ['pool', 'fc0', 'act0', 'drop0', 'out']
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import TlcoreError

ACTIVATIONS = ("relu", "gelu", "tanh", "silu")
POOLS = ("avg", "flatten")


class HeadError(TlcoreError, ValueError):
    """A head spec has an invalid value."""


@dataclass(frozen=True)
class Head:
    """A classification/regression head. Build it with :meth:`linear` or :meth:`mlp`."""

    num_classes: int
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    activation: str = "relu"
    pool: str = "avg"

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise HeadError(f"num_classes must be an int >= 1, got {self.num_classes!r}")
        if any(not isinstance(h, int) or h < 1 for h in self.hidden):
            raise HeadError(f"hidden sizes must be ints >= 1, got {self.hidden!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise HeadError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise HeadError(f"unknown activation {self.activation!r}; valid: {ACTIVATIONS}")
        if self.pool not in POOLS:
            raise HeadError(f"unknown pool {self.pool!r}; valid: {POOLS}")

    @classmethod
    def linear(cls, num_classes: int, *, pool: str = "avg") -> Head:
        """One dense layer from the (pooled) features to ``num_classes`` outputs."""
        return cls(num_classes=num_classes, pool=pool)

    @classmethod
    def mlp(cls, hidden: tuple[int, ...] | list[int] = (128,), *, num_classes: int, dropout: float = 0.0,
            activation: str = "relu", pool: str = "avg") -> Head:
        """Hidden dense layers with ``activation`` (and dropout), then the output layer."""
        return cls(num_classes=num_classes, hidden=tuple(hidden), dropout=float(dropout),
                   activation=activation, pool=pool)

    def layers(self) -> list[tuple[str, str]]:
        """``(name, kind)`` of each layer in order; kinds: pool, dense, activation, dropout.

        Every backend names the head's layers (and so its tensors) after this list.
        """
        out: list[tuple[str, str]] = [("pool", "pool")]
        for i, _ in enumerate(self.hidden):
            out += [(f"fc{i}", "dense"), (f"act{i}", "activation")]
            if self.dropout:
                out.append((f"drop{i}", "dropout"))
        return out + [("out", "dense")]

    def to_dict(self) -> dict:
        return {"num_classes": self.num_classes, "hidden": list(self.hidden), "dropout": self.dropout,
                "activation": self.activation, "pool": self.pool}

    @classmethod
    def from_dict(cls, d: dict) -> Head:
        return cls(num_classes=int(d["num_classes"]), hidden=tuple(d.get("hidden", ())),
                   dropout=float(d.get("dropout", 0.0)), activation=d.get("activation", "relu"),
                   pool=d.get("pool", "avg"))
