"""What every value on the wire rests on: the error type, functions as data, dtypes, limits.

Offers:
    ProtocolError                     a value cannot be sent, or a message cannot be read
    RemoteFunction(name, source)      a user function as it travels: source text, never code
    DEFAULT_MAX_BYTES / _DEPTH / _ELEMENTS   the decoder's default limits
    DTYPES, VIA_REAL, ALL_DTYPES, dtype_name, typed   dtype tables and a type check

protocol.py (encoding, envelope) and decoder.py (decoding) both build on this;
the public names are re-exported by protocol.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import GlassboxError

DEFAULT_MAX_BYTES = 2 * 1024**3
DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_ELEMENTS = 1_000_000


class ProtocolError(GlassboxError):
    """A value cannot be sent, or a received message is not one this side can read."""


@dataclass(frozen=True)
class RemoteFunction:
    """A user-defined function as sent over the wire: its name and its source.

        fn = RemoteFunction("double", "def double(x):\\n    return x * 2\\n")
        desc, blob = encode_values({"double": fn})
        assert decode_values(desc, blob)["double"] == fn
    """

    name: str
    source: str


# ---------------------------------------------------------------- dtypes

# Everything safetensors can hold, by the name safetensors and torch share.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
        "float16", "bfloat16", "float32", "float64", "complex64",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
}
# Complex dtypes safetensors lacks travel as their real view (last dim 2).
VIA_REAL = {torch.complex128: torch.float64, torch.complex32: torch.float16}
ALL_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def typed(value: Any, kind: type, path: str) -> Any:
    if type(value) is not kind:
        got = type(value).__name__
        raise ProtocolError(f"malformed value at {path}: expected {kind.__name__}, got {got}")
    return value
