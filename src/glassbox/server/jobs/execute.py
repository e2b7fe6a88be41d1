"""Run one remote job: decode it, compile it under restriction, trace, reply.

Offers:
    run_job(models, envelope, blob, log=, limits=, choose=use_model) -> (result envelope, blob)
    job_namespace(model, payload, blob, log)   the sandboxed globals of one job
    job_reply(namespace, payload, saved, limits, result=None) -> (reply, blob)
    error_reply(exc, filename, payload)        an ERROR reply pointing at the user's line (no server paths)
    without_server_paths(message)              absolute paths replaced by "<server path>"
    result_envelope(reply, started)            the reply as a result envelope
    next_filename()                            "<glassbox job N>": what tracebacks name

Call hierarchy (inside the worker process, which holds models, no secrets)::

    run_job
      ├─ check_envelope / decode_values         data only: no pickle, functions as source
      ├─ served.use_model                       the model asked for (weights guarded)
      ├─ _job_source                            "with glassbox_model.trace(...) as tracer:" +
      │                                          the user's block, on its original line numbers
      ├─ compile_restricted_source + make_globals   sandbox (server/sandbox/)
      ├─ exec under collect_saved()            a normal local trace of the served model
      ├─ _returned                             exactly the saved values (and containers of them)
    (after the reply is on its way: served.after_job verifies and restores the weights)

User errors never escape: they come back as an ERROR result with the
exception type, message and the line number in the user's own file.
"""

from __future__ import annotations

import json
import re
import textwrap
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from ...cache import Cache
from ...remote.protocol import (
    JOB_KIND,
    RESULT_KIND,
    RemoteFunction,
    check_envelope,
    decode_values,
    encode_values,
    make_envelope,
)
from ...tracing import collect_saved
from ..sandbox.compile import compile_function, compile_restricted_source, make_globals, register_source
from .served import use_model

_METHODS = ("trace", "generate", "session")
_job_counter = 0


def run_job(
    models: dict[str, Any],
    envelope: dict,
    blob: bytes,
    *,
    log: Callable[[str], None],
    limits: dict | None = None,
    choose: Callable[[dict[str, Any], Any], Any] = use_model,
) -> tuple[dict, bytes]:
    """Execute one job; never raises for anything the user's code does. ``choose(models, name)``
    picks the job's model (a worker's ``use_model`` also snapshots its weights for the check
    after the job; the in-process runner of ``remote="local"`` passes a plain lookup)."""
    limits = limits or {}
    started = time.perf_counter()
    model = None
    filename = next_filename()
    payload: dict = {}
    try:
        payload = check_envelope(envelope, JOB_KIND, receiver="server")
        model = choose(models, payload.get("model"))
        reply, out_blob = _execute(model, payload, blob, filename, log, limits)
    except Exception as exc:  # every failure of the job becomes an ERROR result
        reply, out_blob = error_reply(exc, filename, payload), b""
    finally:
        if model is not None:
            model.active = None
    return result_envelope(reply, started), out_blob


def next_filename() -> str:
    """The file name a job's code runs under (tracebacks and line numbers point into it)."""
    global _job_counter
    _job_counter += 1
    return f"<glassbox job {_job_counter}>"


def result_envelope(reply: dict, started: float) -> dict:
    reply["seconds"] = round(time.perf_counter() - started, 4)
    return make_envelope(RESULT_KIND, reply)


def _execute(model: Any, payload: dict, blob: bytes, filename: str, log: Callable, limits: dict):
    source = _job_source(payload)
    register_source(filename, source)
    code = compile_restricted_source(source, filename)
    namespace = job_namespace(model, payload, blob, log)
    with collect_saved() as saved:
        exec(code, namespace)
        tracer = namespace.get(payload.get("tracer_name") or "", None)
        result = None
        if payload.get("method") == "generate" and tracer is not None:
            result = getattr(tracer, "result", None)
        wire = getattr(type(model), "_wire_result", None)  # glassbox.VLLM: completions as plain data
        if wire is not None and tracer is not None:
            result = wire(model, getattr(tracer, "result", None))
        return job_reply(namespace, payload, saved, limits, result)


def job_namespace(model: Any, payload: dict, blob: bytes, log: Callable[[str], None]) -> dict[str, Any]:
    """The sandboxed globals one job's code runs in: the served model (``glassbox_model``), the
    module references and values the client sent, the modules it imports, its functions (compiled
    under restriction), and ``print`` going to ``log``."""
    values = decode_values(payload["values"], blob, numpy_as_tensor=True)
    allowed: dict[str, Any] = {"glassbox_model": model}
    for name, path in payload.get("model_refs", {}).items():
        allowed[name] = model._at(path)
    functions = {}
    for name, value in values.get("vars", {}).items():
        if isinstance(value, RemoteFunction):
            functions[name] = value
        else:
            allowed[name] = value
    allowed["glassbox_inputs"] = list(values.get("inputs", []))
    allowed["glassbox_call"] = dict(values.get("call", {}))
    namespace = make_globals(allowed, print_fn=log, protected=[model])
    importer = namespace["__builtins__"]["__import__"]
    for name, module_name in payload.get("modules", {}).items():
        namespace[name] = importer(module_name, None, None, ("*",) if "." in module_name else (), 0)
    for fn in functions.values():
        compile_function(fn, namespace)
    return namespace


def job_reply(namespace: dict, payload: dict, saved: dict[int, Any], limits: dict,
              result: Any = None) -> tuple[dict, bytes]:
    """What a job that ran sends back: exactly its saved values (and containers of them), within
    the server's limits; a value over a limit fails the job with a MemoryError saying which."""
    returned, unsaved = _returned(namespace, payload, saved, limits)
    max_bytes = limits.get("max_result_bytes")
    if max_bytes and _tensor_bytes([returned, result]) > max_bytes:
        raise MemoryError(
            f"the saved values hold {_tensor_bytes([returned, result]):,} bytes of tensors, over "
            f"this server's result limit of {max_bytes:,}; save fewer or smaller values "
            "(e.g. one position: h[:, -1])"
        )
    desc, out_blob = encode_values({"saved": returned, "result": result})
    reply = {"status": "COMPLETED", "values": desc, "unsaved": unsaved}
    if max_bytes:
        # Every byte sent back counts: strings, numbers and lists live in the JSON part, not the blob.
        size = _framed_size(reply, out_blob)
        if size > max_bytes:
            raise MemoryError(
                f"the saved values are {size:,} bytes as sent back ({len(out_blob):,} of tensors, "
                f"{size - len(out_blob):,} of strings, numbers, lists and their description), over "
                f"this server's result limit of {max_bytes:,}; save fewer or smaller values "
                "(e.g. one position: h[:, -1])"
            )
    return reply, out_blob


def _framed_size(reply: dict, blob: bytes) -> int:
    """Bytes of ``reply`` framed as remote/framing.py frames it (its JSON part the same way, the
    few fields added later aside), plus the blob."""
    envelope = make_envelope(RESULT_KIND, {**reply, "seconds": 0.0})
    header = json.dumps(envelope, separators=(",", ":"))
    # ensure_ascii (json's default, as framing uses it) makes the text ASCII: characters are bytes.
    return 8 + len(header) + len(blob)


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


def _job_source(payload: dict) -> str:
    method = payload.get("method")
    if method not in _METHODS:
        raise ValueError(f"unknown job method {method!r}; expected one of {_METHODS}")
    target = payload.get("tracer_name") or "tracer"
    if not target.isidentifier() or target.startswith("_"):
        raise ValueError(f"bad tracer name {target!r}")
    if method == "session":
        header = f"with glassbox_model.session() as {target}:"
    else:
        header = f"with glassbox_model.{method}(*glassbox_inputs, **glassbox_call) as {target}:"
    first_line = max(2, int(payload.get("first_line", 2)))
    body = textwrap.indent(payload["source"], "    ", lambda line: True)
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


def _returned(namespace: dict, payload: dict, saved: dict[int, Any], limits: dict):
    written = set(payload.get("writes", []))
    returned, unsaved = {}, []
    for name in payload.get("returns", []):
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


def error_reply(exc: BaseException, filename: str, payload: dict) -> dict:
    lineno = None
    for frame, line in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == filename:
            lineno = line
    text = None
    if lineno is not None and payload.get("source"):
        index = lineno - int(payload.get("first_line", 2))
        lines = payload["source"].splitlines()
        if 0 <= index < len(lines):
            text = lines[index].strip()
    return {
        "status": "ERROR",
        "error": {"type": type(exc).__name__, "message": without_server_paths(str(exc)), "lineno": lineno,
                  "line": text},
    }


SERVER_PATH = "<server path>"
# A quoted absolute path (it may hold spaces): 'No such file: "/srv/my models/x"', File "/a/b.py".
_QUOTED_PATH = re.compile(r"""(?P<q>['"])/(?=[^\s'"/])[^'"\n]*(?P=q)""")
# An unquoted one: "/" starting a name (not a digit: "x /2"), not after a word, a dot, a colon or
# another slash, so "1/2", "a/b", "x.y/z" and URLs ("https://host/a") are left alone.
_BARE_PATH = re.compile(r"(?<![\w.:/~\\-])/[A-Za-z_.@+~-][\w.@+~=%-]*(?:/[\w.@+~=%-]+)*/?")
_FILE_URL = re.compile(r"file://[^\s'\",;]*")


def without_server_paths(message: str) -> str:
    """``message`` with every absolute filesystem path replaced by ``<server path>``: an error
    sent to a user must not tell where the server keeps its models, packages or files.

        without_server_paths("No such file: '/srv/models/gpt2/x.bin'")   # "No such file: '<server path>'"
    """
    message = _FILE_URL.sub(_unquoted, message)
    message = _QUOTED_PATH.sub(lambda m: m["q"] + SERVER_PATH + m["q"], message)
    return _BARE_PATH.sub(_unquoted, message)


def _unquoted(match: re.Match) -> str:
    # A sentence's full stop or colon after a path is not part of it: "... in /srv/x." keeps its "."
    path = match.group()
    return SERVER_PATH + path[len(path.rstrip(".:")):]


