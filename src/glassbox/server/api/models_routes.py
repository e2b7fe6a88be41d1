"""The open endpoints: health, the served models, and the files a client builds a model from.

Offers:
    router              GET /v1/health, GET /v1/models, GET /v1/models/{name}/files (no key
                        needed; health and models show what follows the tenants' jobs, such as
                        worker and model state, replicas, running jobs, last use, only to a valid key)
    FileAnswers         the cache behind the files endpoint (``app.state.file_answers``)
    MODEL_FILES         the files of a served model's folder that /v1/models/{name}/files hands out
    read_model_files(path) -> {filename: text}   those of them that exist for one model
"""

from __future__ import annotations

import json
import os
import stat
import threading

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from ...remote.protocol import PROTOCOL_VERSION
from ...version import __version__
from .auth import in_thread, presented_key

__all__ = ["MODEL_FILES", "FileAnswers", "read_model_files", "router"]

# What a client needs to build a served model's module tree (on the meta device) and its
# tokenizer without downloading weights. Only these names are ever read, so no request can reach
# weights or anything else in (or outside) the folder. They are small text files; the cap only
# guards against a misconfigured folder.
MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja",
)
_MAX_MODEL_FILE_BYTES = 64 * 1024**2
# What /v1/models tells a caller without a key: the operator's catalog, nothing a job changes.
_CONFIGURED = ("load", "pinned", "replicas")

router = APIRouter()


async def _has_key(request: Request) -> bool:
    """Whether the request sends a valid API key. A wrong one is not an error on the open
    endpoints (a load balancer's check must not fail on it): it gets the anonymous answer."""
    key = presented_key(request.headers)
    return bool(key) and await in_thread(request.app.state.store.authenticate, key) is not None


@router.get("/v1/health")
async def health(request: Request) -> dict:
    """Open to all: that the server is up (``status`` ok), its version and protocol. With a valid
    API key also the worker state and what runs where (backend, replicas with pids, running jobs,
    restarts, batches): those follow other tenants' activity (a job that kills its worker makes it
    ``restarting``), so nobody sees them without a key."""
    state = request.app.state
    answer: dict = {"glassbox": __version__, "protocol": PROTOCOL_VERSION, "status": "ok"}
    if await _has_key(request):
        answer.update(worker=state.worker.state, running=state.worker.running_job is not None,
                      backend=state.config.backend, replicas=state.worker.replicas())
    return answer


@router.get("/v1/models")
async def models(request: Request) -> dict:
    """Open to all: each served model's name and what the operator configured (``load``,
    ``pinned``, ``replicas``). With a valid API key also what follows the tenants' jobs: its
    state (ready / loading / cold), ``last_used``, and the description of a loaded model (class,
    parameters, ... : an on-demand model has one only once some job loaded it)."""
    config, worker = request.app.state.config, request.app.state.worker
    described = worker.models
    if await _has_key(request):
        return {"models": [{"name": name, "status": worker.state, **described.get(name, {})}
                           for name in config.models]}
    return {"models": [{"name": name, **{k: v for k, v in described.get(name, {}).items()
                                         if k in _CONFIGURED}} for name in config.models]}


class FileAnswers:
    """Read once per model and kept as the finished answer: the files are those of the weights
    the worker loaded at start, and the endpoint needs no key, so a request must be cheap.

    A model served by hub id is answered from what the local cache held when the server started
    (``prime``, before any job ran), even if that was nothing: a job that loads it on demand may
    fill the cache, and the anonymous answer must not change with what tenants run. A folder with
    none of the files is read again on the next request (its operator may still be copying it)."""

    def __init__(self) -> None:
        self._answers: dict[str, bytes | None] = {}
        self._lock = threading.Lock()

    def prime(self, models: dict[str, str]) -> None:
        for name, path in models.items():
            self.get(name, path)

    def get(self, name: str, path: str) -> bytes | None:
        with self._lock:
            if name not in self._answers:
                files = read_model_files(path)
                if not files and os.path.isdir(path):
                    return None  # not kept: the folder may be filled yet
                self._answers[name] = json.dumps({"files": files}).encode("utf-8") if files else None
            return self._answers[name]


@router.get("/v1/models/{name}/files")
async def model_files(name: str, request: Request) -> Response:
    config = request.app.state.config
    if name not in config.models:
        served = ", ".join(sorted(config.models)) or "none"
        raise HTTPException(404, f"model {name!r} is not served here; this server serves: {served}")
    answer = await in_thread(request.app.state.file_answers.get, name, config.models[name])
    if answer is None:
        raise HTTPException(404, (
            f"model {name!r} is served, but none of its config or tokenizer files ("
            f"{', '.join(MODEL_FILES)}) is in a local folder on this server"
        ))
    return Response(content=answer, media_type="application/json")


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
