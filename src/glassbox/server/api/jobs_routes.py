"""The job endpoints: submit, list, status, live events, result, cancel (each needs an API key).

Offers:
    router      the routes below, for ``app.include_router``

    POST   /v1/jobs                 body: a framed job request (remote/framing.py) -> 202 {"id", ...}
    GET    /v1/jobs                 the caller's jobs (no logs, no results)
    GET    /v1/jobs/{id}            status, queue position and estimated start (queued), note
                                    (running), printed output from ?log_offset=N
    WS     /v1/jobs/run             submit and follow jobs over one connection: per job the request,
                                    then {"id", ...}, its events and its result (``run`` says how)
    WS     /v1/jobs/{id}/events     {"status", "position", "estimated_start_seconds", "note", "log",
                                    "offset", "elapsed", "error"} events; with ?result=1, after the
                                    final one the result (GET /result's bytes) as one binary
                                    message, or {"result": "fetch"} when over 16 MiB
    GET    /v1/jobs/{id}/result     the framed result envelope (+ safetensors blob) of a final job
    DELETE /v1/jobs/{id}            cancel: queued -> CANCELLED; running (on any API process sharing
                                    the database) -> its process killed, CANCELLED

A job's status (REST and events) carries, as they apply: ``position`` (queued jobs ahead of it),
``estimated_start_seconds`` (queued: how long until it probably starts, from measured run times,
None until its model has finished jobs: queue_wait.py says how) and ``note`` (running: what the
server does for it now, e.g. ``loading smollm2 (evicting tiny)`` then ``smollm2 loaded in 2.1 s``;
kept in the store, so every API process sharing the database answers with it).

A job is visible to the key that submitted it only: for any other key it does not exist (404).
Refusals: 400 not a glassbox request / protocol version mismatch (the message says what to
upgrade), 404 unknown job or model (the model message lists the served ones), 409 result of an
unfinished job, 413 request over ``max_request_bytes`` or its JSON part (code and value
descriptions) over ``max_request_json_bytes``, 429 over ``rate_limit_per_minute``,
``max_jobs_per_key`` or ``max_stored_bytes_per_key``.

A submit's work in this process is bounded whatever its code: the body is read in chunks, its
JSON part's size is checked before it is parsed, and the parse (``JobRequest.read``, the batch
key) runs in a thread, at most ``app.INTAKE_THREADS`` at once, so the event loop answers others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response

from ...remote.framing import json_size
from ...remote.job import FINAL, JobError, JobRequest, JobResult, Status
from ...remote.protocol import ProtocolError
from ..jobs.batchable import batch_key
from ..store import JobInfo, KeyInfo, OverQuota, TooManyJobs
from ..workers.feeder import RESULT
from .auth import BAD_KEY, MISSING_KEY, ApiKey, in_thread, key_of
from .queue_wait import estimate_start, replicas_of

__all__ = ["router"]

_WS_RESULT_BYTES = 16 * 2**20  # a larger result is fetched with GET (streamed from the store)
_WS_TICK = 0.5  # seconds between queue-position checks / heartbeats on a quiet websocket
_HEARTBEAT = 2.0
_CANCEL_WAIT = 15.0  # seconds a cancel answer waits for the running job to end

router = APIRouter()


def _state(request: Request) -> tuple[Any, Any, Any, Any]:
    state = request.app.state
    return state.config, state.store, state.hub, state.worker


async def _owned_job(request: Request, job_id: str, key: KeyInfo) -> JobInfo:
    job = await in_thread(request.app.state.store.get, job_id)
    if job is None or job.key_id != key.id:
        # The same answer for "never existed", "expired" and "someone else's": ids leak nothing.
        ttl = request.app.state.config.result_ttl_seconds
        raise HTTPException(404, f"no job {job_id!r} for this API key (finished jobs are deleted "
                                 f"{ttl:g} s after they finish)")
    return job


@router.post("/v1/jobs", status_code=202)
async def submit(request: Request, key: ApiKey) -> dict:
    _check_rate(request.app.state, key)
    body = await _read_body(request, request.app.state.config.max_request_bytes)
    return await _accept(request.app.state, key, body)


def _check_rate(state: Any, key: KeyInfo) -> None:
    wait = state.limiter.hit(key.id)
    if wait is not None:
        raise HTTPException(429, (
            f"rate limit: this API key may submit {state.config.rate_limit_per_minute} jobs per minute "
            f"(the server's rate_limit_per_minute); try again in {wait:.0f} s"
        ), headers={"Retry-After": str(int(wait) + 1)})


async def _accept(state: Any, key: KeyInfo | str, body: bytes, *, listen: bool = False) -> dict:
    """Admit one job request (POST /v1/jobs and WS /v1/jobs/run alike), in ONE thread call: its size,
    model and batch key checked, then stored as QUEUED, in one transaction; raises the HTTP refusal.
    ``key``: the caller's, or (the run websocket) the key text, checked here, and its rate too.
    ``listen``: also subscribed to its events (``"listening"``: the hub's queue, job and printed
    output). At most ``INTAKE_THREADS`` run at once: a request's parse is bounded by its size
    limits and runs off the event loop, so others (/v1/health, status polls) are answered meanwhile."""
    return await anyio.to_thread.run_sync(_admit, state, key, body, listen, limiter=state.intake)


def _admit(state: Any, key: KeyInfo | str, body: bytes, listen: bool) -> dict:
    config, store = state.config, state.store
    if isinstance(key, str):
        info = store.authenticate(key)
        if info is None:
            raise HTTPException(401, BAD_KEY)
        _check_rate(state, info)
        key = info
    claimed = json_size(body)  # more than the body holds: not a frame (unframe says so, parsing nothing)
    if claimed is not None and config.max_request_json_bytes < claimed <= len(body):
        raise HTTPException(413, (
            f"the request's code and value descriptions (its JSON part) are {claimed:,} bytes, over "
            f"this server's limit of {config.max_request_json_bytes:,} bytes (max_request_json_bytes); "
            "send a shorter block, or pass large data as tensors (they travel apart and count only "
            "against max_request_bytes)"))
    model, key_for_batch = _intake(body, config)
    try:
        job_id, position = store.queue_job(key.id, model, body, batch_key=key_for_batch,
                                           max_active=config.max_jobs_per_key,
                                           max_stored_bytes=config.max_stored_bytes_per_key)
    except TooManyJobs as err:
        raise HTTPException(429, (
            f"this API key already has {err.active} jobs queued or running, the server's limit "
            f"(max_jobs_per_key = {err.limit}); wait for one to finish or cancel one"
        ), headers={"Retry-After": "1"}) from None
    except OverQuota as err:
        raise HTTPException(429, (
            f"this API key's finished jobs hold {err.stored:,} bytes on this server (results, errors "
            f"and printed output), at or over its quota of {err.limit:,} bytes "
            f"(--max-stored-bytes-per-key); fetch the results you need and let them expire (finished "
            f"jobs are deleted {config.result_ttl_seconds:g} s after they finish) or delete them "
            "(DELETE /v1/jobs/ID/result), or ask the operator for a larger quota"
        )) from None
    state.hub.publish(job_id, {"status": Status.QUEUED, "position": position})
    # Subscribed after that event (the answer says as much), before the feeder hears of the job.
    listening = state.hub.subscribe(job_id) if listen else None
    state.worker.wake()
    accepted = {"id": job_id, "status": Status.QUEUED, "position": position, "model": model}
    return {**accepted, "listening": listening} if listen else accepted


def _intake(body: bytes, config: Any) -> tuple[str, str | None]:
    """The model a request is for and its batch key (in a thread): the one time the API process
    reads a request (``JobRequest.read``); raises the HTTP refusal."""
    try:
        job = JobRequest.read(body)
    except ProtocolError as err:
        raise HTTPException(400, str(err)) from None
    if job.model not in config.models:
        served = ", ".join(sorted(config.models)) or "none"
        raise HTTPException(404, f"model {job.model!r} is not served here; this server serves: {served}")
    # Kept with batching off too: a lone job with a key runs split (workers/split.py).
    return job.model, batch_key(job, config.engine(job.model))


def _place(state: Any, job: JobInfo) -> tuple[int | None, float | None]:
    """A queued job's position and estimated start (None, None for any other); in a thread."""
    if job.status != Status.QUEUED:
        return None, None
    position = state.store.position(job.id)
    if position is None:  # it left the queue just now
        return None, None
    return position, _estimate(state, job)


def _estimate(state: Any, job: JobInfo) -> float | None:
    """``estimated_start_seconds`` of ``job`` if it is queued now; in a thread."""
    return estimate_start(state.store, replicas_of(state), dataclasses.replace(job, status=Status.QUEUED))

@router.get("/v1/jobs")
async def list_jobs(request: Request, key: ApiKey) -> dict:
    store = request.app.state.store
    jobs = await in_thread(store.jobs_of, key.id)
    return {"jobs": [_summary(job) for job in jobs]}

@router.get("/v1/jobs/{job_id}")
async def job_status(job_id: str, request: Request, key: ApiKey, log_offset: int = 0) -> dict:
    hub = request.app.state.hub
    live = hub.live_logs(job_id)  # read before the store: see Hub for why this order is safe
    job = await _owned_job(request, job_id, key)
    logs = job.logs if job.terminal or live is None else live
    position, estimate = await in_thread(_place, request.app.state, job)
    offset = max(0, log_offset)
    return {**_summary(job), "position": position, "estimated_start_seconds": estimate,
            "logs": logs[offset:], "log_length": len(logs), "error": job.error}

@router.get("/v1/jobs/{job_id}/result")
async def job_result(job_id: str, request: Request, key: ApiKey) -> Response:
    store = request.app.state.store
    job = await _owned_job(request, job_id, key)
    if not job.terminal:
        raise HTTPException(409, (
            f"job {job_id} is not finished (status {job.status}); wait for it on "
            f"/v1/jobs/{job_id}/events or poll /v1/jobs/{job_id}"
        ))
    data = await in_thread(store.result, job_id)
    if data is None and job.error:  # ended by the store, not a worker (its server stopped)
        data = JobResult(Status.ERROR, error=JobError.from_wire(job.error)).frame()
    if data is None:
        data = JobResult.failed("InternalError", f"the result of job {job_id} was not stored").frame()
    return Response(content=data, media_type="application/octet-stream")

@router.delete("/v1/jobs/{job_id}/result")
async def delete_result(job_id: str, request: Request, key: ApiKey) -> dict:
    """The owner has the result: drop it now rather than at expiry, freeing the key's stored-bytes
    quota (what a long remote extraction does after writing each chunk). Fetching it later
    returns an error that says it was deleted."""
    store = request.app.state.store
    job = await _owned_job(request, job_id, key)
    if not job.terminal:
        raise HTTPException(409, f"job {job_id} is not finished (status {job.status}); it has no result yet")
    note = JobResult.failed("ResultDeleted", f"the result of job {job_id} was deleted by its owner").frame()
    freed = await in_thread(store.replace_result, job_id, note)
    return {"id": job_id, "status": job.status, "deleted": True, "freed_bytes": freed}

@router.delete("/v1/jobs/{job_id}")
async def cancel(job_id: str, request: Request, key: ApiKey) -> dict:
    """A running job is flagged in the store, which the feeder running it (in this process or
    another one on the same database) looks at every half second; this one is also told at once.
    The answer waits up to ``_CANCEL_WAIT`` seconds for the job to end: ``cancelled`` says whether
    it did, ``cancel_requested`` that a running job was asked to stop."""
    _config, store, hub, worker = _state(request)
    job = await _owned_job(request, job_id, key)
    if job.terminal:
        return {"id": job_id, "status": job.status, "cancelled": False}
    result = JobResult.failed("Cancelled", "the job was cancelled by its owner before it ran").frame()
    status = await in_thread(store.cancel, job_id, result=result)
    if status == Status.CANCELLED:
        hub.publish(job_id, {"status": Status.CANCELLED})
        return {"id": job_id, "status": Status.CANCELLED, "cancelled": True}
    if status == Status.RUNNING:
        worker.cancel(job_id)
        deadline = time.monotonic() + _CANCEL_WAIT
        while time.monotonic() < deadline:
            job = await _owned_job(request, job_id, key)
            if job.terminal:
                break
            await asyncio.sleep(0.1)
    job = await _owned_job(request, job_id, key)
    return {"id": job_id, "status": job.status, "cancelled": job.status == Status.CANCELLED,
            "cancel_requested": status == Status.RUNNING}

@router.websocket("/v1/jobs/{job_id}/events")
async def events(websocket: WebSocket, job_id: str) -> None:
    await _session(websocket, lambda: _stream_events(websocket, job_id),
                   f"the events websocket of job {job_id}")


async def _session(websocket: WebSocket, serve: Callable[[], Awaitable[None]], what: str) -> None:
    """A websocket accepted, served by ``serve()``, and closed whatever happened; an error of ours is
    logged, never sent."""
    await websocket.accept()
    try:
        await serve()
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away (RuntimeError: starlette's "send after close")
    except Exception:
        websocket.app.state.say(f"error on {what}:\n{traceback.format_exc()}")
    with contextlib.suppress(Exception):
        await websocket.close()


async def _keyed(websocket: WebSocket) -> tuple[KeyInfo, str] | None:
    """The websocket caller's key and its text; None (refused with 401, closed) without a valid one."""
    info, key = await key_of(websocket)
    if info is None or key is None:
        await websocket.send_json({"error": BAD_KEY if key else MISSING_KEY, "code": 401})
        await websocket.close(code=4401)
        return None
    return info, key


async def _stream_events(websocket: WebSocket, job_id: str) -> None:
    store, hub = websocket.app.state.store, websocket.app.state.hub
    keyed = await _keyed(websocket)
    if keyed is None:
        return
    info = keyed[0]
    job = await in_thread(store.get, job_id)
    if job is None or job.key_id != info.id:
        await websocket.send_json({"error": f"no job {job_id!r} for this API key", "code": 404})
        await websocket.close(code=4404)
        return
    queue, job, logs = await in_thread(hub.subscribe, job_id)
    try:
        result = await _follow(websocket, queue, job, logs)
    finally:
        hub.unsubscribe(job_id, queue)
    if websocket.query_params.get("result") == "1":
        await _send_result(websocket, job_id, result)


@router.websocket("/v1/jobs/run")
async def run(websocket: WebSocket) -> None:
    """Submit and follow jobs over one connection (``remote=True`` uses it): the key first (as on
    the events websocket), then per job: the framed request (binary) -> ``{"id", "status":
    "QUEUED", "position", "model"}`` -> the job's events -> its result (as ``?result=1``). A refused
    request gets ``{"error", "code"}`` (the status POST /v1/jobs would answer) and the connection
    stays open for the next one. It saves a job the POST, a websocket handshake and the result's
    GET; the key is checked again for every job (a revoked key stops at its next job)."""
    await _session(websocket, lambda: _run_jobs(websocket), "the run websocket")


async def _run_jobs(websocket: WebSocket) -> None:
    state = websocket.app.state
    keyed = await _keyed(websocket)
    if keyed is None:
        return
    key = keyed[1]
    while True:
        message = await websocket.receive()
        body = message.get("bytes")
        if message.get("type") != "websocket.receive" or body is None:
            return  # closed, or a text message: the client is done
        try:
            if len(body) > state.config.max_request_bytes:
                raise HTTPException(413, (
                    f"the request is {len(body):,} bytes, over this server's limit of "
                    f"{state.config.max_request_bytes:,} bytes (max_request_bytes); send smaller inputs "
                    "or fewer values (tensors the block reads travel with it)"))
            accepted = await _accept(state, key, body, listen=True)  # the key checked for every job
        except HTTPException as err:
            await websocket.send_json({"error": err.detail, "code": err.status_code})
            if err.status_code == 401:  # revoked meanwhile
                await websocket.close(code=4401)
                return
            continue
        del body
        job_id = accepted["id"]
        queue, job, logs = accepted.pop("listening")
        try:  # its first event is the answer to the submit: with the job's id and model
            result = await _follow(websocket, queue, job, logs, answer=accepted)
        finally:
            state.hub.unsubscribe(job_id, queue)
        await _send_result(websocket, job_id, result)


async def _send_result(websocket: WebSocket, job_id: str, data: bytes | None = None) -> None:
    """``?result=1``: after the final event, the result itself (what GET /v1/jobs/{id}/result
    answers) as one binary message, saving the client that request; over ``_WS_RESULT_BYTES``, a
    ``{"result": "fetch"}`` text message instead (the client GETs it). ``data``: the result as
    stored, when the final event brought it (read from the store otherwise)."""
    if data is None:
        store = websocket.app.state.store
        job = await in_thread(store.get, job_id)
        if job is None or not job.terminal:
            return  # no final event was sent (the job was deleted meanwhile): the client polls
        data = await in_thread(store.result, job_id)
    if data is None or len(data) > _WS_RESULT_BYTES:
        await websocket.send_json({"result": "fetch"})
        return
    await websocket.send_bytes(data)

async def _follow(websocket: WebSocket, queue: asyncio.Queue, job: JobInfo | None, logs: str, *,
                  answer: dict | None = None) -> bytes | None:
    """Send the job's events until the final one; returns the result as stored when the final event
    brought it (a feeder of this process finished the job), else None. ``answer``: a submit's answer
    (its id, model and place in the queue), sent with the first event."""
    state = websocket.app.state
    store = state.store
    if job is None:
        return
    created = job.created

    async def send(event: dict) -> None:
        await websocket.send_json({**event, "elapsed": round(time.time() - created, 3)})

    status = job.status
    sent = len(logs)  # characters of printed output sent so far: where the stored output resumes
    if answer is not None and status == Status.QUEUED:  # just queued: its place is known
        position, estimate = answer["position"], None
    else:
        position, estimate = await in_thread(_place, state, job)
    first: dict[str, Any] = {**(answer or {}), "status": status, "position": position}
    if status == Status.QUEUED:
        first["estimated_start_seconds"] = estimate
    # The store's note (set by whichever API process runs the job), else this process's latest.
    note = None if job.terminal else (job.note or state.hub.note(job.id))
    if note:
        first["note"] = note
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
            current = await in_thread(store.get, job.id)
            if current is None:
                return
            if current.terminal:
                # Ended with no final event here: it ran in another API process on the database, so
                # its output and error are in the store only (which has all of it: what was sent
                # here live is skipped, and events still on their way here are dropped).
                final: dict[str, Any] = {"status": current.status, "position": None}
                if current.logs[sent:]:
                    final.update(log=current.logs[sent:], offset=sent)
                if current.error:
                    final["error"] = current.error
                await send(final)
                return
            beat = time.monotonic() - last_sent >= _HEARTBEAT
            if current.status == Status.QUEUED:
                now_position = await in_thread(store.position, job.id)
                if now_position != position or beat:  # the estimate, only when something is sent
                    position = now_position
                    await send({"status": Status.QUEUED, "position": position,
                                "estimated_start_seconds": await in_thread(_estimate, state, current)})
                    last_sent = time.monotonic()
                continue
            if current.note and current.note != note:
                # Set by another API process running the job (this one's come as events).
                note = current.note
                await send({"status": current.status, "position": None, "note": note})
                last_sent = time.monotonic()
            elif beat:
                # Also how a client that went away is noticed.
                await send({"status": current.status, "position": position})
                last_sent = time.monotonic()
            continue
        if event.get("status") != Status.QUEUED:
            position = None
        else:
            position = event.get("position", position)
            event = {**event, "estimated_start_seconds": await in_thread(_estimate, state, job)}
        if "note" in event:
            note = event["note"]
        result = event.pop(RESULT, None)
        sent += len(event.get("log") or "")
        await send({**event, "position": position})
        last_sent = time.monotonic()
        if event.get("status") in FINAL:
            return result


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
            "attempts": job.attempts, "note": job.note}
