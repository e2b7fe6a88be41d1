"""The dashboard: one HTML page at ``/`` and the JSON it polls every second.

Offers:
    router              GET /              the page (no key needed to load it: it asks for one)
                        GET /v1/dashboard  what the caller's key may see, as JSON
    operator_view(state) -> dict           the whole server (models, queue, jobs, replicas, batching)
    user_view(state, key) -> dict          one key's own jobs

What a key sees is decided here, on the server: a user key gets its own jobs and nothing else
(not even how long the queue is); only an operator key (``glassbox keys create NAME --operator``)
gets the ``operator`` part, where other tenants appear by key *name* and job id, with a status
and the first line of an error, never their code, values, printed output or results::

    {"role": "user" | "operator", "key": {"id", "name"}, "now": t, "server": {...},
     "jobs": [{"id", "model", "status", "position", "estimated_start_seconds", "note", "age",
               "duration", "result_bytes", "error", ...}],
     "operator": {"models", "queue", "running", "recent", "replicas", "batching", "totals"}}

The page (``dashboard_page.py``) builds every table with ``textContent``, so job names, printed
output and error messages are shown as text and never parsed as HTML; the key lives in the tab's
``sessionStorage`` and travels as the ``X-API-Key`` header, never in a URL. A proxy that adds the
key header itself can serve the page too: ``GET /`` with a valid key header loads the page
without the key form, and the page's requests leave the header to the proxy.

A queued job's ``estimated_start_seconds`` and a running job's ``note`` are those of its REST
status (``jobs_routes.py``; the estimator: ``queue_wait.py``).
"""

from __future__ import annotations

import html
import json
import secrets
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from ...remote.job import FINAL, Status
from ...version import __version__
from ..store import JobInfo, KeyInfo
from . import models_routes
from .auth import ApiKey, in_thread, presented_key
from .dashboard_page import PAGE
from .queue_wait import queue_estimates, replicas_of

__all__ = ["operator_view", "router", "user_view"]

_OWN_JOBS = 50  # a user's newest jobs on the page
_RECENT_JOBS = 20  # finished jobs of every key on the operator's page
_QUEUE_ROWS = 200  # the queue table stops here; the total is still counted
_ERROR_LINE = 300

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(request: Request) -> HTMLResponse:
    key = presented_key(request.headers)
    # A key that came as a header (a proxy adds it) is never written into the page: the page only
    # learns that it need not ask for one.
    from_header = bool(key) and await in_thread(request.app.state.store.authenticate, key) is not None
    nonce = secrets.token_urlsafe(16)
    body = PAGE.substitute(nonce=html.escape(nonce), version=html.escape(__version__),
                           auth="header" if from_header else "form", final=json.dumps(sorted(FINAL)))
    return HTMLResponse(body, headers={
        "Content-Security-Policy": (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        ),
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    })


@router.get("/v1/dashboard")
async def dashboard(request: Request, key: ApiKey) -> dict:
    state = request.app.state
    answer = await in_thread(user_view, state, key)
    if key.operator:
        answer["role"] = "operator"
        answer["operator"] = await in_thread(operator_view, state)
        answer["operator"]["models"] = (await models_routes.models(request))["models"]
    return answer


def user_view(state: Any, key: KeyInfo) -> dict:
    """The caller's own newest jobs: status, queue position and estimated start, note, timings,
    result size, error line, and how much it printed (the page reads the output itself from
    ``/v1/jobs/{id}``)."""
    store, hub = state.store, state.hub
    now = time.time()
    jobs = store.jobs_of(key.id)[-_OWN_JOBS:][::-1]
    sizes = store.result_sizes([job.id for job in jobs if job.has_result])
    waiting = any(job.status == Status.QUEUED for job in jobs)
    # One pass over the queue for all of them; the queue itself never leaves this function.
    estimates = queue_estimates(store, replicas_of(state), store.queued(), now) if waiting else {}
    rows = []
    for job in jobs:
        live = None if job.terminal else hub.live_logs(job.id)
        row = _job_row(job, now)
        row.update(position=store.position(job.id) if job.status == Status.QUEUED else None,
                   estimated_start_seconds=estimates.get(job.id),
                   log_length=len(job.logs if live is None else live), result_bytes=sizes.get(job.id))
        rows.append(row)
    return {"role": "user", "key": {"id": key.id, "name": key.name}, "now": now,
            "server": {"glassbox": __version__, "worker": state.worker.state}, "jobs": rows}


def operator_view(state: Any) -> dict:
    """Every tenant's queue and jobs (owners by key name), the replicas and batching: no job's
    code, values, output or results. ``models`` is added by the route (the /v1/models answer)."""
    store, worker, config = state.store, state.worker, state.config
    now = time.time()
    owners = {info.id: info.name for info in store.list_keys()}
    queued = store.queued()
    running = store.recent_jobs((Status.RUNNING,), limit=500)
    recent = store.recent_jobs(tuple(FINAL), limit=_RECENT_JOBS)
    replicas = worker.replicas()

    def owned(job: JobInfo) -> dict:
        return {**_job_row(job, now), "owner": owners.get(job.key_id, "(deleted key)")}

    estimates = queue_estimates(store, replicas, queued, now)
    batches = sum(int(replica.get("batches") or 0) for replica in replicas)
    batched_jobs = sum(int(replica.get("batched_jobs") or 0) for replica in replicas)
    return {
        "queue": [{**owned(job), "position": position, "estimated_start_seconds": estimates.get(job.id)}
                  for position, job in enumerate(queued[:_QUEUE_ROWS])],
        "running": [owned(job) for job in running[::-1]],
        "recent": [owned(job) for job in recent],
        "replicas": replicas,
        "batching": {"max_batch": config.max_batch, "batch_scope": config.batch_scope,
                     "batches": batches, "batched_jobs": batched_jobs,
                     "mean_batch": round(batched_jobs / batches, 2) if batches else None},
        "totals": {"queued": len(queued), "running": len(running), "keys": len(owners),
                   "worker": worker.state, "backend": config.backend},
    }


def _job_row(job: JobInfo, now: float) -> dict:
    end = job.finished or now
    return {"id": job.id, "model": job.model, "status": job.status, "created": job.created,
            "started": job.started, "finished": job.finished, "attempts": job.attempts,
            "age": round(now - job.created, 1),
            "duration": round(end - job.started, 2) if job.started else None,
            "note": job.note, "error": _error_line(job.error)}


def _error_line(error: dict | None) -> str | None:
    """``Type: first line of the message``: enough to see what failed, short enough for a table."""
    if not error:
        return None
    kind = str(error.get("type") or "Error")
    message = str(error.get("message") or "").strip()
    line = f"{kind}: {message.splitlines()[0]}" if message else kind
    return line if len(line) <= _ERROR_LINE else line[:_ERROR_LINE - 1] + "…"
