"""Co-tenant batching: concurrent requests for one model share ONE forward pass.

Offers:
    run_batch(models, requests, logs=, limits=) -> [JobResult, ...]   (in the worker)
    padded_width(model, prompts) -> int    the length a batch of prepared prompts is padded to

Where it runs: in ONE process with every request of the batch, i.e. only where jobs do not get
processes of their own (``--isolation none``: a GPU server, a vLLM engine). Under the default
isolation a batch runs split (``workers/split.py``: the forward in a host process that runs no
user code, each request's block in a process of its own: ``split_host.py``, ``split_body.py``).

Which requests may share a pass is decided in the API process by ``batchable.batch_key``.

How a batch runs (inside the worker)::

    request 0: "The cat sat"      ─┐   each one: its own sandbox namespace, its own print,
    request 1: "Hello"            ─┼─► its body compiled alone  ──►  tracing.Body(...)
    request 2: "A longer prompt"  ─┘                                      │
                                          tracing.run_together(model, bodies, pad_to=...)
                                          one left-padded forward; each body is an invoke on
                                          its own rows and sees them WITHOUT the padding its
                                          prompt did not have alone (batching.Rows.trim)

What may share a pass (``batchable.batch_key``): plain traces of the same model with no trace arguments
beyond the input, whose block does not use the tracer (invokes, stop, cache), gradients, module
skipping or ``.next()``. Everything else runs alone, as before. Two requests that share a pass
share nothing else: names, printed output, saved values, errors and limits are per request.

Isolation: a request that fails on its own (bad code, a sandbox refusal, a value over a limit)
fails alone and the others go on. A failure inside the shared pass (one body raising while the
model runs, an order error) cannot be pinned on one request from inside it, so every request of
that batch runs again alone: the one at fault fails alone and the others get the results they
would have had anyway. Each request works on a copy of its own rows (``tracing.run_together``),
and the weights are read-only memory; what else is writable (buffers, weights on a GPU) is
checked against the model as loaded (``served.restore_changed``) before any reply leaves, and a
change is put back and makes every request run again alone. A batch over the time limit, or
whose process dies, is likewise run again request by request (``workers/feeder.py``). Printed
output of a batched request is therefore sent when its batch has finished, not while it runs.

On vLLM (``glassbox.VLLM``, whose ``_requests_per_invoke`` says so) each request is one engine
request of ONE trace: it keeps its own sampling parameters (its trace arguments), nothing is padded
(every request has exactly its own rows at every step), a block may step with ``tracer.iter``
(its own view of the trace: steps counted for its request only), and ``tracer.result`` sent back
is its own completion.

Equality with running alone: not bit for bit, since CPU kernels block their work differently
for other batch shapes. Measured on SmolLM2 (bench/throughput.py): logits within 1e-4 for
batches of a few requests, up to 1.1e-4 (5e-6 of the largest logit) for batches of 15, with or
without padding. Cutting the padding relies on telling the sequence dimension apart: a batch is
padded to a length that equals no other dimension size of the model (hidden, heads, head size,
vocabulary...), one or more positions longer than its longest prompt where needed.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ...envoy import module_of
from ...remote.job import JobRequest, JobResult
from ...tracing import Body, collect_saved, run_together
from . import execute, served

__all__ = ["padded_width", "run_batch"]


class _Request:
    """One request of a batch, prepared to run as an invoke."""

    def __init__(self, index: int, request: JobRequest, log: Any) -> None:
        self.index, self.request, self.log = index, request, log
        self.printed: list[str] = []
        self.filename = ""
        self.model: Any = None
        self.code: Any = None
        self.namespace: dict[str, Any] = {}
        self.prompt: Any = None
        self.started = time.perf_counter()

    def prepare(self, models: dict[str, Any]) -> None:
        self.filename = execute.next_filename()
        self.model = served.use_model(models, self.request.model)
        self.code = execute.job_code(self.request, self.filename, invoke=True)
        self.namespace = execute.job_namespace(self.model, self.request, self.printed.append)
        own = per_request(self.model)
        call = self.namespace["glassbox_call"] if own else {}  # on vLLM: this request's sampling
        self.prompt = self.model._prepare(tuple(self.namespace["glassbox_inputs"]), call)
        if own:  # its own tracer, never entered: tracer.iter counts this request's steps
            self.namespace[self.request.tracer_name] = self.model.trace()

    def finished(self, reply: JobResult) -> JobResult:
        """``reply`` with how long this request took and the torch threads it ran with."""
        seconds = round(time.perf_counter() - self.started, 4)
        return reply.replace(seconds=seconds, threads=torch.get_num_threads())



def per_request(model: Any) -> bool:
    """Whether each invoke of ``model`` is a request of its own (vLLM): no padding, own sampling."""
    return bool(getattr(type(model), "_requests_per_invoke", False))


def run_batch(models: dict[str, Any], requests: list[JobRequest], *, logs: list[Any],
              limits: dict | None = None) -> list[JobResult]:
    """Run several job requests, sharing one forward pass where they can; a result per request,
    in order. Never raises for anything the requests' code does."""
    limits = limits or {}
    results: list[Any] = [None] * len(requests)
    ready: list[_Request] = []
    for index, job in enumerate(requests):
        request = _Request(index, job, logs[index])
        try:
            request.prepare(models)
        except Exception as exc:  # this request fails alone, before anything ran
            reply = execute.error_reply(exc, request.filename, request.request)
            results[index] = request.finished(reply)
        else:
            ready.append(request)
    for group, width in _groups(ready):
        if len(group) > 1:
            try:
                done = _run_together(group, limits, width)
            except Exception:  # the shared pass failed: each runs again alone (see the docstring)
                done = None
            if done is not None:
                for request, result in zip(group, done):
                    results[request.index] = result
                continue
        for request in group:
            results[request.index] = execute.run_job(models, request.request, log=request.log, limits=limits)
    return results


def _groups(requests: list[_Request]) -> list[tuple[list[_Request], int]]:
    """Requests that run together (one model each), with the length to pad them to."""
    by_model: dict[str, list[_Request]] = {}
    for request in requests:
        by_model.setdefault(request.request.model, []).append(request)
    return [(same, padded_width(same[0].model, [r.prompt for r in same])) for same in by_model.values()]


def padded_width(model: Any, prompts: list[Any]) -> int:
    """The length to pad ``prompts`` (prepared inputs of ``model``) to in one pass: 0 when all have
    one length (no padding), else the longest length, raised while it equals another dimension
    size of the model, so that the sequence dimension is the only one of that size."""
    if per_request(model):
        return 0
    lengths = {_length(prompt) for prompt in prompts}
    width = 0
    if len(lengths) > 1:
        width, sizes = max(lengths), _model_sizes(model)
        while width in sizes:
            width += 1
    return width


def _length(prompt: Any) -> int:
    """A prompt's length alone: its longest row, or the width its encoding was already padded to
    (a padded attention mask, tokenizer padding options), which it keeps in any batch."""
    rows = getattr(prompt, "rows", None) or ()
    return max([getattr(prompt, "width", 0), *(len(row) for row in rows)])


_sizes: dict[int, frozenset[int]] = {}


def _model_sizes(model: Any) -> frozenset[int]:
    """Every dimension size in the model other than batch and sequence: weight shapes, plus the
    head counts and head sizes of its config (they shape attention's intermediate tensors)."""
    module = module_of(model)
    if id(module) not in _sizes:
        sizes = {n for tensor in [*module.parameters(), *module.buffers()] for n in tensor.shape}
        config = getattr(module, "config", None)
        for attr in ("num_attention_heads", "num_key_value_heads", "n_head", "head_dim", "hidden_size",
                     "n_embd", "intermediate_size", "n_inner", "vocab_size"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                sizes.add(value)
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        if isinstance(heads, int) and isinstance(hidden, int) and heads:
            sizes.update({hidden // heads, hidden // heads // 2})
        _sizes[id(module)] = frozenset(sizes)
    return _sizes[id(module)]


def _run_together(group: list[_Request], limits: dict, width: int) -> list[JobResult]:
    model = group[0].model
    bodies = [Body(r.code, r.namespace, r.prompt, f"request {r.index}") for r in group]
    # The saved-value cap is per request: a batch of n may hold n times as many.
    shared_limits = dict(limits)
    if shared_limits.get("max_saved_values"):
        shared_limits["max_saved_values"] = int(shared_limits["max_saved_values"]) * len(group)
    results = []
    try:
        with collect_saved() as saved:
            output = run_together(model, bodies, pad_to=width)
            wire = getattr(type(model), "_wire_result", None)  # vLLM: one completion per request
            own = [wire(model, [one]) for one in output] if wire is not None else [None] * len(group)
            # Before anyone receives values computed in this pass: if a request changed what is
            # writable (buffers; weights off the CPU), put it back; every request then runs alone.
            changed = served.restore_changed(model)
            if changed:
                raise RuntimeError(f"a request changed {', '.join(changed[:3])} during a shared pass")
            for request, result in zip(group, own):
                try:
                    reply = execute.job_reply(request.namespace, request.request, saved, shared_limits,
                                              result)
                except Exception as exc:  # over a limit: this request alone fails
                    reply = execute.error_reply(exc, request.filename, request.request)
                results.append(request.finished(reply))
    finally:
        model.active = None
    for request in group:  # printed output is sent only for a batch that stands
        for text in request.printed:
            request.log(text)
    return results
