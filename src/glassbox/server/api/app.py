"""The HTTP API of a glassbox server.

Offers:
    create_app(config, *, store=None, say=None) -> FastAPI     the whole server, ready for uvicorn

Endpoints: ``models_routes.py`` (health, models, model files: no key), ``jobs_routes.py``
(submit, list, status, live events, result, cancel), each listing its routes and refusals, and
``dashboard.py`` (the page at ``/`` and the JSON it polls, ``/v1/dashboard``) and ``metrics.py``
(``/metrics`` in Prometheus' format, for operator keys).

Every endpoint but health, the two model ones and the dashboard page needs an API key
(``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; the websocket also takes ``{"api_key": ...}``
as its first message). A job is visible to the key that submitted it only: for any other key it
does not exist (404). Without a key nothing shows another tenant's activity: health says the
server is up and its version; models, the operator's catalog (names, load mode, pinned, replicas);
model files, those read when the server started; the page, a form asking for a key.

Work per request is bounded whatever its code: a submit's JSON part (code and value descriptions)
is at most ``max_request_json_bytes``, read in one of ``INTAKE_THREADS`` threads off the event
loop, and only blocks of up to 64 KiB are parsed for batching (jobs/batchable.py).

Request lifecycle::

    client                       API process (this file)                    worker process
    ──────                       ───────────────────────                    ──────────────
    POST /v1/jobs ──────────►  key ─► rate limit ─► sizes ─► (a thread) JobRequest.read
                               (the one read here) ─► model served? ─► batch key
                               store: RECEIVED ─► QUEUED ──► 202 {id}
    WS  /events   ◄────────── QUEUED (position n) ... (position 0)
                               feeder: claim ─► RUNNING ── bytes ──────►  JobRequest.read,
                                                                          run_job(...)
                  ◄────────── {"log": ...}  ◄──────────────────────────  print(...)
                               cut to the limits (output.py), store:
                               COMPLETED / ERROR + result (quota)  ◄───  JobResult
                  ◄────────── COMPLETED (+ the result's bytes, when asked: ?result=1)
    GET /result   ──────────►  framed result bytes (owner only; the client's fallback)
                               ... deleted ``result_ttl_seconds`` after it finished

Besides the routes' own refusals: 401 no or unknown key; an unexpected failure answers 500 and
the server goes on; a failure of the job itself is a job in state ERROR, not an HTTP error.
"""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ...version import __version__
from ..config import ServerConfig
from ..instances import Heartbeat, InstanceSlot
from ..store import JobStore
from ..workers.pool import WorkerPool
from . import dashboard, jobs_routes, metrics, models_routes
from .auth import RateLimiter, in_thread
from .hub import Hub

__all__ = ["create_app"]

INTAKE_THREADS = 2


def create_app(
    config: ServerConfig,
    *,
    store: JobStore | None = None,
    say: Callable[[str], None] | None = None,
) -> FastAPI:
    """The glassbox API for ``config``. Starting it (uvicorn runs the lifespan) settles jobs left
    by a previous run (of this server, or of another one on the same database that stopped), starts
    the worker and waits until the models are loaded; then it heartbeats (instances.py) until it stops.

        app = create_app(ServerConfig(models={"gpt2": path}))
        uvicorn.run(app, host="127.0.0.1", port=8765)
    """
    say = say or (lambda text: print(f"[glassbox] {text}", flush=True))
    own_store = store is None
    store = store or JobStore(config.database_url())
    hub = Hub(store)
    # The metrics see every event the workers publish (to time the jobs that finish here).
    measured = metrics.ServerMetrics(store, config)
    worker = WorkerPool(config, store, on_event=measured.watch(hub.publish), say=say)
    measured.attach(worker)
    heartbeat = Heartbeat(store, on_requeued=worker.wake, say=say)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.loop = asyncio.get_running_loop()
        janitor = slot = None
        if own_store:
            # The instance id of this server's previous life (same state dir), so that it settles at
            # once the jobs that life left running. Taken on start: an app never started holds no lock.
            slot = InstanceSlot(config.state_path())
            store.instance = slot.id
        try:
            counts = await in_thread(store.recover, timeout=heartbeat.timeout)
            if counts["requeued"] or counts["failed"] or counts["dropped"] or counts["queued"]:
                say(f"jobs from the previous run: {counts['queued']} still queued, {counts['requeued']} "
                    f"interrupted and queued again, {counts['failed'] + counts['dropped']} failed")
            heartbeat.start()
            await in_thread(store.delete_expired, config.result_ttl_seconds)
            await in_thread(worker.start)  # WorkerStartError here stops the server with the reason
            # Once the eager models are loaded and before jobs load others on demand (which may fill
            # the Hugging Face cache): see models_routes.FileAnswers.
            await in_thread(app.state.file_answers.prime, config.models)
            janitor = asyncio.create_task(_janitor())
            yield
        finally:
            if janitor is not None:  # else the worker did not start (and stopped itself)
                janitor.cancel()
                await in_thread(worker.stop)
            heartbeat.stop()
            with contextlib.suppress(Exception):  # others then take what it left at once, not in 30 s
                await in_thread(store.leave)
            hub.loop = None
            store.close()
            if slot is not None:
                slot.release()

    async def _janitor() -> None:
        period = max(1.0, min(60.0, config.result_ttl_seconds / 4))
        while True:
            await asyncio.sleep(period)
            try:
                await in_thread(store.delete_expired, config.result_ttl_seconds)
            except Exception:
                say(f"could not delete expired jobs (will retry):\n{traceback.format_exc()}")

    app = FastAPI(title="glassbox", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    state = app.state
    state.config, state.store, state.worker, state.hub, state.say = config, store, worker, hub, say
    state.metrics = measured
    state.limiter = RateLimiter(config.rate_limit_per_minute)
    state.intake = anyio.CapacityLimiter(INTAKE_THREADS)  # submits read (parsed) at once: jobs_routes
    state.file_answers = models_routes.FileAnswers()
    app.include_router(models_routes.router)
    app.include_router(jobs_routes.router)
    app.include_router(dashboard.router)
    app.include_router(metrics.router)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        say(f"error while serving {request.method} {request.url.path}:\n{traceback.format_exc()}")
        return JSONResponse({"detail": f"internal server error ({type(exc).__name__}); the server goes on"},
                            status_code=500)

    return app
