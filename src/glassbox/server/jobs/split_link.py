"""The link between a body process and the host of a shared pass: one socket, one message grammar.

Offers:
    Link(sock) / Link.from_fd(fd)
                        ``.send(message, value=NOTHING)`` / ``.receive() -> (message, value)``;
                        ``.close()``. A value travels as ``remote.protocol`` encodes it (JSON and
                        safetensors: nothing on this path can run code when it is read)
    LinkClosed          the other side is gone (or sent something that is not a frame)
    NOTHING             a message without a value

The grammar (split execution: ``split_host.py`` and ``split_body.py``)::

    body ──► host   {"op": "get", "path": "transformer.h.0", "kind": "output"|"input", "fresh": bool}
                    {"op": "done"}                   the body's block ended
                    {"op": "leave", "why": "..."}   the body runs alone (it asked for what a shared
                                                    pass cannot give a body)
                    any of them with "edit": true     + the value it was last given, edited in place
                             or with "replace": true  + the value it assigned there (``.output = x``)
    host ──► body   {"op": "value"} + the value       this body's own rows at the site it asked for
                    {"op": "error", "type": "OutOfOrderError", "message": "..."}
                                                    the request failed (the body runs alone, to
                                                    meet the error exactly as it does alone)
                    {"op": "alone", "why": "..."}   this body cannot go on in the shared pass
                    {"op": "verdict", "ok": bool}   after "done": whether the pass stood (False:
                                                    every body of it runs again alone)

The host reads what a body sends as untrusted: frames are capped (``MAX_FRAME``), values are
decoded with the protocol's limits, and anything else ends that body's part in the pass.

A lone dense tensor (a module's output, most often) travels as its raw bytes with its dtype and
shape in the JSON part (``"tensor": [dtype, shape]``), checked on arrival (a dtype of the
protocol's list, bytes exactly as many as the shape holds): measured one way on a (1, 7, 576)
float32 tensor, 100 us through ``encode_values`` (safetensors) against ~20 us raw.
"""

from __future__ import annotations

import math
import socket
import struct
from typing import Any

import torch

from ...remote.framing import frame, unframe
from ...remote.protocol import ProtocolError, decode_values, encode_values
from ...remote.wire import DTYPES, dtype_name

__all__ = ["MAX_FRAME", "NOTHING", "Link", "LinkClosed"]

_HEADER = struct.Struct("<Q")
MAX_FRAME = 1 << 32  # a value larger than any activation a served model makes: a broken body
NOTHING: Any = object()


class LinkClosed(Exception):
    """The other side of a link is gone, or spoke outside the grammar."""


class Link:
    """One end of a socket pair between a body process and its host.

        link = Link(socket.socket(fileno=fd))
        link.send({"op": "get", "path": "", "kind": "output", "fresh": False})
        message, value = link.receive()
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def from_fd(cls, fd: int) -> Link:
        """The link over the socket whose descriptor this process was handed."""
        return cls(socket.socket(fileno=fd))

    def send(self, message: dict, value: Any = NOTHING) -> int:
        """Send ``message`` (with ``value`` encoded, if given); the bytes sent. ProtocolError if it
        cannot travel."""
        blob = b""
        if type(value) is torch.Tensor and value.layout == torch.strided and value.device.type == "cpu" \
                and not value.requires_grad and dtype_name(value.dtype) in DTYPES:
            dense = value.contiguous()
            blob = dense.view(-1).view(torch.uint8).numpy().tobytes() if dense.numel() else b""
            message = {**message, "tensor": [dtype_name(dense.dtype), list(dense.shape)]}
        elif value is not NOTHING:
            desc, blob = encode_values({"v": value})
            message = {**message, "desc": desc}
        data = frame(message, blob)
        try:
            self.sock.sendall(_HEADER.pack(len(data)) + data)
        except OSError as err:
            raise LinkClosed(f"the other side is gone ({err.strerror})") from None
        return len(data)

    def receive(self, limit: int = MAX_FRAME) -> tuple[dict, Any]:
        """The next message and its value (``NOTHING`` if none); LinkClosed at end of stream, or for
        a frame over ``limit`` bytes (read no further: the host caps what a body may send back)."""
        (size,) = _HEADER.unpack(self._exactly(_HEADER.size))
        limit = min(limit, MAX_FRAME)
        if size > limit:
            raise LinkClosed(f"a frame of {size:,} bytes is over the link's limit of {limit:,}")
        try:
            message, blob = unframe(self._exactly(size))
            value = NOTHING
            if "tensor" in message:
                value = _raw_tensor(message.pop("tensor"), blob)
            elif "desc" in message:
                value = decode_values(message.pop("desc"), blob, max_bytes=MAX_FRAME)["v"]
        except (ProtocolError, KeyError, TypeError, ValueError) as err:
            raise LinkClosed(f"not a message of the grammar: {err}") from None
        if not isinstance(message.get("op"), str):
            raise LinkClosed("not a message of the grammar: no op")
        return message, value

    def close(self) -> None:
        self.sock.close()

    def _exactly(self, size: int) -> bytes:
        chunks, left = [], size
        while left:
            try:
                chunk = self.sock.recv(min(left, 1 << 20))
            except OSError as err:
                raise LinkClosed(f"the other side is gone ({err.strerror})") from None
            if not chunk:
                raise LinkClosed("the other side closed the link")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


def _raw_tensor(spec: object, blob: bytes) -> torch.Tensor:
    """A tensor sent raw (see the module docstring), checked: ProtocolError if it does not add up."""
    if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in DTYPES and isinstance(spec[1], list)
            and len(spec[1]) <= 32 and all(type(n) is int and n >= 0 for n in spec[1])):
        raise ProtocolError("a raw tensor needs [dtype, shape] with a known dtype")
    dtype, shape = DTYPES[spec[0]], spec[1]
    if math.prod(shape) * dtype.itemsize != len(blob):
        raise ProtocolError(f"a raw tensor of shape {shape} and {spec[0]} is not {len(blob)} bytes")
    if not blob:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dtype).reshape(shape)
