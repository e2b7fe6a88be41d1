"""Rebuild values from their wire description: the decoding half of protocol.py.

Offers:
    Decoder(tensors, max_depth, max_elements, numpy_as_tensor)
        .value(node, path, depth)   one described value, checked against the limits;
                                    nothing is executed (functions come back as RemoteFunction)

protocol.decode_values is the entry point; this module holds its reader per value kind.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import torch

from ..cache import Cache, CacheEntry, Entry
from .wire import ALL_DTYPES, VIA_REAL, ProtocolError, RemoteFunction, dtype_name, typed


class Decoder:
    def __init__(self, tensors: dict, max_depth: int, max_elements: int, numpy_as_tensor: bool) -> None:
        self.tensors = tensors
        self.max_depth = max_depth
        self.budget = max_elements
        self.max_elements = max_elements
        self.numpy_as_tensor = numpy_as_tensor
        self.done: dict[str, Any] = {}

    def value(self, node: Any, path: str, depth: int) -> Any:
        if depth > self.max_depth:
            raise ProtocolError(f"{path} is nested deeper than the limit of {self.max_depth} levels")
        self.budget -= 1
        if self.budget < 0:
            raise ProtocolError(f"the message holds more than the limit of {self.max_elements:,} values")
        if not isinstance(node, dict) or not isinstance(node.get("t"), str):
            raise ProtocolError(f"malformed value description at {path}: {str(node)[:80]}")
        kind = node["t"]
        reader = getattr(self, f"read_{kind}", None)
        if reader is None:
            raise ProtocolError(
                f"unknown value kind {kind!r} at {path}: the sender speaks a newer protocol? "
                "Upgrade this side with `pip install -U glassbox`"
            )
        try:
            return reader(node, path, depth)
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
            raise ProtocolError(f"malformed {kind} value at {path}: {err}") from None

    def read_none(self, node: dict, path: str, depth: int) -> None:
        return None

    def read_bool(self, node: dict, path: str, depth: int) -> bool:
        return typed(node["v"], bool, path)

    def read_int(self, node: dict, path: str, depth: int) -> int:
        v = node["v"]
        if type(v) is not int:
            raise ProtocolError(f"malformed int value at {path}")
        return v

    def read_float(self, node: dict, path: str, depth: int) -> float:
        v = node["v"]
        if isinstance(v, str) and v in ("nan", "inf", "-inf"):
            return float(v)
        if type(v) not in (int, float):
            raise ProtocolError(f"malformed float value at {path}")
        return float(v)

    def read_str(self, node: dict, path: str, depth: int) -> str:
        return typed(node["v"], str, path)

    def read_bytes(self, node: dict, path: str, depth: int) -> bytes:
        try:
            return base64.b64decode(typed(node["v"], str, path), validate=True)
        except binascii.Error:
            raise ProtocolError(f"malformed base64 bytes at {path}") from None

    def read_list(self, node: dict, path: str, depth: int) -> list:
        items = typed(node["v"], list, path)
        return [self.value(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(items)]

    def read_tuple(self, node: dict, path: str, depth: int) -> tuple:
        return tuple(self.read_list(node, path, depth))

    def read_dict(self, node: dict, path: str, depth: int) -> dict:
        items = typed(node["v"], dict, path)
        return {str(k): self.value(v, f"{path}[{k!r}]", depth + 1) for k, v in items.items()}

    def read_map(self, node: dict, path: str, depth: int) -> dict:
        pairs = typed(node["v"], list, path)
        out = {}
        for i, pair in enumerate(pairs):
            if type(pair) is not list or len(pair) != 2:
                raise ProtocolError(f"malformed map entry {i} at {path}")
            key = _hashable(self.value(pair[0], f"{path} key {i}", depth + 1), path)
            out[key] = self.value(pair[1], f"{path}[{key!r}]", depth + 1)
        return out

    def read_set(self, node: dict, path: str, depth: int) -> set:
        return {_hashable(v, path) for v in self.read_list(node, path, depth)}

    def read_frozenset(self, node: dict, path: str, depth: int) -> frozenset:
        return frozenset(self.read_set(node, path, depth))

    def read_model_output(self, node: dict, path: str, depth: int) -> Any:
        fields = self.read_dict(node, path, depth)
        cls = _resolve_model_output(typed(node["cls"], str, path))
        return fields if cls is None else cls(**fields)

    def read_cache(self, node: dict, path: str, depth: int) -> Cache:
        cache = Cache()
        for key, visits in typed(node["v"], dict, path).items():
            entry = cache[str(key)] = CacheEntry(str(key))
            for i, visit in enumerate(typed(visits, list, path)):
                if type(visit) is not list or len(visit) != 2:
                    raise ProtocolError(f"malformed cache visit {i} of {key!r} at {path}")
                output = self.value(visit[0], f"{path}[{key!r}].output", depth + 2)
                inputs = self.value(visit[1], f"{path}[{key!r}].inputs", depth + 2)
                entry.append(Entry(output, inputs))
        return cache

    def read_slice(self, node: dict, path: str, depth: int) -> slice:
        parts = typed(node["v"], list, path)
        if len(parts) != 3:
            raise ProtocolError(f"malformed slice at {path}")
        start, stop, step = (self.value(p, f"{path}.{n}", depth + 1)
                             for p, n in zip(parts, ("start", "stop", "step")))
        return slice(start, stop, step)

    def read_dtype(self, node: dict, path: str, depth: int) -> torch.dtype:
        name = typed(node["v"], str, path)
        if name not in ALL_DTYPES:
            raise ProtocolError(f"unknown torch dtype {name!r} at {path}: is torch older on this side?")
        return ALL_DTYPES[name]

    def read_size(self, node: dict, path: str, depth: int) -> torch.Size:
        dims = typed(node["v"], list, path)
        if not all(type(d) is int for d in dims):
            raise ProtocolError(f"malformed torch.Size at {path}")
        return torch.Size(dims)

    def read_device(self, node: dict, path: str, depth: int) -> torch.device:
        return torch.device(typed(node["v"], str, path))

    def read_function(self, node: dict, path: str, depth: int) -> RemoteFunction:
        name = typed(node["name"], str, path)
        if not name.isidentifier():
            raise ProtocolError(f"malformed function name {name!r} at {path}")
        return RemoteFunction(name, typed(node["source"], str, path))

    def read_tensor(self, node: dict, path: str, depth: int) -> Any:
        key = typed(node["key"], str, path)
        if key in self.done:
            return self.done[key]
        if key not in self.tensors:
            raise ProtocolError(f"{path} refers to tensor {key!r}, which is missing from the tensor blob")
        tensor = self.tensors[key]
        described = typed(node["dtype"], str, path)
        shape = typed(node["shape"], list, path)
        if node.get("complex"):
            if described not in ALL_DTYPES or ALL_DTYPES[described] not in VIA_REAL:
                raise ProtocolError(f"malformed complex tensor at {path}")
            expected = VIA_REAL[ALL_DTYPES[described]]
            if tensor.dtype != expected or list(tensor.shape) != [*shape, 2]:
                raise ProtocolError(f"tensor {key!r} at {path} does not match its description")
            tensor = torch.view_as_complex(tensor.contiguous())
        elif dtype_name(tensor.dtype) != described or list(tensor.shape) != shape:
            raise ProtocolError(
                f"tensor {key!r} at {path} is {tensor.dtype} {list(tensor.shape)} in the blob but "
                f"described as {described} {shape}"
            )
        value: Any = tensor
        if "grad" in node:
            grad = self.value(node["grad"], f"{path}.grad", depth + 1)
            if not isinstance(grad, torch.Tensor) or grad.shape != tensor.shape or grad.dtype != tensor.dtype:
                raise ProtocolError(f"malformed gradient at {path}: it does not match its tensor")
            tensor.grad = grad
        if node.get("numpy") and not self.numpy_as_tensor:
            value = tensor.numpy()
            if node.get("scalar"):
                value = value[()]
        self.done[key] = value
        return value


def _hashable(value: Any, path: str) -> Any:
    try:
        hash(value)
    except TypeError:
        kind = type(value).__name__
        raise ProtocolError(f"malformed value at {path}: a {kind} cannot be a key or set item") from None
    return value


def _resolve_model_output(qualname: str) -> type | None:
    """The transformers ModelOutput class named ``qualname``, or None (then a dict is returned).
    Only transformers classes derived from ModelOutput are ever looked up."""
    module_name, _, name = qualname.rpartition(".")
    if not module_name.startswith("transformers.") or not name.isidentifier():
        return None
    try:
        import importlib

        from transformers.utils import ModelOutput

        cls = getattr(importlib.import_module(module_name), name, None)
    except Exception:  # transformers missing or a different version: fall back to a dict
        return None
    if isinstance(cls, type) and issubclass(cls, ModelOutput):
        return cls
    return None
