"""Which job requests may share one forward pass (co-tenant batching), decided without running them.

Offers:
    batch_key(request) -> tuple | None     the key shared by requests that may run in one pass;
                                           None: this one runs alone

Runs in the API process (the feeder calls it on each queued request): it parses the request and
the block's source, and never imports torch models or the sandbox. What may share a pass: plain
traces of the same model with no trace arguments beyond the input, whose block does not use the
tracer (invokes, stop, cache), gradients, module skipping or ``.next()``; ``cotenant.py`` runs them.
"""

from __future__ import annotations

import ast
from typing import Any

from ...remote.framing import unframe
from ...remote.protocol import JOB_KIND, ProtocolError, check_envelope

__all__ = ["batch_key"]

# Attributes whose use keeps a request out of batches: they need the trace to themselves.
_ALONE_ATTRIBUTES = frozenset({
    "backward", "grad", "retain_grad", "requires_grad_", "register_hook", "invoke", "skip", "next",
    "trace", "generate", "session", "stop", "cache", "iter", "all",
})
_NO_CALL = {"t": "dict", "v": {}}


def batch_key(request: bytes) -> tuple | None:
    """The key shared by requests that may run in one pass, or None if this one runs alone."""
    try:
        envelope, _blob = unframe(request)
        payload = check_envelope(envelope, JOB_KIND, receiver="server")
    except (ProtocolError, ValueError, TypeError):
        return None
    values = payload.get("values")
    values = values.get("values") if isinstance(values, dict) else None  # encode_values' wrapper
    if payload.get("method") != "trace" or not isinstance(values, dict) or values.get("call") != _NO_CALL:
        return None
    inputs = values.get("inputs")
    if not isinstance(inputs, dict) or inputs.get("t") != "list" or len(inputs.get("v") or ()) != 1:
        return None
    source, tracer = payload.get("source"), payload.get("tracer_name")
    if not isinstance(source, str) or not _shareable(source, tracer):
        return None
    return ("trace", str(payload.get("model")))


def _shareable(source: str, tracer: Any) -> bool:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False  # it fails alone, with its own error
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == tracer:
            return False
        if isinstance(node, ast.Attribute) and node.attr in _ALONE_ATTRIBUTES:
            return False
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            return False
    return True
