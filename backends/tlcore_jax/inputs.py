"""Model inputs on the JAX side: a batch is one array, a dict of named arrays (keyword inputs, e.g.
``input_ids`` and ``attention_mask``) or a tuple of arrays (positional inputs), see
``tlcore.data.as_inputs``. Here: calling a module with them, their device dtypes (int64 token ids as
int32 when JAX runs without x64, as labels), abstract batches for ``jax.eval_shape``, the compute
dtype of mixed precision, and a named error when they do not fit the module's ``__call__``.

Example:
    >>> batch = {"input_ids": np.zeros((2, 6), np.int64), "attention_mask": np.ones((2, 6), np.int64)}
    >>> to_device(batch)["input_ids"].dtype
    dtype('int32')
    >>> call_args(batch)[0], sorted(call_args(batch)[1])
    ((), ['attention_mask', 'input_ids'])
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlcore.data import Inputs
from tlcore.errors import DataError

from .cut import entry_layer

_INT32 = np.iinfo(np.int32)


def call_args(x: Inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call a module with: keyword arrays for a dict, positional ones for a
    tuple, one positional array otherwise."""
    if isinstance(x, dict):
        return (), x
    if isinstance(x, tuple):
        return x, {}
    return (x,), {}


def call(fn: Callable, x: Inputs) -> Any:
    """``fn`` called with the batch ``x`` (see :func:`call_args`)."""
    args, kwargs = call_args(x)
    return fn(*args, **kwargs)


def attention_mask(x: Inputs) -> Any:
    """The ``attention_mask`` of a dict batch, else None."""
    return x.get("attention_mask") if isinstance(x, dict) else None


def _device_array(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype != np.int64 or jax.config.jax_enable_x64:
        return a
    if a.size and (a.min() < _INT32.min or a.max() > _INT32.max):
        raise DataError(f"{name} holds integers beyond int32 ([{a.min()}, {a.max()}]), which JAX uses without "
                        "jax_enable_x64; give values in int32's range (token ids, indices) or enable x64")
    return a.astype(np.int32)


def to_device(x: Inputs) -> Inputs:
    """``x`` with JAX's dtypes: int64 arrays as int32 unless x64 is enabled (a DataError for values
    beyond int32); float32 and bool as they are. Numpy in, numpy out (no copy when nothing changes)."""
    if isinstance(x, dict):
        return {k: _device_array(v, f"x[{k!r}]") for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_device_array(v, f"x[{i}]") for i, v in enumerate(x))
    return _device_array(x, "x")


def abstract(x: Inputs, batch: int = 1) -> Any:
    """``x`` as ``jax.ShapeDtypeStruct``s of ``batch`` samples (for ``jax.eval_shape``)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype), to_device(x))


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Every floating-point array of ``tree`` in ``dtype`` (integers, booleans and RNG keys as they are)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _structure(x: Inputs) -> tuple:
    if isinstance(x, dict):
        return ("dict", tuple(x))
    return ("tuple", len(x)) if isinstance(x, tuple) else ("array", 1)


@functools.lru_cache(maxsize=256)
def _misfit(owner: Any, structure: tuple) -> str:
    """Why inputs of ``structure`` cannot be passed to ``owner`` (a module class or a function);
    '' when they can, or when its signature cannot be read."""
    is_class = isinstance(owner, type)
    try:
        sig = inspect.signature(owner.__call__ if is_class else owner)
    except (TypeError, ValueError):
        return ""
    kind, what = structure
    args = (None,) * (what if kind == "tuple" else 1 if kind == "array" else 0)
    kwargs = dict.fromkeys(what) if kind == "dict" else {}
    try:
        sig.bind(*((None,) if is_class else ()), *args, **kwargs)
    except TypeError as e:
        params = [p.replace(annotation=inspect.Parameter.empty)
                  for p in list(sig.parameters.values())[1 if is_class else 0:]]
        name = f"{owner.__qualname__ if is_class else getattr(owner, '__name__', repr(owner))}"
        given = (f"the keyword inputs {list(what)}" if kind == "dict" else f"{what} positional input(s)"
                 if kind == "tuple" else "one positional input")
        return (f"the inputs do not fit {name}.__call__({', '.join(map(str, params))}): {e}. x gave {given}; give "
                "x as a dict of its keyword inputs by name, a tuple of its positional inputs, or one array")
    return ""


def check_call(module: nnx.Module, x: Inputs) -> None:
    """Raise a :class:`tlcore.DataError` naming what is wrong when the batch ``x`` cannot be passed
    to ``module`` (a missing or unexpected argument), before anything is traced."""
    entry = entry_layer(module)
    owner = type(entry) if isinstance(entry, nnx.Module) else entry
    if not isinstance(owner, Hashable):  # an unhashable callable object: not checked
        return
    problem = _misfit(owner, _structure(x))
    if problem:
        raise DataError(problem)
