"""Which job requests may share one forward pass (co-tenant batching), decided without running them.

Offers:
    batch_key(request, engine="hf") -> str | None   the key shared by requests that may run in one
                                           pass; None: this one runs alone
    MAX_ANALYSED_SOURCE                     bytes of source it parses at most (larger: runs alone)

Runs in the API process, once per request, when it is submitted (the key is stored with the job,
so the feeder never reads a request again to batch it): it looks at the JobRequest and the
block's syntax tree, and never imports torch models or the sandbox. Its work is bounded whatever
the block: a source over ``MAX_ANALYSED_SOURCE`` bytes is not parsed (it runs alone), nor is one
that nests too deeply for Python's parser (it runs alone, and fails with its own error).

What may share a pass: plain traces of the same model with no trace arguments beyond the input,
whose block does not use the tracer (invokes, stop, cache), gradients, module skipping or
``.next()``; ``cotenant.py`` runs them.

This is a hint that saves work, not a security boundary: under the default isolation a batch runs
split (``workers/split.py``) and each body decides at run time, from what it actually asks of the
forward, whether it can stay in the pass (``split_body.py``); whatever this key lets through that a
body cannot do in a pass runs that request alone.

On a vLLM model (``engine="vllm"``) a pass is a whole generation: traces (``trace`` / ``generate``)
with one prompt each, whose trace arguments are that request's own sampling parameters, join ONE
vLLM trace as its requests (continuous batching). Their blocks may also step through generation
with ``tracer.iter[...]`` (steps are counted per request); any other use of the tracer (invokes,
stop, cache, ``all``) still runs alone.
"""

from __future__ import annotations

import ast
from typing import Any

from ...remote.job import JobRequest

__all__ = ["MAX_ANALYSED_SOURCE", "batch_key"]

# Blocks that share a pass are a few lines; parsing a larger one (the parser holds the GIL, so the
# API process could answer nobody meanwhile) would cost more than batching it could save.
MAX_ANALYSED_SOURCE = 64 * 1024

# Attributes whose use keeps a request out of batches: they need the trace to themselves.
_ALONE_ATTRIBUTES = frozenset({
    "backward", "grad", "retain_grad", "requires_grad_", "register_hook", "invoke", "skip", "next",
    "trace", "generate", "session", "stop", "cache", "iter", "all",
})


def batch_key(request: JobRequest, engine: str = "hf") -> str | None:
    """The key shared by requests that may run in one pass, or None if this one runs alone."""
    vllm = engine == "vllm"
    if vllm:  # each request's own sampling parameters (checked by vLLM when the batch runs)
        if request.method not in ("trace", "generate") or not request.call_is_dict:
            return None
    elif request.method != "trace" or not request.call_is_empty:
        return None
    if request.input_count != 1 or not _shareable(request.source, request.tracer_name, steps=vllm):
        return None
    return f"{'vllm' if vllm else 'trace'}:{request.model}"


def _shareable(source: str, tracer: Any, steps: bool = False) -> bool:
    """``steps``: ``tracer.iter`` is allowed (each vLLM request counts its own steps)."""
    if len(source) > MAX_ANALYSED_SOURCE or len(source.encode("utf-8", "replace")) > MAX_ANALYSED_SOURCE:
        return False
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        # It fails alone, with its own error (too deep: RecursionError, or MemoryError on 3.11).
        return False
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
