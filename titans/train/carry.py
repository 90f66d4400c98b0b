"""A model's streaming state as flat tensors and a JSON skeleton, so that the state a run carries
from one step to the next (TrainConfig.carry_state: TBPTT, State Passing) is saved in a checkpoint
without pickling, and read back exactly.

A state is any nesting of dataclasses (from the titans package), dicts with string keys, lists,
tuples, tensors, numbers, strings and None: `ModelState` and the per-layer states it holds. Every
tensor becomes one safetensors entry named by its path ("layers.blocks.0.memory.weights.0"); the
skeleton records the structure, the dataclass names and the plain values. Reading rebuilds only
dataclasses defined in the titans package.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from torch import Tensor

__all__ = ["flatten_state", "unflatten_state"]


def flatten_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """(skeleton, tensors): a JSON-able description of `state` and its tensors by path (each a
    contiguous copy, so that tensors sharing storage are saved apart)."""
    tensors: dict[str, Tensor] = {}
    join = lambda path, name: f"{path}.{name}" if path else str(name)

    def walk(o: Any, path: str) -> Any:
        if isinstance(o, Tensor):
            tensors[path] = o.detach().contiguous().clone()
            return {"tensor": path}
        if o is None or isinstance(o, (bool, int, float, str)):
            return {"value": o}
        if isinstance(o, (list, tuple)):
            return {"list": [walk(x, join(path, i)) for i, x in enumerate(o)], "tuple": isinstance(o, tuple)}
        if isinstance(o, dict):
            if not all(isinstance(k, str) for k in o):
                raise TypeError(f"state dict at {path or 'the top'} has keys that are not strings")
            return {"dict": {k: walk(v, join(path, k)) for k, v in o.items()}}
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            cls = type(o)
            return {"class": f"{cls.__module__}:{cls.__qualname__}",
                    "fields": {f.name: walk(getattr(o, f.name), join(path, f.name)) for f in dataclasses.fields(o)}}
        raise TypeError(f"cannot save a {type(o).__name__} at {path or 'the top'} of a carried state")

    return walk(state, prefix), tensors


def _state_class(name: str) -> type:
    module, _, qualname = name.partition(":")
    if module != "titans" and not module.startswith("titans."):
        raise ValueError(f"carried state names a class outside the titans package: {name!r}")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"carried state names {name!r}, which is not a dataclass")
    return cls


def unflatten_state(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """The state `flatten_state` described, rebuilt from its skeleton and tensors."""
    def build(s: Any) -> Any:
        if "tensor" in s:
            return tensors[s["tensor"]]
        if "value" in s:
            return s["value"]
        if "list" in s:
            items = [build(x) for x in s["list"]]
            return tuple(items) if s.get("tuple") else items
        if "dict" in s:
            return {k: build(v) for k, v in s["dict"].items()}
        return _state_class(s["class"])(**{k: build(v) for k, v in s["fields"].items()})

    return build(skeleton)
