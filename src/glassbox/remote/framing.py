"""One glassbox message as bytes: a JSON envelope followed by a binary blob.

Offers:
    frame(envelope, blob) -> bytes              pack a message
    unframe(data) -> (envelope, blob)           unpack one, checking every length
    json_size(data) -> int | None               bytes its JSON part claims (None: too short to say),
                                                read off the prefix before anything is parsed
    MAX_HEADER_BYTES                            the largest JSON part ``unframe`` accepts by default

Layout::

    +-------------------------+------------------------+---------------------------+
    | 8 bytes, big-endian: N  | N bytes: JSON (utf-8)  | the rest: the blob        |
    +-------------------------+------------------------+---------------------------+

The JSON part must be an object; the blob is opaque here (``protocol`` puts
safetensors in it). Reading a frame parses JSON and slices bytes, nothing
else: no pickle, so a hostile frame can at worst be refused.

    data = frame({"kind": "ping"}, b"\\x00\\x01")
    assert unframe(data) == ({"kind": "ping"}, b"\\x00\\x01")
"""

from __future__ import annotations

import json

from .protocol import ProtocolError

__all__ = ["MAX_HEADER_BYTES", "frame", "json_size", "unframe"]

_LENGTH_BYTES = 8
# The envelope holds source code and value descriptions, never tensor data, so even a
# generous bound keeps a malformed or hostile length from making the reader allocate gigabytes.
MAX_HEADER_BYTES = 64 * 1024 * 1024


def frame(envelope: dict, blob: bytes = b"") -> bytes:
    """Pack ``envelope`` (a JSON-able dict) and ``blob`` into one message.

        assert unframe(frame({"a": 1}))[0] == {"a": 1}
    """
    if not isinstance(envelope, dict):
        raise ProtocolError(f"a message envelope must be a dict, got {type(envelope).__name__}")
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"a message blob must be bytes, got {type(blob).__name__}")
    try:
        # allow_nan=False: NaN is not JSON, and the other side may be a strict parser.
        header = json.dumps(envelope, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"the message envelope is not plain JSON: {err}") from None
    return len(header).to_bytes(_LENGTH_BYTES, "big") + header + bytes(blob)


def json_size(data: bytes) -> int | None:
    """How many bytes the JSON part of the message ``data`` claims (what parsing it would read),
    or None if ``data`` is shorter than the length prefix."""
    if len(data) < _LENGTH_BYTES:
        return None
    return int.from_bytes(bytes(data[:_LENGTH_BYTES]), "big")


def unframe(data: bytes, *, max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[dict, bytes]:
    """Split a message made by ``frame`` back into (envelope, blob).

    Raises ``ProtocolError`` for anything that is not a well-formed frame.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"a glassbox message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _LENGTH_BYTES:
        raise ProtocolError(
            f"not a glassbox message: {len(data)} bytes is shorter than the "
            f"{_LENGTH_BYTES}-byte length prefix"
        )
    length = int.from_bytes(data[:_LENGTH_BYTES], "big")
    if length > max_header_bytes:
        raise ProtocolError(
            f"not a glassbox message (or a corrupt one): its JSON part claims {length:,} bytes, "
            f"over the limit of {max_header_bytes:,}"
        )
    if length > len(data) - _LENGTH_BYTES:
        raise ProtocolError(
            f"truncated glassbox message: its JSON part claims {length:,} bytes but only "
            f"{len(data) - _LENGTH_BYTES:,} follow the length prefix"
        )
    header = data[_LENGTH_BYTES:_LENGTH_BYTES + length]
    try:
        envelope = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ProtocolError(f"malformed glassbox message: its JSON part does not parse ({err})") from None
    except RecursionError:
        raise ProtocolError("malformed glassbox message: its JSON part nests too deeply to parse") from None
    if not isinstance(envelope, dict):
        raise ProtocolError(
            f"malformed glassbox message: its JSON part is a {type(envelope).__name__}, not an object"
        )
    return envelope, data[_LENGTH_BYTES + length:]
