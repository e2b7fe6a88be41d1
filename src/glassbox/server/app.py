"""The HTTP API of a glassbox server.

Offers:
    create_app(config, *, store=None, say=None) -> FastAPI     the whole server, ready for uvicorn
    Hub                  live job events (status, printed output) fanned out to websocket listeners
    RateLimiter          per-key sliding-window count of job submissions
    JOB_KIND             the envelope kind a job request must have
    MODEL_FILES          the files of a served model's folder that /v1/models/{name}/files hands out
    read_model_files(path) -> {filename: text}   those of them that exist for one model

Endpoints (all JSON unless said otherwise)::

    GET    /v1/health               {"glassbox", "protocol", "worker", "backend", "replicas"}   no key
    GET    /v1/models               {"models": [{"name", "status", "class", "parameters", ...}]} no key
    GET    /v1/models/{name}/files  {"files": {filename: text}}: config and tokenizer files, no key
    POST   /v1/jobs                 body: a framed job request (remote/framing.py) -> 202 {"id", ...}
    GET    /v1/jobs                 the caller's jobs (no logs, no results)
    GET    /v1/jobs/{id}            status, queue position, printed output from ?log_offset=N
    WS     /v1/jobs/{id}/events     {"status", "position", "log", "offset", "elapsed", "error"} events
    GET    /v1/jobs/{id}/result     the framed result envelope (+ safetensors blob) of a final job
    DELETE /v1/jobs/{id}            cancel: queued -> CANCELLED; running -> worker killed, CANCELLED

Every endpoint but health and the two model ones needs an API key (``Authorization: Bearer <key>`` or
``X-API-Key: <key>``; the websocket also takes ``{"api_key": ...}`` as its first message). A job
is visible to the key that submitted it only: for any other key it does not exist (404).

Request lifecycle::

    client                       API process (this file)                    worker process
    ──────                       ───────────────────────                    ──────────────
    POST /v1/jobs ──────────►  key ─► rate limit ─► size ─► unframe +
                               check_envelope ─► model served?
                               store: RECEIVED ─► QUEUED ──► 202 {id}
    WS  /events   ◄────────── QUEUED (position n) ... (position 0)
                               feeder: claim ─► RUNNING ───────────────►  run_job(...)
                  ◄────────── {"log": ...}  ◄──────────────────────────  print(...)
                               store: COMPLETED / ERROR + result  ◄────  (result, blob)
                  ◄────────── COMPLETED
    GET /result   ──────────►  framed result bytes (owner only)
                               ... deleted ``result_ttl_seconds`` after it finished

Refusals: 400 not a glassbox request / protocol version mismatch (the message says what to
upgrade), 401 no or unknown key, 404 unknown job or model (the model message lists the served
ones), 409 result of an unfinished job, 413 request over ``max_request_bytes``, 429 over
``rate_limit_per_minute`` or ``max_jobs_per_key``. An unexpected failure answers 500 and the
server goes on; a failure of the job itself is a job in state ERROR, not an HTTP error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import threading
import time
import traceback
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..remote.framing import frame, unframe
from ..remote.protocol import PROTOCOL_VERSION, ProtocolError, check_envelope
from .config import ServerConfig
from .pool import WorkerPool
from .store import TERMINAL, JobInfo, JobStore, KeyInfo, TooManyJobs
from .worker import error_result

__all__ = ["JOB_KIND", "MODEL_FILES", "Hub", "RateLimiter", "create_app", "read_model_files"]

# The envelope kind of a job request (execute.JOB_KIND; not imported from there so that the API
# process does not load the sandbox and the tracing machinery it never uses).
JOB_KIND = "job"
_WS_AUTH_SECONDS = 10.0
_WS_TICK = 0.5  # seconds between queue-position checks / heartbeats on a quiet websocket
_HEARTBEAT = 2.0

# What a client needs to build a served model's module tree (on the meta device) and its
# tokenizer without downloading weights. Only these names are ever read, so no request can reach
# weights or anything else in (or outside) the folder. They are small text files; the cap only
# guards against a misconfigured folder.
MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja",
)
_MAX_MODEL_FILE_BYTES = 64 * 1024**2


async def _thread(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    # The store is synchronous (SQLAlchemy); keep the event loop free while it works.
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


class Hub:
    """Live events of jobs for websocket listeners, safe to publish from any thread.

    Printed output of a running job lives here (the store gets it when the job ends), so a
    listener that subscribes late gets everything printed so far in its first event and then
    every later event, with neither gaps nor repeats: ``subscribe`` and ``publish`` take one lock.

        hub = Hub(store)
        queue, snapshot = hub.subscribe(job_id)       # in a thread; then `await queue.get()`
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._logs: dict[str, list[str]] = {}
        self._listeners: dict[str, set[asyncio.Queue]] = defaultdict(set)

    def publish(self, job_id: str, event: dict) -> None:
        with self._lock:
            if "log" in event:
                self._logs.setdefault(job_id, []).append(event["log"])
            if event.get("status") in TERMINAL:
                self._logs.pop(job_id, None)
            loop = self.loop
            if loop is None or loop.is_closed():
                return
            for queue in self._listeners.get(job_id, ()):
                loop.call_soon_threadsafe(queue.put_nowait, event)

    def live_logs(self, job_id: str) -> str | None:
        with self._lock:
            chunks = self._logs.get(job_id)
            return "".join(chunks) if chunks is not None else None

    def subscribe(self, job_id: str) -> tuple[asyncio.Queue, JobInfo | None, str]:
        """A queue of this job's future events, with its state and printed output right now."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            job = self.store.get(job_id)
            chunks = self._logs.get(job_id)
            logs = job.logs if job is None or job.terminal or chunks is None else "".join(chunks)
            self._listeners[job_id].add(queue)
        return queue, job, logs

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        with self._lock:
            listeners = self._listeners.get(job_id)
            if listeners is not None:
                listeners.discard(queue)
                if not listeners:
                    del self._listeners[job_id]


def read_model_files(path: str) -> dict[str, str]:
    """The ``MODEL_FILES`` that exist for the model served from ``path``: a folder, or a hub id
    already in the local Hugging Face cache (never downloaded here). Files that are not UTF-8 text
    or are over 64 MiB are left out.

        files = read_model_files("/models/gpt2")       # {"config.json": "{...}", "vocab.json": ...}
    """
    found: dict[str, str] = {}
    for filename in MODEL_FILES:
        location = _model_file(path, filename)
        if location is None:
            continue
        try:
            # Checked before reading: a folder is configured by an admin, but a huge or special
            # file (a FIFO would block this thread forever) must not take the server with it.
            info = os.stat(location)
            if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_MODEL_FILE_BYTES:
                continue
            with open(location, "rb") as file:
                found[filename] = file.read(_MAX_MODEL_FILE_BYTES + 1).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
    return found


def _model_file(path: str, filename: str) -> str | None:
    if os.path.isdir(path):
        return os.path.join(path, filename)
    try:  # a hub id the worker loaded from the cache; huggingface_hub comes with transformers
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(path, filename)
    except Exception:  # not a valid repo id, unreadable cache: simply not available
        return None
    return cached if isinstance(cached, str) else None


class RateLimiter:
    """At most ``per_minute`` hits per key in any 60-second window (0: no limit).

        limiter = RateLimiter(2)
        assert limiter.hit("k") is None and limiter.hit("k") is None
        assert limiter.hit("k") > 0      # seconds until the next hit is allowed
    """

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._hits: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def hit(self, key_id: str, now: float | None = None) -> float | None:
        """Count one hit; None if allowed, else the seconds to wait (the hit is not counted)."""
        if not self.per_minute:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            hits = self._hits[key_id]
            while hits and hits[0] <= now - 60.0:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return max(0.1, hits[0] + 60.0 - now)
            hits.append(now)
            return None


def _presented_key(headers: Any) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or None


_MISSING_KEY = (
    "missing API key: send it as `Authorization: Bearer <key>` or `X-API-Key: <key>` "
    "(glassbox clients read glassbox.CONFIG.API_KEY or GLASSBOX_API_KEY)"
)
_BAD_KEY = "API key rejected: it is unknown to this server or was revoked"


def create_app(
    config: ServerConfig,
    *,
    store: JobStore | None = None,
    say: Callable[[str], None] | None = None,
) -> FastAPI:
    """The glassbox API for ``config``. Starting it (uvicorn runs the lifespan) settles jobs left
    by a previous run, starts the worker and waits until the models are loaded.

        app = create_app(ServerConfig(models={"gpt2": path}))
        uvicorn.run(app, host="127.0.0.1", port=8765)
    """
    say = say or (lambda text: print(f"[glassbox] {text}", flush=True))
    store = store or JobStore(config.database_url())
    hub = Hub(store)
    limiter = RateLimiter(config.rate_limit_per_minute)
    worker = WorkerPool(config, store, on_event=hub.publish, say=say)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.loop = asyncio.get_running_loop()
        counts = await _thread(store.recover)
        if counts["requeued"] or counts["failed"] or counts["dropped"] or counts["queued"]:
            say(f"jobs from the previous run: {counts['queued']} still queued, {counts['requeued']} "
                f"interrupted and queued again, {counts['failed'] + counts['dropped']} failed")
        await _thread(store.delete_expired, config.result_ttl_seconds)
        await _thread(worker.start)  # WorkerStartError here stops the server with the reason
        janitor = asyncio.create_task(_janitor())
        try:
            yield
        finally:
            janitor.cancel()
            await _thread(worker.stop)
            hub.loop = None
            store.close()

    async def _janitor() -> None:
        period = max(1.0, min(60.0, config.result_ttl_seconds / 4))
        while True:
            await asyncio.sleep(period)
            try:
                await _thread(store.delete_expired, config.result_ttl_seconds)
            except Exception:
                say(f"could not delete expired jobs (will retry):\n{traceback.format_exc()}")

    app = FastAPI(title="glassbox", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config, app.state.store, app.state.worker, app.state.hub = config, store, worker, hub

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        say(f"error while serving {request.method} {request.url.path}:\n{traceback.format_exc()}")
        return JSONResponse({"detail": f"internal server error ({type(exc).__name__}); the server goes on"},
                            status_code=500)

    async def authenticate(request: Request) -> KeyInfo:
        key = _presented_key(request.headers)
        if not key:
            raise HTTPException(401, _MISSING_KEY, headers={"WWW-Authenticate": "Bearer"})
        info = await _thread(store.authenticate, key)
        if info is None:
            raise HTTPException(401, _BAD_KEY, headers={"WWW-Authenticate": "Bearer"})
        return info

    async def owned_job(job_id: str, key: KeyInfo) -> JobInfo:
        job = await _thread(store.get, job_id)
        if job is None or job.key_id != key.id:
            # The same answer for "never existed", "expired" and "someone else's": ids leak nothing.
            raise HTTPException(404, f"no job {job_id!r} for this API key (finished jobs are deleted "
                                     f"{config.result_ttl_seconds:g} s after they finish)")
        return job

    # ------------------------------------------------------------ open endpoints

    @app.get("/v1/health")
    async def health() -> dict:
        return {"glassbox": __version__, "protocol": PROTOCOL_VERSION, "status": "ok",
                "worker": worker.state, "running": worker.running_job is not None,
                "backend": config.backend, "replicas": worker.replicas()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"models": [{"name": name, "status": worker.state, **worker.models.get(name, {})}
                           for name in config.models]}

    # Read once per model and kept as the finished answer: the files are those of the weights
    # the worker loaded at start, and this endpoint needs no key, so a request must be cheap.
    file_answers: dict[str, bytes] = {}
    file_lock = threading.Lock()

    def files_answer(name: str) -> bytes | None:
        with file_lock:
            if name not in file_answers:
                files = read_model_files(config.models[name])
                if not files:
                    return None  # not kept: the folder may appear (a download still running)
                file_answers[name] = json.dumps({"files": files}).encode("utf-8")
            return file_answers[name]

    @app.get("/v1/models/{name}/files")
    async def model_files(name: str) -> Response:
        if name not in config.models:
            served = ", ".join(sorted(config.models)) or "none"
            raise HTTPException(404, f"model {name!r} is not served here; this server serves: {served}")
        answer = await _thread(files_answer, name)
        if answer is None:
            raise HTTPException(404, (
                f"model {name!r} is served, but none of its config or tokenizer files ("
                f"{', '.join(MODEL_FILES)}) is in a local folder on this server"
            ))
        return Response(content=answer, media_type="application/json")

    # ------------------------------------------------------------ jobs

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request) -> dict:
        key = await authenticate(request)
        wait = limiter.hit(key.id)
        if wait is not None:
            raise HTTPException(429, (
                f"rate limit: this API key may submit {config.rate_limit_per_minute} jobs per minute "
                f"(the server's rate_limit_per_minute); try again in {wait:.0f} s"
            ), headers={"Retry-After": str(int(wait) + 1)})
        body = await _read_body(request, config.max_request_bytes)
        try:
            envelope, _blob = unframe(body)
            payload = check_envelope(envelope, JOB_KIND, receiver="server")
        except ProtocolError as err:
            raise HTTPException(400, str(err)) from None
        model = payload.get("model")
        if not isinstance(model, str) or model not in config.models:
            served = ", ".join(sorted(config.models)) or "none"
            raise HTTPException(404, f"model {model!r} is not served here; this server serves: {served}")
        try:
            job_id = await _thread(store.create_job, key.id, model, body, max_active=config.max_jobs_per_key)
        except TooManyJobs as err:
            raise HTTPException(429, (
                f"this API key already has {err.active} jobs queued or running, the server's limit "
                f"(max_jobs_per_key = {err.limit}); wait for one to finish or cancel one"
            ), headers={"Retry-After": "1"}) from None
        await _thread(store.mark_queued, job_id)
        position = await _thread(store.position, job_id)
        hub.publish(job_id, {"status": "QUEUED", "position": position})
        worker.wake()
        return {"id": job_id, "status": "QUEUED", "position": position, "model": model}

    @app.get("/v1/jobs")
    async def list_jobs(request: Request) -> dict:
        key = await authenticate(request)
        jobs = await _thread(store.jobs_of, key.id)
        return {"jobs": [_summary(job) for job in jobs]}

    @app.get("/v1/jobs/{job_id}")
    async def job_status(job_id: str, request: Request, log_offset: int = 0) -> dict:
        key = await authenticate(request)
        live = hub.live_logs(job_id)  # read before the store: see Hub for why this order is safe
        job = await owned_job(job_id, key)
        logs = job.logs if job.terminal or live is None else live
        position = await _thread(store.position, job_id) if job.status == "QUEUED" else None
        offset = max(0, log_offset)
        return {**_summary(job), "position": position, "logs": logs[offset:], "log_length": len(logs),
                "error": job.error}

    @app.get("/v1/jobs/{job_id}/result")
    async def job_result(job_id: str, request: Request) -> Response:
        key = await authenticate(request)
        job = await owned_job(job_id, key)
        if not job.terminal:
            raise HTTPException(409, (
                f"job {job_id} is not finished (status {job.status}); wait for it on "
                f"/v1/jobs/{job_id}/events or poll /v1/jobs/{job_id}"
            ))
        data = await _thread(store.result, job_id)
        if data is None:
            data = frame(error_result("InternalError", f"the result of job {job_id} was not stored"))
        return Response(content=data, media_type="application/octet-stream")

    @app.delete("/v1/jobs/{job_id}")
    async def cancel(job_id: str, request: Request) -> dict:
        key = await authenticate(request)
        job = await owned_job(job_id, key)
        if job.terminal:
            return {"id": job_id, "status": job.status, "cancelled": False}
        result = frame(error_result("Cancelled", "the job was cancelled by its owner before it ran"))
        status = await _thread(store.cancel, job_id, result=result)
        if status == "CANCELLED":
            hub.publish(job_id, {"status": "CANCELLED"})
            return {"id": job_id, "status": "CANCELLED", "cancelled": True}
        if status == "RUNNING" and worker.cancel(job_id):
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline:
                job = await owned_job(job_id, key)
                if job.terminal:
                    break
                await asyncio.sleep(0.05)
        job = await owned_job(job_id, key)
        return {"id": job_id, "status": job.status, "cancelled": job.status == "CANCELLED"}

    @app.websocket("/v1/jobs/{job_id}/events")
    async def events(websocket: WebSocket, job_id: str) -> None:
        await websocket.accept()
        try:
            await _stream_events(websocket, job_id)
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away (RuntimeError: starlette's "send after close")
        except Exception:
            say(f"error on the events websocket of job {job_id}:\n{traceback.format_exc()}")
        with contextlib.suppress(Exception):
            await websocket.close()

    async def _stream_events(websocket: WebSocket, job_id: str) -> None:
        key = (_presented_key(websocket.headers) or websocket.query_params.get("api_key")
               or websocket.query_params.get("key"))
        if not key:
            try:
                first = await asyncio.wait_for(websocket.receive_json(), _WS_AUTH_SECONDS)
            except (asyncio.TimeoutError, ValueError):
                first = None
            key = first.get("api_key") if isinstance(first, dict) else None
        info = await _thread(store.authenticate, key) if isinstance(key, str) and key else None
        if info is None:
            await websocket.send_json({"error": _BAD_KEY if key else _MISSING_KEY, "code": 401})
            await websocket.close(code=4401)
            return
        job = await _thread(store.get, job_id)
        if job is None or job.key_id != info.id:
            await websocket.send_json({"error": f"no job {job_id!r} for this API key", "code": 404})
            await websocket.close(code=4404)
            return
        queue, job, logs = await _thread(hub.subscribe, job_id)
        try:
            await _follow(websocket, queue, job, logs)
        finally:
            hub.unsubscribe(job_id, queue)

    async def _follow(websocket: WebSocket, queue: asyncio.Queue, job: JobInfo | None, logs: str) -> None:
        if job is None:
            return
        created = job.created

        async def send(event: dict) -> None:
            await websocket.send_json({**event, "elapsed": round(time.time() - created, 3)})

        status = job.status
        position = await _thread(store.position, job.id) if status == "QUEUED" else None
        first: dict[str, Any] = {"status": status, "position": position}
        if logs:
            first.update(log=logs, offset=0)
        if job.terminal and job.error:
            first["error"] = job.error
        await send(first)
        if job.terminal:
            return
        last_sent = time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), _WS_TICK)
            except asyncio.TimeoutError:
                event = None
            if event is None:
                current = await _thread(store.get, job.id)
                if current is None:
                    return
                if current.status == "QUEUED":
                    now_position = await _thread(store.position, job.id)
                    if now_position != position:
                        position = now_position
                        await send({"status": "QUEUED", "position": position})
                        last_sent = time.monotonic()
                        continue
                if time.monotonic() - last_sent >= _HEARTBEAT:
                    # Also how a client that went away is noticed.
                    await send({"status": current.status, "position": position})
                    last_sent = time.monotonic()
                continue
            if event.get("status") != "QUEUED":
                position = None
            else:
                position = event.get("position", position)
            await send({**event, "position": position})
            last_sent = time.monotonic()
            if event.get("status") in TERMINAL:
                return

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = (
        "the request is {size} bytes, over this server's limit of {limit:,} bytes (max_request_bytes); "
        "send smaller inputs or fewer values (tensors the block reads travel with it)"
    )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, too_big.format(size=f"{int(declared):,}", limit=limit))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, too_big.format(size=f"more than {limit:,}", limit=limit))
    return bytes(body)


def _summary(job: JobInfo) -> dict:
    end = job.finished or time.time()
    return {"id": job.id, "model": job.model, "status": job.status, "created": job.created,
            "started": job.started, "finished": job.finished, "elapsed": round(end - job.created, 3),
            "attempts": job.attempts}
