"""What a ``keras.Model`` takes, and numpy batches (an array, a dict or a tuple of arrays, see
``tlcore.data.as_inputs``) turned into it.

A functional or Sequential model declares its inputs (``keras.Input(shape, dtype, name)``): a dict
feeds them by name, a tuple in the model's input order, one array a single input. Each array is
checked against its input (rank and known sizes) and cast to the input's dtype, so that token ids
given as int64 reach an ``int32`` input as integers. A subclassed model declares nothing: it gets
``x`` as it is (a dict, a tuple or an array as its first ``call`` argument, Keras' convention).

The compiled functions take these structures: :func:`signature` gives the nested ``TensorSpec``
(batch size free) and :func:`structure_key` a hashable key of the per-sample shapes and dtypes.

Example:
    >>> spec = ModelInputs.of(model)                                    # doctest: +SKIP
    >>> spec.names                                                      # doctest: +SKIP
    ('input_ids', 'attention_mask')
    >>> batch = spec.convert({"input_ids": ids, "attention_mask": mask})  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tlcore.data import Inputs
from tlcore.errors import DataError

from ._keras import Functional, keras, tf

#: the named input whose values a head built by tlcore uses to pool token features
MASK_INPUT = "attention_mask"


@dataclass(frozen=True)
class ModelInputs:
    """A graph model's declared inputs, in its input order.

    Attributes:
        names: the input names (the keys of a dict-structured model, else the ``keras.Input`` names).
        shapes: per-sample shapes (None where a size varies).
        dtypes: numpy dtypes the inputs take.
        as_dict: the model was built on a dict of inputs and is called with one.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int | None, ...], ...]
    dtypes: tuple[np.dtype, ...]
    as_dict: bool = False

    @classmethod
    def of(cls, model: keras.Model) -> ModelInputs | None:
        """The inputs of a built functional or Sequential ``model``; None for a model that declares
        none (subclassed, or a Sequential not built yet)."""
        try:
            flat = list(model.inputs)
            struct = model.input if isinstance(model, Functional) else flat
        except (AttributeError, ValueError):  # an unbuilt Sequential has no inputs yet
            return None
        if not flat:
            return None
        if isinstance(struct, dict):
            names = tuple(sorted(struct))  # Keras flattens a dict of inputs in key order
            flat = [struct[k] for k in names]
        else:
            names = tuple(t.name for t in flat)
        return cls(names, tuple(tuple(t.shape[1:]) for t in flat),
                   tuple(np.dtype(keras.backend.standardize_dtype(t.dtype)) for t in flat), isinstance(struct, dict))

    def describe(self) -> str:
        """``'name' (shape) dtype`` of each input, for error messages."""
        return ", ".join(f"{n!r} {s} {d}" for n, s, d in zip(self.names, self.shapes, self.dtypes))

    def arrays(self, x: Inputs, name: str = "x") -> list[np.ndarray]:
        """The arrays of ``x`` in input order, or a :class:`tlcore.DataError` naming what is wrong."""
        n = len(self.names)
        takes = (f"the model takes {n} input(s): {self.describe()}; give "
                 + ("one array" if n == 1 else "a dict by input name or a tuple in this order"))
        if isinstance(x, dict):
            missing = [k for k in self.names if k not in x]
            unknown = [k for k in x if k not in self.names]
            if len(self.names) == 1 and len(x) == 1 and not missing:
                return [x[self.names[0]]]
            if missing or unknown:
                what = ([f"is missing input(s) {missing}"] if missing else []) + \
                       ([f"has unknown key(s) {unknown}"] if unknown else [])
                raise DataError(f"{name} {' and '.join(what)}: {takes}")
            return [x[k] for k in self.names]
        if isinstance(x, tuple):
            if len(x) != n:
                raise DataError(f"{name} is a tuple of {len(x)} array(s): {takes}")
            return list(x)
        if n != 1:
            raise DataError(f"{name} is one array: {takes}")
        return [x]

    def check(self, x: Inputs, name: str = "x") -> list[np.ndarray]:
        """The arrays of ``x`` in input order, each checked against its input's per-sample shape."""
        arrays = self.arrays(x, name)
        for key, shape, a in zip(self.names, self.shapes, arrays):
            if a.ndim != len(shape) + 1 or any(e is not None and e != s for e, s in zip(shape, a.shape[1:])):
                where = f"{name}[{key!r}]" if len(self.names) > 1 or not isinstance(x, np.ndarray) else name
                raise DataError(f"{where} has per-sample shape {a.shape[1:]}; the input {key!r} takes "
                                f"{tuple(shape)} (None: any size)")
        return arrays

    def convert(self, x: Inputs, name: str = "x") -> Any:
        """``x`` as the model is called: one array, a list in input order, or a dict; each array
        checked (:meth:`check`) and cast to its input's dtype."""
        arrays = [a if a.dtype == dtype else a.astype(dtype) for a, dtype in zip(self.check(x, name), self.dtypes)]
        if self.as_dict:
            return dict(zip(self.names, arrays))
        return arrays[0] if len(arrays) == 1 else arrays


def signature(inputs: Any) -> Any:
    """The ``TensorSpec`` structure of ``inputs`` (arrays, lists, tuples, dicts), batch size free."""
    return tf.nest.map_structure(lambda a: tf.TensorSpec((None, *a.shape[1:]), tf.as_dtype(a.dtype)), inputs)


def structure_key(inputs: Any) -> tuple:
    """A hashable key of the structure, per-sample shapes and dtypes of ``inputs``."""
    if isinstance(inputs, dict):
        return ("dict", tuple((k, structure_key(inputs[k])) for k in sorted(inputs)))
    if isinstance(inputs, (list, tuple)):
        return (type(inputs).__name__, tuple(structure_key(v) for v in inputs))
    return (tuple(inputs.shape[1:]), np.dtype(inputs.dtype).str)


def mask_of(inputs: Any, spec: ModelInputs | None) -> Any:
    """The ``attention_mask`` input of a batch as the model is called (None when there is none)."""
    if isinstance(inputs, dict):
        return inputs.get(MASK_INPUT)
    if spec is not None and MASK_INPUT in spec.names and isinstance(inputs, (list, tuple)):
        return inputs[spec.names.index(MASK_INPUT)]
    return None
