"""Which job requests may share one forward pass (co-tenant batching), decided without running them.

Offers:
    batch_key(request, engine="hf") -> tuple | None   the key shared by requests that may run in one
                                           pass; None: this one runs alone

Runs in the API process (the feeder calls it on each queued request): it parses the request and
the block's source, and never imports torch models or the sandbox. What may share a pass: plain
traces of the same model with no trace arguments beyond the input, whose block does not use the
tracer (invokes, stop, cache), gradients, module skipping or ``.next()``; ``cotenant.py`` runs them.

On a vLLM model (``engine="vllm"``) a pass is a whole generation: traces (``trace`` / ``generate``)
with one prompt each, whose trace arguments are that request's own sampling parameters, join ONE
vLLM trace as its requests (continuous batching). Their blocks may also step through generation
with ``tracer.iter[...]`` (steps are counted per request); any other use of the tracer (invokes,
stop, cache, ``all``) still runs alone.
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


def batch_key(request: bytes, engine: str = "hf") -> tuple | None:
    """The key shared by requests that may run in one pass, or None if this one runs alone."""
    try:
        envelope, _blob = unframe(request)
        payload = check_envelope(envelope, JOB_KIND, receiver="server")
    except (ProtocolError, ValueError, TypeError):
        return None
    values = payload.get("values")
    values = values.get("values") if isinstance(values, dict) else None  # encode_values' wrapper
    if not isinstance(values, dict):
        return None
    vllm = engine == "vllm"
    if vllm:  # each request's own sampling parameters (checked by vLLM when the batch runs)
        call = values.get("call")
        if payload.get("method") not in ("trace", "generate") or not isinstance(call, dict) or (
                call.get("t") != "dict"):
            return None
    elif payload.get("method") != "trace" or values.get("call") != _NO_CALL:
        return None
    inputs = values.get("inputs")
    if not isinstance(inputs, dict) or inputs.get("t") != "list" or len(inputs.get("v") or ()) != 1:
        return None
    source, tracer = payload.get("source"), payload.get("tracer_name")
    if not isinstance(source, str) or not _shareable(source, tracer, steps=vllm):
        return None
    return ("vllm" if vllm else "trace", str(payload.get("model")))


def _shareable(source: str, tracer: Any, steps: bool = False) -> bool:
    """``steps``: ``tracer.iter`` is allowed (each vLLM request counts its own steps)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False  # it fails alone, with its own error
    stepping: set[int] = set()  # the Name nodes of allowed ``tracer.iter`` uses
    for node in ast.walk(tree):
        if (steps and isinstance(node, ast.Attribute) and node.attr == "iter"
                and isinstance(node.value, ast.Name) and node.value.id == tracer):
            stepping.add(id(node.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == tracer and id(node) not in stepping:
            return False
        if isinstance(node, ast.Attribute) and node.attr in _ALONE_ATTRIBUTES and not (
                node.attr == "iter" and id(node.value) in stepping):
            return False
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            return False
    return True
