"""Run one remote job: decode it, compile it under restriction, trace, reply.

Offers:
    run_job(models, request, log=, limits=, choose=use_model) -> JobResult
                                               (with the warnings the block raised: job_warnings.py)
    job_namespace(model, request, log)         the sandboxed globals of one job
    job_code(request, filename)                the job's block compiled under the sandbox
    job_reply(namespace, request, saved, limits, result=None) -> JobResult (COMPLETED)
    error_reply(exc, filename, request)        an ERROR result pointing at the user's line (no server paths)
    next_filename()                            "<glassbox job N>": what tracebacks name
    warm_up(models)                            one job of glassbox's own on each served model, before
                                               any job's process is forked (see its docstring)

Call hierarchy (inside the worker process, which holds models, no secrets)::

    run_job(models, JobRequest)                 read once by the worker (JobRequest.read)
      ├─ served.use_model                       the model asked for (weights guarded)
      ├─ job_code                               "with glassbox_model.trace(...) as tracer:" +
      │                                          the user's block, on its original line numbers,
      │                                          compiled under the sandbox (server/sandbox/)
      ├─ job_namespace                          request.decoded() (data only) + make_globals
      ├─ exec under collect_saved()            a normal local trace of the served model
      ├─ _returned                             exactly the saved values (and containers of them)
    (after the reply is on its way: served.after_job verifies and restores the weights)

User errors never escape: they come back as an ERROR result with the
exception type, message and the line number in the user's own file.
"""

from __future__ import annotations

import json
import textwrap
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from ...cache import Cache
from ...remote.job import JobRequest, JobResult
from ...remote.protocol import RemoteFunction, encode_values
from ...tracing import collect_saved
from ..sandbox.compile import compile_function, compile_restricted_source, make_globals, register_source
from .job_warnings import captured
from .served import use_model
from .server_paths import without_server_paths

_job_counter = 0


def run_job(
    models: dict[str, Any],
    request: JobRequest,
    *,
    log: Callable[[str], None],
    limits: dict | None = None,
    choose: Callable[[dict[str, Any], Any], Any] = use_model,
) -> JobResult:
    """Execute one job; never raises for anything the user's code does. ``choose(models, name)``
    picks the job's model (a worker's ``use_model`` also snapshots its weights for the check
    after the job; the in-process runner of ``remote="local"`` passes a plain lookup)."""
    limits = limits or {}
    started = time.perf_counter()
    model = None
    filename = next_filename()
    with captured(filename) as warned:
        try:
            model = choose(models, request.model)
            result = _execute(model, request, filename, log, limits)
        except Exception as exc:  # every failure of the job becomes an ERROR result
            result = error_reply(exc, filename, request)
        finally:
            if model is not None:
                model.active = None
    return result.replace(seconds=round(time.perf_counter() - started, 4), threads=torch.get_num_threads(),
                          warnings=warned)


# What warm_up runs: one module read and a save, through everything a job goes through.
_WARM_UP = "glassbox_warm_up = glassbox.save(glassbox_model.output)\n"


def warm_up(models: dict[str, Any]) -> None:
    """Run a job of glassbox's own (no user's bytes: a fixed block on the prompt "Hello") on every
    served language model, in the process that job processes are forked from, before any is
    forked: each job's process then inherits what a first job pays for once per process (lazy
    imports, the sandbox's and RestrictedPython's first compile, the tokenizer's and torch's first
    calls). Measured on the tiny GPT-2, forked processes alternating over 15 runs: a process's first
    job 21.5 -> 15.7 ms (its second: 7 ms). A model that cannot run it is left as it is."""
    for name, model in models.items():
        if getattr(model, "tokenizer", None) is None or getattr(type(model), "_requests_per_invoke", False):
            continue  # not a language model glassbox runs in this process (a vLLM engine: its own)
        desc, blob = encode_values({"vars": {}, "inputs": ["Hello"], "call": {}})
        # Its saved value comes back as a job's would (``returns``): encoding a tensor imports
        # what safetensors needs (numpy.ctypeslib), 2 ms in each forked process otherwise.
        request = JobRequest(model=name, method="trace", source=_WARM_UP, filename="<glassbox warm-up>",
                             modules={"glassbox": "glassbox"}, values=desc, blob=blob,
                             writes=("glassbox_warm_up",), returns=("glassbox_warm_up",))
        run_job(models, request, log=lambda text: None)


def next_filename() -> str:
    """The file name a job's code runs under (tracebacks and line numbers point into it)."""
    global _job_counter
    _job_counter += 1
    return f"<glassbox job {_job_counter}>"


def job_code(request: JobRequest, filename: str, *, invoke: bool = False) -> Any:
    """The request's block as the code a job runs, compiled under the sandbox and registered under
    ``filename`` so tracebacks show the user's lines: wrapped in its own trace call, or with
    ``invoke`` the bare block, run as one invoke of a shared pass (cotenant.py)."""
    source = _job_source(request, invoke)
    register_source(filename, source)
    return compile_restricted_source(source, filename)


def _execute(model: Any, request: JobRequest, filename: str, log: Callable, limits: dict) -> JobResult:
    code = job_code(request, filename)
    namespace = job_namespace(model, request, log)
    with collect_saved() as saved:
        exec(code, namespace)
        tracer = namespace.get(request.tracer_name, None)
        result = None
        if request.method == "generate" and tracer is not None:
            result = getattr(tracer, "result", None)
        wire = getattr(type(model), "_wire_result", None)  # glassbox.VLLM: completions as plain data
        if wire is not None and tracer is not None:
            result = wire(model, getattr(tracer, "result", None))
        return job_reply(namespace, request, saved, limits, result)


def job_namespace(model: Any, request: JobRequest, log: Callable[[str], None]) -> dict[str, Any]:
    """The sandboxed globals one job's code runs in: the served model (``glassbox_model``), the
    module references and values the client sent, the modules it imports, its functions (compiled
    under restriction), and ``print`` going to ``log``."""
    values = request.decoded(numpy_as_tensor=True)
    allowed: dict[str, Any] = {"glassbox_model": model}
    for name, path in request.model_refs.items():
        allowed[name] = model._at(path)
    functions = {}
    for name, value in values.vars.items():
        if isinstance(value, RemoteFunction):
            functions[name] = value
        else:
            allowed[name] = value
    allowed["glassbox_inputs"] = values.inputs
    allowed["glassbox_call"] = values.call
    namespace = make_globals(allowed, print_fn=log, protected=[model])
    importer = namespace["__builtins__"]["__import__"]
    for name, module_name in request.modules.items():
        namespace[name] = importer(module_name, None, None, ("*",) if "." in module_name else (), 0)
    for fn in functions.values():
        compile_function(fn, namespace)
    return namespace


def job_reply(namespace: dict, request: JobRequest, saved: dict[int, Any], limits: dict,
              result: Any = None) -> JobResult:
    """What a job that ran sends back: exactly its saved values (and containers of them), within
    the server's limits; a value over a limit fails the job with a MemoryError saying which."""
    returned, unsaved = _returned(namespace, request, saved, limits)
    max_bytes = limits.get("max_result_bytes")
    if max_bytes and _tensor_bytes([returned, result]) > max_bytes:
        raise MemoryError(
            f"the saved values hold {_tensor_bytes([returned, result]):,} bytes of tensors, over "
            f"this server's result limit of {max_bytes:,}; save fewer or smaller values "
            "(e.g. one position: h[:, -1])"
        )
    desc, out_blob = encode_values({"saved": returned, "result": result})
    reply = JobResult.completed(desc, unsaved, out_blob)
    if max_bytes:
        # Every byte sent back counts: strings, numbers and lists live in the JSON part, not the blob.
        size = _framed_size(reply)
        if size > max_bytes:
            raise MemoryError(
                f"the saved values are {size:,} bytes as sent back ({len(out_blob):,} of tensors, "
                f"{size - len(out_blob):,} of strings, numbers, lists and their description), over "
                f"this server's result limit of {max_bytes:,}; save fewer or smaller values "
                "(e.g. one position: h[:, -1])"
            )
    return reply


def _framed_size(reply: JobResult) -> int:
    """Bytes of ``reply`` framed as remote/framing.py frames it (its JSON part the same way, the
    few fields added later aside), plus the blob."""
    header = json.dumps(reply.replace(seconds=0.0).envelope(), separators=(",", ":"))
    # ensure_ascii (json's default, as framing uses it) makes the text ASCII: characters are bytes.
    return 8 + len(header) + len(reply.blob)


def _tensor_bytes(value: Any, depth: int = 0) -> int:
    """Bytes of the tensors in ``value`` (checked before spending time encoding them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if depth > 16:
        return 0
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(_tensor_bytes(v, depth + 1) for v in value)
    return 0


def _job_source(request: JobRequest, invoke: bool = False) -> str:
    first_line = max(2, request.first_line)
    if invoke:
        return "\n" * (first_line - 1) + request.source
    target = request.tracer_name  # checked by JobRequest: an identifier, no leading underscore
    if request.method == "session":
        header = f"with glassbox_model.session() as {target}:"
    else:
        header = f"with glassbox_model.{request.method}(*glassbox_inputs, **glassbox_call) as {target}:"
    body = textwrap.indent(request.source, "    ", lambda line: True)
    return "\n" * (first_line - 2) + header + "\n" + body


def _sendable(value: Any, depth: int = 0, drop_kv: bool = False) -> Any:
    """Saved values as the client can use them: a model's key/value cache (``cache`` /
    ``past_key_values`` in a model output, or among a module's inputs in a ``tracer.cache()``)
    only makes sense inside this process, so it is dropped."""
    if depth > 8:
        return value
    if drop_kv and _is_cache(value):
        return None
    if isinstance(value, Cache):
        return value.converted(lambda v: _sendable(v, depth + 1, drop_kv=True))
    if isinstance(value, dict) and hasattr(value, "to_tuple"):
        fields = {k: None if _is_cache(v) else _sendable(v, depth + 1, drop_kv) for k, v in value.items()}
        return type(value)(**fields)
    if isinstance(value, list):
        return [_sendable(v, depth + 1, drop_kv) for v in value]
    if isinstance(value, tuple):
        if hasattr(value, "_fields"):
            return value
        return type(value)(_sendable(v, depth + 1, drop_kv) for v in value)
    if isinstance(value, dict):
        return {k: _sendable(v, depth + 1, drop_kv) for k, v in value.items()}
    return value


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache") and not isinstance(value, (torch.Tensor, list, tuple, dict))


def _holds_saved(value: Any, saved: dict[int, Any], depth: int = 0) -> bool:
    if id(value) in saved:
        return True
    if depth > 8:
        return False
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_holds_saved(v, saved, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_holds_saved(v, saved, depth + 1) for v in value.values())
    return False


def _returned(namespace: dict, request: JobRequest, saved: dict[int, Any], limits: dict):
    written = set(request.writes)
    returned, unsaved = {}, []
    for name in request.returns:
        if name not in namespace:
            continue
        value = namespace[name]
        if _holds_saved(value, saved):
            returned[name] = _sendable(value)
        elif name in written:
            unsaved.append(name)
    most = limits.get("max_saved_values")
    if most and len(saved) > most:
        raise MemoryError(f"{len(saved)} values were saved; this server allows at most {most} per job")
    return returned, unsaved


def error_reply(exc: BaseException, filename: str, request: JobRequest | None) -> JobResult:
    """The ERROR result of a job that raised ``exc``: its type and message (server paths hidden),
    and the line of the user's block where it happened."""
    lineno = None
    for frame, line in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == filename:
            lineno = line
    text = request.line(lineno) if request is not None else None
    return JobResult.failed(type(exc).__name__, without_server_paths(str(exc)), lineno=lineno, line=text)


