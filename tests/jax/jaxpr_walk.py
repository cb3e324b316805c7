"""Walking a jaxpr with the jaxprs nested in it (jit, custom_jvp, scan...), for the JAX tests."""
from __future__ import annotations

from collections.abc import Iterator


def equations(jaxpr) -> Iterator:
    """Every equation of ``jaxpr`` and of the jaxprs in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def conv_count(jaxpr) -> int:
    """Convolutions in a jaxpr, nested jaxprs included."""
    return sum(eqn.primitive.name == "conv_general_dilated" for eqn in equations(jaxpr))
