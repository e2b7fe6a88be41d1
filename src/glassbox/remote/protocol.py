"""The wire format between a glassbox client and server: versioned, data only.

Offers:
    PROTOCOL_VERSION                  bumped on any incompatible change
    ProtocolError                     a value cannot be sent, or a message cannot be read
    RemoteFunction(name, source)      a user function as it travels: source text, never code
    encode_values(values)             {name: value} -> (JSON-able description, safetensors blob)
    decode_values(desc, blob)         the inverse, with size / depth / element limits
    make_envelope(kind, payload)      add the protocol header to a message
    check_envelope(env, kind=None)    check the header; say which side to upgrade on mismatch
(the job request and result built from these, and a job's statuses: job.py)

A message is JSON plus at most one safetensors blob, so reading one can never
run code: there is no pickle and no ``torch.load`` anywhere on this path.
Values are described by tagged JSON nodes::

    {"t": "none"} {"t": "bool", "v": true} {"t": "int", "v": 3} {"t": "float", "v": 0.5 | "nan" | "inf"}
    {"t": "str", "v": "..."} {"t": "bytes", "v": "<base64>"}
    {"t": "list" | "tuple" | "set" | "frozenset", "v": [node, ...]} {"t": "dict", "v": {"key": node, ...}}
    {"t": "map", "v": [[key node, value node], ...]}   a dict with any non-str key (int, tuple, ...)
    {"t": "slice", "v": [node, node, node]} {"t": "dtype", "v": "float32"} {"t": "size", "v": [2, 3]}
    {"t": "device", "v": "cuda:0"} {"t": "function", "name": "f", "source": "def f(x): ..."}
    {"t": "tensor", "key": "t0", "dtype": "bfloat16", "shape": [2, 3]}   (+ "numpy", "complex", "scalar",
                                                                   "grad": node: its .grad, when it has one)
    {"t": "model_output", "cls": "transformers....CausalLMOutputWithPast", "v": {"key": node, ...}}
    {"t": "cache", "v": {"model.layers.0": [[output node, inputs node], ...], ...}}   a tracer.cache()

Tensors travel in the blob under their ``key``; a tensor object that occurs
twice is sent once and decodes to one object again; a tensor's ``.grad`` (say
after ``h.retain_grad()`` and ``loss.backward()``) travels with it. "map",
"set", "frozenset", "cache" and "grad" came after protocol 1's first release: an older
peer refuses them with "unknown value kind" (or, for "grad", drops it), so no
bump was needed for the values both sides could already send. Functions are decoded as
``RemoteFunction`` (the server compiles them under restriction, if at all).
"""

from __future__ import annotations

import ast
import base64
import inspect
import math
import textwrap
from typing import Any

import torch

from ..cache import Cache
from ..version import __version__
from .decoder import Decoder
from .wire import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ELEMENTS,
    DTYPES,
    VIA_REAL,
    ProtocolError,
    RemoteFunction,
    dtype_name,
)

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_MAX_DEPTH", "DEFAULT_MAX_ELEMENTS", "PROTOCOL_VERSION", "ProtocolError",
    "RemoteFunction", "check_envelope", "decode_values", "encode_values", "make_envelope",
]
PROTOCOL_VERSION = 1

_HEADER = ("protocol", "glassbox", "kind")
_SUPPORTED = (
    "tensors (with their .grad), numpy arrays, None, bool, int, float, str, bytes, lists, tuples, "
    "sets, dicts (keys of these types), slices, torch dtypes / sizes / devices and plain functions"
)


def _version() -> str:
    return __version__


# ---------------------------------------------------------------- encoding


def encode_values(values: dict[str, Any], *, max_depth: int = DEFAULT_MAX_DEPTH) -> tuple[dict, bytes]:
    """Describe ``values`` as JSON plus one safetensors blob holding every tensor.

        desc, blob = encode_values({"x": torch.ones(2, 3), "k": 5})
        assert decode_values(desc, blob)["k"] == 5
    """
    if not isinstance(values, dict):
        raise ProtocolError(f"encode_values takes a dict of name -> value, got {type(values).__name__}")
    encoder = _Encoder(max_depth)
    nodes = {}
    for name, value in values.items():
        if not isinstance(name, str):
            raise ProtocolError(f"value names must be str, got {name!r} ({type(name).__name__})")
        nodes[name] = encoder.node(value, name, 0)
    import safetensors.torch

    blob = safetensors.torch.save(encoder.tensors) if encoder.tensors else b""
    return {"values": nodes}, blob


class _Encoder:
    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.tensors: dict[str, torch.Tensor] = {}
        self.keys: dict[int, dict] = {}  # id(tensor) -> its node, so an object is sent once
        self.alive: list[Any] = []  # keeps encoded objects alive so their ids stay unique
        self.storages: set[int] = set()
        self.open: set[int] = set()  # containers being encoded: a second visit is a cycle

    def node(self, value: Any, path: str, depth: int) -> dict:
        if depth > self.max_depth:
            raise ProtocolError(
                f"cannot send {path}: nested deeper than {self.max_depth} levels; flatten it first"
            )
        if value is None:
            return {"t": "none"}
        if _is_numpy(value):
            return self.numpy(value, path)
        if isinstance(value, bool):
            return {"t": "bool", "v": bool(value)}
        if isinstance(value, int):
            return {"t": "int", "v": int(value)}
        if isinstance(value, float):
            return {"t": "float", "v": _float_out(float(value))}
        if isinstance(value, str):
            return {"t": "str", "v": str(value)}
        if isinstance(value, (bytes, bytearray)):
            return {"t": "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, torch.Tensor):
            return self.tensor(value, path)
        if isinstance(value, torch.dtype):
            return {"t": "dtype", "v": dtype_name(value)}
        if isinstance(value, torch.Size):
            return {"t": "size", "v": [int(n) for n in value]}
        if isinstance(value, torch.device):
            return {"t": "device", "v": str(value)}
        if isinstance(value, slice):
            parts = (value.start, value.stop, value.step)
            return {"t": "slice", "v": [self.node(p, f"{path}.{n}", depth + 1)
                                        for p, n in zip(parts, ("start", "stop", "step"))]}
        if isinstance(value, RemoteFunction):
            return {"t": "function", "name": value.name, "source": value.source}
        if isinstance(value, Cache):  # before dict: it keeps its type and visits
            return {"t": "cache", "v": {
                key: [[self.node(e.output, f"{path}[{key!r}].output", depth + 2),
                       self.node(e.inputs, f"{path}[{key!r}].inputs", depth + 2)] for e in entry]
                for key, entry in value.items()
            }}
        if isinstance(value, (list, tuple, dict, set, frozenset)):
            return self.container(value, path, depth)
        if inspect.isfunction(value):
            return _function_node(value, path)
        raise ProtocolError(_unsupported(value, path))

    def container(self, value: Any, path: str, depth: int) -> dict:
        if id(value) in self.open:
            raise ProtocolError(f"cannot send {path}: it contains itself")
        self.open.add(id(value))
        try:
            if isinstance(value, dict):
                cls = _model_output_class(value)
                if cls is None and not all(type(key) is str for key in value):
                    # keys keep their type: clean_cache[layer], results[(layer, pos)]
                    return {"t": "map", "v": [
                        [self.node(key, f"{path} key {key!r}", depth + 1),
                         self.node(item, f"{path}[{key!r}]", depth + 1)] for key, item in value.items()
                    ]}
                items = {key: self.node(item, f"{path}[{key!r}]", depth + 1) for key, item in value.items()}
                if cls is not None:
                    return {"t": "model_output", "cls": cls, "v": items}
                return {"t": "dict", "v": items}
            if isinstance(value, (set, frozenset)):
                kind = "set" if isinstance(value, set) else "frozenset"
                return {"t": kind, "v": [self.node(v, f"{path} item", depth + 1) for v in value]}
            kind = "tuple" if isinstance(value, tuple) else "list"
            return {"t": kind, "v": [self.node(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]}
        finally:
            self.open.discard(id(value))

    def tensor(self, value: torch.Tensor, path: str, **marks: bool) -> dict:
        known = self.keys.get(id(value))
        if known is not None:
            return known
        if value.layout != torch.strided:
            raise ProtocolError(f"cannot send {path}: {value.layout} tensors cannot be sent; use .to_dense()")
        if value.is_quantized:
            raise ProtocolError(f"cannot send {path}: quantized tensors cannot be sent; call .dequantize()")
        if value.device.type == "meta":
            raise ProtocolError(f"cannot send {path}: it is a meta tensor and holds no data")
        data = value.detach().resolve_conj().resolve_neg()
        node: dict[str, Any] = {"t": "tensor", "dtype": dtype_name(value.dtype), "shape": list(value.shape)}
        if value.dtype in VIA_REAL:
            data = torch.view_as_real(data)
            node["complex"] = True
        elif dtype_name(value.dtype) not in DTYPES:
            raise ProtocolError(
                f"cannot send {path}: dtype {value.dtype} is not supported on the wire; "
                f"convert it with .to(torch.float32) (supported: {', '.join(DTYPES)})"
            )
        data = data.to("cpu").contiguous()
        # safetensors refuses two entries that share memory: copy the later one.
        if data.numel():
            ptr = data.untyped_storage().data_ptr()
            if ptr in self.storages:
                data = data.clone()
                ptr = data.untyped_storage().data_ptr()
            self.storages.add(ptr)
        key = f"t{len(self.tensors)}"
        self.tensors[key] = data
        node["key"] = key
        node.update({mark: True for mark, on in marks.items() if on})
        self.keys[id(value)] = node
        self.alive.append(value)
        # .grad of a non-leaf that does not retain it is always None (and reading it warns)
        grad = value.grad if not marks and (value.is_leaf or value.retains_grad) else None
        if grad is not None:
            node["grad"] = self.tensor(grad, f"{path}.grad")
        return node

    def numpy(self, value: Any, path: str) -> dict:
        import numpy as np

        scalar = isinstance(value, np.generic)
        array = np.asarray(value)
        try:
            tensor = torch.from_numpy(array if array.flags.c_contiguous else array.copy(order="C"))
        except TypeError:
            raise ProtocolError(
                f"cannot send {path}: numpy dtype {array.dtype} has no torch equivalent; "
                "convert it to a number type or to a list"
            ) from None
        return self.tensor(tensor, path, numpy=True, scalar=scalar)


def _is_numpy(value: Any) -> bool:
    module = type(value).__module__
    if module != "numpy" and not module.startswith("numpy."):
        return False
    import numpy as np

    return isinstance(value, (np.ndarray, np.generic))


def _float_out(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _model_output_class(value: Any) -> str | None:
    """The qualified name of a transformers ModelOutput, which must come back as one."""
    cls = type(value)
    if not cls.__module__.startswith("transformers."):
        return None
    if not any(base.__name__ == "ModelOutput" for base in cls.__mro__):
        return None
    return f"{cls.__module__}.{cls.__qualname__}"


def _function_node(fn: Any, path: str) -> dict:
    name = fn.__name__
    if name == "<lambda>":
        raise ProtocolError(
            f"cannot send {path}: it is a lambda; define it with `def` (at top level, without "
            "closures) so its source can be sent"
        )
    if fn.__code__.co_freevars:
        raise ProtocolError(
            f"cannot send {path}: function {name}() uses variables of an enclosing function "
            f"({', '.join(fn.__code__.co_freevars)}); define it at top level and pass them as arguments"
        )
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        raise ProtocolError(
            f"cannot send {path}: the source of function {name}() cannot be found (was it defined in "
            "`python -c` or an exec'd string?); define it in a file or a notebook cell"
        ) from None
    try:
        tree = ast.parse(source)
    except SyntaxError:
        tree = None
    if tree is None or not (
        len(tree.body) == 1 and isinstance(tree.body[0], ast.FunctionDef) and tree.body[0].name == name
    ):
        raise ProtocolError(
            f"cannot send {path}: the source found for function {name}() is not a plain `def {name}(...)` "
            "block; define it with def at top level"
        )
    return {"t": "function", "name": name, "source": source}


def _unsupported(value: Any, path: str) -> str:
    kind = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
    if isinstance(value, torch.nn.Module) or type(value).__name__ in ("Envoy", "NNsight", "LanguageModel"):
        hint = "the model lives on the server; use it inside the trace instead of sending it"
    elif inspect.ismodule(value):
        hint = "modules cannot be sent; import it inside the trace (torch, math and einops are available)"
    elif callable(value):
        hint = "only plain functions defined with def can be sent; compute the value inside the trace"
    else:
        hint = "convert it to a tensor or a list"
    return f"cannot send {path} ({kind}): {hint}. Supported: {_SUPPORTED}."


# ---------------------------------------------------------------- decoding


def decode_values(
    desc: dict,
    blob: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    numpy_as_tensor: bool = False,
) -> dict[str, Any]:
    """Rebuild the values that ``encode_values`` described. Nothing is executed:
    functions come back as ``RemoteFunction``. Arrays sent from numpy come back
    as numpy arrays unless ``numpy_as_tensor`` (what a server that runs torch code wants).

        desc, blob = encode_values({"h": torch.zeros(2, dtype=torch.bfloat16)})
        assert decode_values(desc, blob)["h"].dtype == torch.bfloat16
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"the tensor blob must be bytes, got {type(blob).__name__}")
    if len(blob) > max_bytes:
        raise ProtocolError(
            f"the tensor data is {len(blob):,} bytes, over this side's limit of {max_bytes:,}; "
            "send smaller tensors (or save fewer values)"
        )
    if not isinstance(desc, dict) or not isinstance(desc.get("values"), dict):
        raise ProtocolError("malformed value description: expected an object with a 'values' object")
    tensors: dict[str, torch.Tensor] = {}
    if len(blob):
        # safetensors' own parser: a header and raw buffers, nothing that can run code
        from safetensors.torch import load as load_safetensors

        try:
            tensors = load_safetensors(bytes(blob))
        except Exception as err:  # safetensors raises its own (Rust) error types
            raise ProtocolError(f"the tensor blob is not valid safetensors data: {err}") from None
    decoder = Decoder(tensors, max_depth, max_elements, numpy_as_tensor)
    return {str(name): decoder.value(node, str(name), 0) for name, node in desc["values"].items()}


# ---------------------------------------------------------------- envelope


def make_envelope(kind: str, payload: dict) -> dict:
    """Wrap ``payload`` in the protocol header.

        env = make_envelope("request", {"source": "..."})
        assert check_envelope(env, "request") == {"source": "..."}
    """
    if not isinstance(kind, str) or not kind:
        raise ProtocolError(f"message kind must be a non-empty str, got {kind!r}")
    clash = [key for key in _HEADER if key in payload]
    if clash:
        raise ProtocolError(f"payload keys {clash} are reserved for the protocol header")
    return {"protocol": PROTOCOL_VERSION, "glassbox": _version(), "kind": kind, **payload}


def check_envelope(env: dict, kind: str | None = None, *, receiver: str = "client") -> dict:
    """Check the header of a received message and return its payload.

    ``receiver`` is the side reading the message ("client" or "server"): the
    error for a version mismatch says which side to upgrade, and how.
    """
    if receiver not in ("client", "server"):
        raise ValueError(f"receiver must be 'client' or 'server', got {receiver!r}")
    if not isinstance(env, dict):
        raise ProtocolError(f"expected a glassbox message (a JSON object), got {type(env).__name__}")
    if "protocol" not in env:
        raise ProtocolError(
            "this is not a glassbox message (it has no 'protocol' field); check that the URL "
            "points at a glassbox server"
        )
    theirs = env["protocol"]
    their_version = env.get("glassbox", "unknown")
    if type(theirs) is not int:
        raise ProtocolError(f"malformed glassbox message: 'protocol' is {theirs!r}")
    if theirs != PROTOCOL_VERSION:
        raise ProtocolError(_mismatch(theirs, str(their_version), receiver))
    got = env.get("kind")
    if not isinstance(got, str):
        raise ProtocolError("malformed glassbox message: no 'kind' field")
    if kind is not None and got != kind:
        raise ProtocolError(f"expected a {kind!r} message, got {got!r}")
    return {key: value for key, value in env.items() if key not in _HEADER}


def _mismatch(theirs: int, their_version: str, receiver: str) -> str:
    other = "server" if receiver == "client" else "client"
    head = (
        f"protocol mismatch: the {other} speaks glassbox protocol {theirs} (glassbox {their_version}), "
        f"this {receiver} speaks protocol {PROTOCOL_VERSION} (glassbox {_version()}). "
    )
    client_newer = (theirs > PROTOCOL_VERSION) == (receiver == "server")
    if client_newer:
        return head + (
            "The server is older: upgrade the server (`pip install -U glassbox` where it runs, then "
            f"restart it), or install a client that matches it (`pip install glassbox=={their_version}`)"
            if receiver == "client" else
            "The server is older: upgrade the server (`pip install -U glassbox`, then restart it), or "
            f"use a client that matches it (`pip install glassbox=={_version()}`)"
        )
    return head + "The client is older: upgrade the client with `pip install -U glassbox`"
