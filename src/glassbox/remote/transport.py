"""Talking to a glassbox server over HTTP and websockets: submit, follow, fetch, cancel.

Offers:
    submit(host, api_key, request, timeout) -> job id           (request: a job.JobRequest)
    run(host, api_key, request, keep_result=, timeout=None) -> iterator of events
        submit and follow on one websocket kept open between jobs (what ``remote=True`` uses);
        RunUnavailable: use submit and events
    events(host, api_key, job_id, *, timeout=None) -> iterator of event dicts, ending with the
        final one ({"status": "COMPLETED" | "ERROR" | "CANCELLED", ...}); a websocket, or polling
        when the websocket cannot be opened or breaks (printed output is neither lost nor repeated)
    status(host, api_key, job_id, log_offset=0) -> dict
    result(host, api_key, job_id) -> JobResult
    cancel(host, api_key, job_id) -> dict
    delete_result(host, api_key, job_id) -> dict   drop a finished job's stored result
    models(host, api_key=None) -> [{"name": ..., ...}]
    model_files(host, name) -> {filename: text}   a served model's config and tokenizer files
        (config.json, tokenizer.json, ...: whichever it has), to build its module tree and
        tokenizer here without its weights
    health(host) -> {"glassbox": version, "protocol": N, ...}
    (every failure here raises glassbox.RemoteError: what went wrong and what to do about it)

    job = submit("http://127.0.0.1:8765", key, request, timeout=60)
    for event in events("http://127.0.0.1:8765", key, job):
        print(event.get("log", ""), end="")
    reply = result("http://127.0.0.1:8765", key, job)

``host`` may omit the scheme (``127.0.0.1:8765`` means ``http://127.0.0.1:8765``). Requests
reuse one connection pool per process. Errors the server explains (protocol version, limits,
unknown model) are shown as the server words them.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx

from ..errors import RemoteError
from .job import FINAL, JobRequest, JobResult
from .protocol import ProtocolError

__all__ = ["RunUnavailable", "cancel", "events", "health", "model_files", "models", "result", "run", "status",
           "submit"]

_POLL_SECONDS = 0.1
_CONNECT_SECONDS = 10.0
_REQUEST_SECONDS = 60.0
# An idle pooled connection is dropped after this long: sooner than a server closes it (uvicorn's
# default is 5 s, glassbox serve's 30 s), so that a request is never sent on a connection the server
# is closing at that moment, which resets it (likelier the busier the machines are).
_KEEP_ALIVE_SECONDS = 2.0
_RUN_REQUEST_BYTES = 8 * 2**20  # larger requests are POSTed (servers cap a websocket message: 16 MiB)

_runs_lock = threading.Lock()
_idle_runs: dict[tuple[str, str], list[Any]] = {}  # run websockets between jobs, per (server, key)


def _forget_runs() -> None:
    """In a forked child: its parent's connections are not its own (it opens its own), and the lock
    may have been held by a thread the child does not have."""
    global _runs_lock
    _runs_lock = threading.Lock()
    _idle_runs.clear()


os.register_at_fork(after_in_child=_forget_runs)

_client_lock = threading.Lock()
_client: httpx.Client | None = None


def _http() -> httpx.Client:
    global _client
    with _client_lock:
        if _client is None:
            _client = httpx.Client(timeout=httpx.Timeout(_REQUEST_SECONDS, connect=_CONNECT_SECONDS),
                                   limits=httpx.Limits(keepalive_expiry=_KEEP_ALIVE_SECONDS))
            atexit.register(_close_http)
        return _client


def _close_http() -> None:
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
            _client = None


def _base(host: str) -> str:
    host = (host or "").strip().rstrip("/")
    if not host:
        raise RemoteError("no server address: set glassbox.CONFIG.HOST or GLASSBOX_HOST "
                          "(e.g. http://127.0.0.1:8765)")
    return host if "://" in host else f"http://{host}"


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _request(method: str, host: str, path: str, *, api_key: str | None = None, job_id: str | None = None,
             timeout: float | None = None, **kwargs: Any) -> httpx.Response:
    base = _base(host)
    try:
        response = _http().request(
            method, base + path, headers={**_headers(api_key), **kwargs.pop("headers", {})},
            timeout=httpx.Timeout(timeout or _REQUEST_SECONDS, connect=_CONNECT_SECONDS), **kwargs,
        )
    except httpx.ConnectError:
        raise RemoteError(_no_server(base)) from None
    except httpx.TimeoutException:
        raise RemoteError(f"the glassbox server at {base} did not answer within "
                          f"{timeout or _REQUEST_SECONDS:g} s") from None
    except httpx.HTTPError as err:
        raise RemoteError(f"lost the connection to the glassbox server at {base}: {err}") from None
    _check(response, base, job_id)
    return response


def _no_server(base: str) -> str:
    return f"no glassbox server at {base}: start one with `glassbox serve --model name=path`"


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)
    return json.dumps(body)[:500]


def _check(response: httpx.Response, base: str, job_id: str | None) -> None:
    if response.status_code >= 400:
        raise _refusal(response.status_code, _detail(response), base, job_id, response.request.url.path)


def _refusal(code: int, detail: str, base: str, job_id: str | None = None, path: str = "") -> RemoteError:
    """The error for a refusal with HTTP status ``code`` (over HTTP or the run websocket)."""
    if code == 401:
        message = _key_rejected(detail)
    elif code == 404 and job_id is not None:
        message = (f"job {job_id} not found at {base}: it does not exist, belongs to another API key, "
                   f"or has expired (finished jobs are kept for a limited time). Server: {detail}")
    elif code == 404 and not detail.startswith("model"):
        message = f"{base} does not look like a glassbox server (404 for {path})"
    elif code == 413:
        message = f"request too large: {detail}"
    elif code >= 500:
        message = f"the glassbox server at {base} failed ({code}): {detail}"
    else:
        message = detail  # 400 protocol/version, 404 model, 409, 429: the server's words are the message
    return RemoteError(message, code)


def _key_rejected(detail: str) -> str:
    return ("API key rejected: set glassbox.CONFIG.API_KEY or GLASSBOX_API_KEY (create one with "
            f"`glassbox keys create --name NAME`). Server: {detail}")


# ---------------------------------------------------------------- the calls


def submit(host: str, api_key: str | None, request: JobRequest, timeout: float | None = None) -> str:
    """Send a job request; returns the id the server gave it."""
    data = request.frame()
    response = _request("POST", host, "/v1/jobs", api_key=api_key, timeout=timeout, content=data,
                        headers={"Content-Type": "application/octet-stream"})
    job_id = _json(response).get("id")
    if not isinstance(job_id, str):
        raise RemoteError(f"the server at {_base(host)} accepted the job but sent no id")
    return job_id


def status(host: str, api_key: str | None, job_id: str, log_offset: int = 0) -> dict:
    """The job's status, queue position and printed output from ``log_offset`` on."""
    response = _request("GET", host, f"/v1/jobs/{job_id}", api_key=api_key, job_id=job_id,
                        params={"log_offset": log_offset} if log_offset else None)
    return _json(response)


def result(host: str, api_key: str | None, job_id: str, timeout: float | None = None) -> JobResult:
    """The result of a finished job (failed and cancelled jobs have one too)."""
    response = _request("GET", host, f"/v1/jobs/{job_id}/result", api_key=api_key, job_id=job_id,
                        timeout=timeout)
    try:
        return JobResult.read(response.content)
    except ProtocolError as err:
        raise RemoteError(f"the result of job {job_id} is unreadable: {err}") from None


def cancel(host: str, api_key: str | None, job_id: str) -> dict:
    """Cancel the job (a running one is stopped); returns {"id", "status", "cancelled"}."""
    return _json(_request("DELETE", host, f"/v1/jobs/{job_id}", api_key=api_key, job_id=job_id))


def delete_result(host: str, api_key: str | None, job_id: str) -> dict:
    """Drop a finished job's stored result from the server (its owner has it), freeing the key's
    stored-bytes quota; returns {"id", "status", "deleted", "freed_bytes"}."""
    return _json(_request("DELETE", host, f"/v1/jobs/{job_id}/result", api_key=api_key, job_id=job_id))


def models(host: str, api_key: str | None = None) -> list[dict]:
    """The models the server serves, with what it knows about each."""
    body = _json(_request("GET", host, "/v1/models", api_key=api_key))
    served = body.get("models")
    if not isinstance(served, list):
        raise RemoteError(f"{_base(host)} sent a malformed model list")
    return served


def model_files(host: str, name: str) -> dict[str, str]:
    """The config and tokenizer files of the served model ``name``, by file name (no key needed).

        files = model_files("http://127.0.0.1:8765", "gpt2")
        config = json.loads(files["config.json"])
    """
    path = f"/v1/models/{quote(name, safe='')}/files"
    try:
        body = _json(_request("GET", host, path))
    except RemoteError as err:
        if err.status_code == 404 and "does not look like a glassbox server" in str(err):
            # A glassbox server that answers /v1/models but not this: an older version.
            raise RemoteError(f"the server at {_base(host)} does not hand out model files (it may run "
                              "an older glassbox: upgrade the server)", 404) from None
        raise
    files = body.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in files.items()):
        raise RemoteError(f"{_base(host)} sent a malformed file list for model {name!r}")
    return files


def health(host: str) -> dict:
    return _json(_request("GET", host, "/v1/health"))


def _json(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise RemoteError(f"unexpected answer from {response.request.url}: {response.text[:200]!r}")
    return body


# ---------------------------------------------------------------- events


def events(host: str, api_key: str | None, job_id: str, *, timeout: float | None = None,
           poll_seconds: float = _POLL_SECONDS, keep_result: dict | None = None) -> Iterator[dict]:
    """Follow a job until it is final, yielding each event as it happens.

    An event has ``status`` and, as they apply, ``position`` (jobs ahead in the queue),
    ``estimated_start_seconds`` (queued: how long until it probably starts; None until the
    server can estimate it), ``note`` (running: what the server does for it now, e.g. "loading
    smollm2"), ``log`` (new printed output) with ``offset`` (where it starts in the job's whole
    output), ``elapsed`` (seconds since submission) and ``error`` (on ERROR). With ``timeout``, raises
    ``RemoteError`` if the job is not final by then (the job itself is left alone). With
    ``keep_result`` (a dict), the server sends the result on the same websocket before the final
    event is yielded, and it is kept there as ``keep_result["result"]`` (a JobResult): no
    ``result()`` request needed (absent if it did not come that way, e.g. when polling).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = [0]  # characters of printed output already yielded
    follower = _follow_websocket(host, api_key, job_id, deadline, seen, keep_result)
    try:
        final = yield from follower
    except _WebsocketUnavailable:
        final = False
    if not final:
        yield from _follow_polling(host, api_key, job_id, deadline, seen, poll_seconds)


class _WebsocketUnavailable(Exception):
    pass


class RunUnavailable(Exception):
    """``run`` cannot take this job (nothing was submitted): use ``submit`` and ``events``."""


def run(host: str, api_key: str | None, request: JobRequest, *, keep_result: dict,
        timeout: float | None = None) -> Iterator[dict]:
    """Submit ``request`` and follow it on one websocket (WS /v1/jobs/run): the events as ``events``
    yields them, the first one the server's answer to the submit (with the job's ``id``); the result
    kept as ``keep_result["result"]`` when it came with the final event. The connection stays open
    for this process's next job on that server with that key (one per job running at once), which
    saves a job the POST, a websocket handshake and the result's GET. Raises ``RunUnavailable``
    before submitting anything where this cannot be used (no websockets library, a server without
    the route, a request larger than a websocket message should be); a refusal raises RemoteError
    as ``submit`` does. If the connection breaks after the job was accepted, following goes on as
    ``events`` does (another websocket, or polling)."""
    data = request.frame()
    if len(data) > _RUN_REQUEST_BYTES:
        raise RunUnavailable()
    base, slot = _base(host), (_base(host), api_key or "")
    deadline = None if timeout is None else time.monotonic() + timeout
    connection, first = _submit_on_run_socket(host, api_key, slot, data)
    job_id = str(first["id"])
    seen = [0]
    following = _events_on(connection, base, job_id, deadline, seen, keep_result)
    clean = ended = False
    try:
        yield first
        while True:
            try:
                event = next(following)
            except StopIteration as stop:
                clean = bool(stop.value)
                break
            # The result was read before the final event is yielded: the connection is free then,
            # even if the caller stops reading at that event.
            ended = event.get("status") in FINAL and "result" in keep_result
            yield event
    finally:
        if clean or ended:
            with _runs_lock:
                _idle_runs.setdefault(slot, []).append(connection)
        else:
            connection.close()  # the server may still be sending this job's events on it
    if not clean:
        yield from events(host, api_key, job_id, timeout=None if deadline is None else
                          max(0.0, deadline - time.monotonic()), keep_result=keep_result)


def _submit_on_run_socket(host: str, api_key: str | None, slot: tuple[str, str],
                          data: bytes) -> tuple[Any, dict]:
    """Send the request on an idle run websocket of ``slot`` (a fresh one when there is none, or when
    an idle one turns out closed before the request could be sent); returns it with the server's
    answer."""
    from websockets.exceptions import ConnectionClosed

    while True:
        with _runs_lock:
            idle = _idle_runs.get(slot)
            connection = idle.pop() if idle else None
        reused = connection is not None
        if connection is None:
            try:
                connection = _connect(host, "/v1/jobs/run", api_key)
            except _WebsocketUnavailable:
                raise RunUnavailable() from None
        try:
            connection.send(data)
        except (ConnectionClosed, OSError):
            connection.close()
            if reused:
                continue  # closed while idle (the server restarted): nothing was sent
            raise RunUnavailable() from None
        try:
            raw = connection.recv(timeout=_REQUEST_SECONDS)
        except (ConnectionClosed, OSError, TimeoutError) as err:
            connection.close()
            raise RemoteError(f"lost the connection to the glassbox server at {_base(host)} while "
                              f"submitting: {err}") from None
        answer = json.loads(raw) if isinstance(raw, str) else None
        if isinstance(answer, dict) and "id" in answer:
            return connection, answer
        if isinstance(answer, dict) and "error" in answer:
            code = answer.get("code") if isinstance(answer.get("code"), int) else 400
            if code == 401:
                connection.close()
            else:
                with _runs_lock:
                    _idle_runs.setdefault(slot, []).append(connection)
            raise _refusal(code, str(answer["error"]), _base(host), path="/v1/jobs/run")
        connection.close()
        raise RemoteError(f"unexpected answer from the glassbox server at {_base(host)}: {str(raw)[:200]!r}")


def _trim_log(event: dict, seen: list[int]) -> dict:
    """Drop output already yielded (after a switch from websocket to polling, or a repeat)."""
    text = event.get("log")
    if not text:
        return event
    offset = event.get("offset")
    offset = seen[0] if not isinstance(offset, int) else offset
    end = offset + len(text)
    if end <= seen[0]:
        event = {k: v for k, v in event.items() if k not in ("log", "offset")}
    elif offset < seen[0]:
        event = {**event, "log": text[seen[0] - offset:], "offset": seen[0]}
    seen[0] = max(seen[0], end)
    return event


def _follow_websocket(host: str, api_key: str | None, job_id: str, deadline: float | None,
                      seen: list[int], keep_result: dict | None = None) -> Iterator[dict]:
    """Yields events; returns True once the final one was yielded, False if the stream broke
    (the caller polls from there), raises _WebsocketUnavailable if it could not be opened."""
    path = f"/v1/jobs/{job_id}/events" + ("?result=1" if keep_result is not None else "")
    with _connect(host, path, api_key) as connection:
        return (yield from _events_on(connection, _base(host), job_id, deadline, seen, keep_result))


def _connect(host: str, path: str, api_key: str | None) -> Any:
    """An open websocket to ``path`` that has been sent the key (in the first message, not the URL:
    URLs end up in logs); raises _WebsocketUnavailable if it cannot be opened."""
    try:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect
    except ImportError:
        raise _WebsocketUnavailable() from None
    base = _base(host)
    url = ("wss://" if base.startswith("https://") else "ws://") + base.split("://", 1)[1] + path
    try:
        # No compression: results are mostly float tensors, which deflate cannot shrink but spends
        # time on at both ends.
        connection = connect(url, open_timeout=_CONNECT_SECONDS, close_timeout=2, max_size=None,
                             compression=None, legacy=True)
    except ConnectionRefusedError:
        raise RemoteError(_no_server(base)) from None
    except (OSError, TimeoutError, WebSocketException):
        raise _WebsocketUnavailable() from None
    try:
        connection.send(json.dumps({"api_key": api_key or ""}))
    except Exception:
        connection.close()
        raise _WebsocketUnavailable() from None
    return connection


def _events_on(connection: Any, base: str, job_id: str, deadline: float | None, seen: list[int],
               keep_result: dict | None) -> Iterator[dict]:
    """The job's events on an open websocket; returns True after the final one (and the result, with
    ``keep_result``), False if the connection broke first."""
    from websockets.exceptions import ConnectionClosed

    try:
        while True:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise RemoteError(f"job {job_id} did not finish in time; it is still on the server "
                                  f"(cancel it with glassbox's JobHandle({job_id!r}).cancel())")
            try:
                raw = connection.recv(timeout=wait)
            except TimeoutError:
                continue  # the deadline check above ends it
            event = json.loads(raw)
            if not isinstance(event, dict):
                continue
            if "error" in event and "status" not in event:
                code = event.get("code")
                if code == 401:
                    raise RemoteError(_key_rejected(str(event["error"])), 401)
                if code == 404:
                    raise RemoteError(f"job {job_id} not found at {base}: {event['error']}", 404)
                raise RemoteError(str(event["error"]), code if isinstance(code, int) else None)
            if event.get("status") in FINAL and keep_result is not None:
                _receive_result(connection, job_id, keep_result)  # before the caller stops reading
            yield _trim_log(event, seen)
            if event.get("status") in FINAL:
                return True
    except (ConnectionClosed, OSError, ValueError):
        return False  # broken mid-way: polling picks up exactly where this stopped


def _receive_result(connection: Any, job_id: str, keep: dict) -> None:
    """The message after the final event of a ``?result=1`` websocket: the result's bytes (kept as
    ``keep["result"]``), or ``{"result": "fetch"}`` (too large to send this way: GET it)."""
    try:
        raw = connection.recv(timeout=_CONNECT_SECONDS)
    except Exception:  # closed (an older server sends nothing more), or too slow: the caller GETs it
        return
    if isinstance(raw, bytes):
        try:
            keep["result"] = JobResult.read(raw)
        except ProtocolError as err:
            raise RemoteError(f"the result of job {job_id} is unreadable: {err}") from None


def _follow_polling(host: str, api_key: str | None, job_id: str, deadline: float | None, seen: list[int],
                    poll_seconds: float) -> Iterator[dict]:
    poll_seconds = min(max(poll_seconds, 0.05), 0.2)
    last: tuple[Any, ...] | None = None
    while True:
        state = status(host, api_key, job_id, log_offset=seen[0])
        event: dict[str, Any] = {"status": state.get("status"), "position": state.get("position"),
                                 "elapsed": state.get("elapsed")}
        for name in ("estimated_start_seconds", "note"):  # as the websocket's events have them
            if state.get(name) is not None:
                event[name] = state[name]
        if state.get("logs"):
            event.update(log=state["logs"], offset=seen[0])
        if state.get("error"):
            event["error"] = state["error"]
        event = _trim_log(event, seen)
        # A new estimate is news once per whole second, not at every poll.
        estimate = event.get("estimated_start_seconds")
        now = (event["status"], event["position"], event.get("note"),
               round(estimate) if isinstance(estimate, (int, float)) else None)
        if now != last or event.get("log"):
            yield event
            last = now
        if event["status"] in FINAL:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise RemoteError(f"job {job_id} did not finish in time; it is still on the server")
        time.sleep(poll_seconds)
