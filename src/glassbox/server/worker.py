"""The worker process that holds the models and runs jobs, and the API-side handle that feeds it.

Offers:
    WorkerHandle(config, store, on_event=None, say=print)   parent side, in the API process
      .start(wait=True)      spawn the worker, wait until its models are loaded, start feeding it
      .wake()                a job was queued: look at the store now rather than at the next tick
      .cancel(job_id)        stop a running job (kills and restarts the worker); False if not running
      .stop()                end the feeder and the worker
      .state / .models / .error / .pid / .running_job
    WorkerStartError         the worker could not start or load its models
    SENSITIVE_ENV            what an environment variable's name must not look like to reach the worker

Process layout and why::

    API process (keys, database)                       worker process (models, no secrets)
    ───────────────────────────                        ──────────────────────────────────
    feeder thread:                                     _worker_main:
      store.next_queued() ── claim ──► pipe ─ job ──►    execute.run_job(models, envelope, blob,
      wait(pipe, sentinel, deadline)  ◄── log ────────        log=<send LOG>, limits=...)
      store.finish(...)               ◄── result ─────
      deadline passed / cancel: kill, ERROR/CANCELLED, respawn (queue untouched: it is in the store)
      worker died (OOM kill, segfault): ERROR for its job, respawn

- The worker is started with the ``spawn`` method: a fresh interpreter that inherits no memory of
  the API process (no database engine, no keys), and it is given only the model specs, the
  executor's module name and the torch thread count. Environment variables whose names look like
  secrets (``SENSITIVE_ENV``) are removed before it starts and again inside it.
- Both directions of the pipe carry ``framing`` messages (JSON + bytes), never pickle: the API
  process must not unpickle what a process running untrusted code sends it.
- Jobs run strictly one at a time in FIFO order; the deadline counts from when the worker receives
  the job. Killing is the only way to stop arbitrary code, so cancel and timeout both kill.
- A worker left behind by an API process that died (``kill -9``) notices its parent is gone and
  exits, so a restarted server does not find the old one still holding the models' memory.
- Every job starts from ``torch.manual_seed(0)``: sampling inside a job is reproducible and no job
  inherits the random state of the one before.
- Memory: the worker limits itself to ``max_memory_bytes`` (``RLIMIT_DATA``, set before torch is
  imported, so the models count too). An allocation over it fails inside the job (torch's
  "can't allocate memory", Python's MemoryError) and the job ends with a MemoryError that names
  the limit; the worker process lives on, so the next job does not wait for a restart. Without a
  limit the same job would be killed by the kernel's OOM killer, or take the machine down with it.
  Why ``RLIMIT_DATA`` and not ``RLIMIT_AS``: both stop ``torch.zeros(5_000_000_000)`` here (measured
  on CPU: the same error, and both models load and run under a 4 GiB limit), but ``RLIMIT_AS``
  counts address space that holds no memory: glibc's per-thread malloc arenas (64 MiB reserved
  each), memory-mapped weight files, and CUDA's unified-address reservation (far more than the
  GPU has), which makes CUDA fail to initialise under any realistic limit. ``RLIMIT_DATA`` counts
  private writable mappings, i.e. memory a job can actually fill (Linux >= 4.7).
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import re
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from ..remote.framing import frame, unframe
from ..remote.protocol import PROTOCOL_VERSION, ProtocolError
from .config import ServerConfig
from .store import JobStore

__all__ = ["SENSITIVE_ENV", "WorkerHandle", "WorkerStartError", "error_result", "is_out_of_memory"]

SENSITIVE_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|DB_URL|DATABASE|COOKIE|SESSION",
                           re.IGNORECASE)
_ENV_LOCK = threading.Lock()
_POLL = 0.05  # seconds between looks at the deadline / cancel flag while a job runs
_GIB = 1024**3
# How allocation failures read once the limit is hit: torch's CPU allocator, libc's errno text,
# and Python's own MemoryError (which has no message for a plain allocation failure).
_ALLOCATION_FAILED = re.compile(r"can't allocate memory|Cannot allocate memory|std::bad_alloc")


class WorkerStartError(RuntimeError):
    """The worker process could not start or could not load its models."""


def is_out_of_memory(error: dict) -> bool:
    """Whether a job's error is a failed host-memory allocation (and not, say, CUDA running out of
    GPU memory, or a size limit of the server, which say what they are themselves)."""
    kind, message = str(error.get("type", "")), str(error.get("message", ""))
    if "CUDA" in message or "GPU" in message or "server" in message:
        return False
    if kind == "MemoryError":
        return True
    return kind in ("RuntimeError", "OutOfMemoryError") and bool(_ALLOCATION_FAILED.search(message))


def error_result(kind: str, message: str) -> dict:
    """A result envelope for a job the server itself ended (time limit, crash, cancel)."""
    from .. import __version__

    return {"protocol": PROTOCOL_VERSION, "glassbox": __version__, "kind": "result", "status": "ERROR",
            "error": {"type": kind, "message": message, "lineno": None, "line": None}}


# ================================================================ inside the worker process


def _worker_main(conn: multiprocessing.connection.Connection, specs: dict[str, str], executor: str,
                 torch_threads: int, max_memory_bytes: int = 0) -> None:
    _scrub_environment()
    _exit_with_parent()
    # Before anything big is imported or loaded: the models count toward the limit, so a server
    # whose limit cannot even hold them fails at start, saying so, rather than at the first job.
    limit = _limit_memory(max_memory_bytes)
    started = time.monotonic()
    try:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        try:
            torch.set_num_interop_threads(1)  # jobs run one at a time; fewer idle threads
        except RuntimeError:
            pass  # already fixed by an import that ran parallel work: harmless
        module = importlib.import_module(executor)
        models = module.load_models(specs)
    except BaseException as err:  # the parent must hear why, whatever it was
        error = traceback.format_exc()
        if limit and is_out_of_memory({"type": type(err).__name__, "message": str(err)}):
            error += (f"\nThe worker's memory limit is {_gib(limit)} GiB (max_memory_bytes, models "
                      "included) and starting it and loading the models needs more: raise it, or 0 for no "
                      "limit.")
        _send(conn, {"op": "failed", "error": error})
        return
    _send(conn, {"op": "ready", "models": {name: _describe(model) for name, model in models.items()},
                 "seconds": round(time.monotonic() - started, 3), "threads": torch.get_num_threads(),
                 "memory": _memory_in_use(), "memory_limit": limit})
    while True:
        try:
            message, blob = unframe(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the parent is gone
        if message.get("op") != "job":
            return  # "stop", or anything unexpected: end cleanly
        job_id = str(message["job"])
        torch.manual_seed(0)
        result, out = _run_one(module, models, job_id, blob, dict(message.get("limits") or {}), conn)
        if limit and result.get("status") == "ERROR" and is_out_of_memory(result.get("error") or {}):
            result = _over_memory_limit(result, limit)
        try:
            _send(conn, {"op": "result", "job": job_id, "result": result}, out)
        except (OSError, ProtocolError, MemoryError) as err:  # MemoryError: framing a huge result
            try:
                _send(conn, {"op": "result", "job": job_id,
                             "result": error_result("InternalError", f"cannot send the result: {err}")})
            except OSError:
                return
        del result, out
        # The reply is on its way; now, before the next job, verify and restore the weights.
        after_job = getattr(module, "after_job", None)
        if after_job is not None:
            after_job(models)


def _run_one(module: Any, models: dict, job_id: str, request: bytes, limits: dict,
             conn: multiprocessing.connection.Connection) -> tuple[dict, bytes]:
    # Capped here, in the worker, so a print loop cannot flood the pipe and the API process.
    left = [int(limits.pop("max_log_bytes", 0) or 0) or None]  # bytes still allowed; None: no cap

    def log(text: str) -> None:
        text = str(text)
        if left[0] is not None:
            if left[0] <= 0:
                return
            data = text.encode("utf-8", "replace")
            if len(data) > left[0]:
                text = data[:left[0]].decode("utf-8", "ignore")
                text += "\n[glassbox] later output of this job was dropped (over the server's log limit)\n"
                left[0] = 0
            else:
                left[0] -= len(data)
        _send(conn, {"op": "log", "job": job_id, "text": text})

    try:
        envelope, blob = unframe(request)
        result, out = module.run_job(models, envelope, blob, log=log, limits=limits)
        if not isinstance(result, dict):
            raise TypeError(f"run_job returned {type(result).__name__}, not a dict")
        return result, bytes(out or b"")
    except Exception as err:  # run_job handles user errors; this is a server bug
        return error_result("InternalError", f"the server failed to run this job: {err!r}"), b""


def _limit_memory(limit: int) -> int:
    """Cap this process's private writable memory at ``limit`` bytes (0: leave it alone); returns
    the limit in force (the lower one if the process already had a lower hard limit)."""
    if limit <= 0:
        return 0
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    # The hard limit too: nothing in the worker may raise it again.
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    return limit


def _memory_in_use() -> int | None:
    """This process's private writable memory (what RLIMIT_DATA counts), in bytes."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _over_memory_limit(result: dict, limit: int) -> dict:
    """The job's error, reworded to say which limit it ran into and what to do."""
    error = dict(result.get("error") or {})
    original = str(error.get("message") or "").strip()
    used = _memory_in_use()  # the job's memory is freed by now: this is the models and the worker
    held = f"; the models and the worker hold {_gib(used)} GiB of it" if used else ""
    asked = re.search(r"tried to allocate (\d+) bytes", original)
    what = f": an allocation of {_gib(int(asked.group(1)))} GiB failed" if asked else ""
    error["message"] = (
        f"the job exceeded the worker memory limit of {_gib(limit)} GiB (the server's "
        f"max_memory_bytes{held}){what}. Use smaller tensors or batches, or save fewer values"
    )
    error["type"] = "MemoryError"
    return {**result, "error": error}


def _send(conn: multiprocessing.connection.Connection, message: dict, blob: bytes = b"") -> None:
    conn.send_bytes(frame(message, blob))


def _describe(model: Any) -> dict:
    module = getattr(model, "_module", model)
    info: dict[str, Any] = {"class": type(module).__name__}
    try:
        info["parameters"] = int(sum(p.numel() for p in module.parameters()))
    except Exception:  # a description is best effort
        pass
    config = getattr(module, "config", None)
    for attr in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size"):
        value = getattr(config, attr, None)
        if isinstance(value, (int, str)):
            info[attr] = value
    return info


def _scrub_environment() -> None:
    for name in list(os.environ):
        if SENSITIVE_ENV.search(name):
            del os.environ[name]


def _exit_with_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)  # orphaned: the API process died; free the models' memory now

    threading.Thread(target=watch, name="glassbox-parent-watch", daemon=True).start()


# ================================================================ in the API process


class WorkerHandle:
    """Runs queued jobs from ``store`` in a worker process, one at a time, first come first served.

        handle = WorkerHandle(ServerConfig(models={"gpt2": path}), store, on_event=print)
        handle.start()                  # returns once the models are loaded
        handle.wake()                   # after store.mark_queued(job_id)
    """

    def __init__(
        self,
        config: ServerConfig,
        store: JobStore,
        *,
        on_event: Callable[[str, dict], None] | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.on_event = on_event or (lambda job_id, event: None)
        self.say = say or (lambda text: None)
        self.state = "stopped"  # stopped | starting | ready | failed
        self.models: dict[str, dict] = {}
        self.error: str | None = None
        self.running_job: str | None = None
        self.restarts = 0
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # ------------------------------------------------------------ control

    def start(self, wait: bool = True) -> None:
        """Spawn the worker and start feeding it. With ``wait``, return once the models are loaded
        (raising ``WorkerStartError`` if they cannot be); otherwise load in the background."""
        if self._thread is not None:
            return
        if wait:
            self._spawn()
        self._thread = threading.Thread(target=self._feed, name="glassbox-feeder", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """Ask the feeder to kill the job ``job_id`` if it is the one running (it then becomes
        CANCELLED and the worker restarts). Returns whether it was running."""
        with self._lock:
            if self.running_job != job_id:
                return False
            self._cancel.add(job_id)
        self._wake.set()
        return True

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._kill()
        self.state = "stopped"

    # ------------------------------------------------------------ process

    def _spawn(self) -> None:
        self.state = "starting"
        self.error = None
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe(duplex=True)
        process = context.Process(
            target=_worker_main,
            args=(child_conn, dict(self.config.models), self.config.executor, self.config.torch_threads,
                  self.config.max_memory_bytes),
            name="glassbox-worker",
            daemon=True,
        )
        # The child inherits the environment as it is at start: take secrets out for that moment.
        with _ENV_LOCK:
            hidden = {name: os.environ.pop(name) for name in list(os.environ) if SENSITIVE_ENV.search(name)}
            try:
                process.start()
            finally:
                os.environ.update(hidden)
        child_conn.close()
        self._process, self._conn = process, parent_conn
        names = ", ".join(self.config.models) or "no models"
        self.say(f"worker {process.pid}: loading {names}")
        deadline = time.monotonic() + self.config.worker_start_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill()
                limit = self.config.worker_start_timeout
                self._failed(f"the worker did not load its models within {limit:g} s "
                             "(the server's worker_start_timeout)")
            ready = multiprocessing.connection.wait([parent_conn, process.sentinel], min(remaining, 1.0))
            if self._stopping.is_set():
                self._kill()
                raise WorkerStartError("the server is stopping")
            if parent_conn in ready:
                try:
                    message, _ = unframe(parent_conn.recv_bytes())
                except (EOFError, OSError, ProtocolError):
                    message = {"op": "failed", "error": "the worker process exited while loading the models"}
                if message.get("op") == "ready":
                    self.models = dict(message.get("models") or {})
                    self.state = "ready"
                    self.say(f"worker {process.pid}: ready in {message.get('seconds')} s "
                             f"({message.get('threads')} torch threads{_memory_note(message)})")
                    return
                self._kill()
                self._failed(str(message.get("error") or message))
            elif process.sentinel in ready:
                code = process.exitcode
                self._kill()
                self._failed(f"the worker process exited while loading the models ({_exit_reason(code)})")

    def _failed(self, error: str) -> None:
        self.state = "failed"
        self.error = error
        raise WorkerStartError(f"the worker could not load its models:\n{error}")

    def _kill(self) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join(10)
            if process.exitcode is not None:
                process.close()
        if conn is not None:
            conn.close()

    def _alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    # ------------------------------------------------------------ feeding

    def _feed(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            try:
                if not self._alive():
                    self._kill()
                    try:
                        self._spawn()
                        backoff = 1.0
                    except WorkerStartError as err:
                        if self._stopping.is_set():
                            return
                        self.say(f"{err}\nretrying in {backoff:.0f} s")
                        self._stopping.wait(backoff)
                        backoff = min(backoff * 2, 60.0)
                        continue
                job = self.store.next_queued()
                if job is None:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                # Known as running before the claim, so a cancel that sees RUNNING in the store
                # always finds it here.
                with self._lock:
                    self.running_job = job.id
                if self.store.claim(job.id):
                    self._run(job.id)
                else:
                    with self._lock:
                        self.running_job = None
            except Exception:  # the feeder must survive anything (e.g. a database hiccup)
                self.say(f"feeder error (continuing):\n{traceback.format_exc()}")
                self._stopping.wait(0.5)

    def _run(self, job_id: str) -> None:
        logs: list[str] = []
        try:
            self.on_event(job_id, {"status": "RUNNING"})
            request = self.store.request(job_id)
            if request is None:
                self._finish(job_id, error_result("InternalError", "the request of this job was lost"), logs)
                return
            limits = {**self.config.limits(), "max_log_bytes": self.config.max_log_bytes}
            conn, process = self._conn, self._process
            assert conn is not None and process is not None
            try:
                conn.send_bytes(frame({"op": "job", "job": job_id, "limits": limits}, request))
            except OSError:
                self._crashed(job_id, logs)
                return
            deadline = time.monotonic() + self.config.max_seconds
            while True:
                if self._stopping.is_set():
                    # Not the job's fault: it runs again, from the start, when the server is back.
                    self._kill()
                    self.store.requeue(job_id)
                    return
                if job_id in self._cancel:
                    self._kill()
                    cancelled = error_result("Cancelled", "the job was cancelled by its owner")
                    self._finish(job_id, cancelled, logs, status="CANCELLED")
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._kill()
                    limit = f"{self.config.max_seconds:g}"
                    self._finish(job_id, error_result(
                        "TimeoutError",
                        f"the job exceeded the time limit of {limit} s and was stopped "
                        "(the server's max_seconds)"), logs)
                    return
                ready = multiprocessing.connection.wait([conn, process.sentinel], min(remaining, _POLL))
                if conn in ready:
                    try:
                        message, blob = unframe(conn.recv_bytes())
                    except (EOFError, OSError, ProtocolError):
                        self._crashed(job_id, logs)
                        return
                    if message.get("job") != job_id:
                        continue  # left over from a job that was already settled
                    if message.get("op") == "log":
                        text = str(message.get("text", ""))
                        offset = sum(len(chunk) for chunk in logs)
                        logs.append(text)
                        self.on_event(job_id, {"status": "RUNNING", "log": text, "offset": offset})
                    elif message.get("op") == "result":
                        self._completed(job_id, message.get("result"), blob, logs)
                        return
                elif process.sentinel in ready:
                    self._crashed(job_id, logs)
                    return
        finally:
            with self._lock:
                self.running_job = None
                self._cancel.discard(job_id)

    def _completed(self, job_id: str, result: Any, blob: bytes, logs: list[str]) -> None:
        if not isinstance(result, dict):
            result = error_result("InternalError", "the worker sent a malformed result")
            blob = b""
        if len(blob) > self.config.max_result_bytes:
            result = error_result("MemoryError", (
                f"the result is {len(blob):,} bytes, over this server's limit of "
                f"{self.config.max_result_bytes:,} (max_result_bytes); save fewer or smaller values"))
            blob = b""
        if "protocol" not in result:
            result = {"protocol": PROTOCOL_VERSION, "kind": "result", **result}
        self._finish(job_id, result, logs, blob=blob)

    def _crashed(self, job_id: str, logs: list[str]) -> None:
        code = None
        if self._process is not None:
            self._process.join(1)  # the pipe can close a moment before the exit status is known
            code = self._process.exitcode
        self._kill()
        self._finish(job_id, error_result("WorkerCrashed", (
            f"the worker process died while running this job ({_exit_reason(code)}); the job may "
            "need more memory than the server has. The worker was restarted.")), logs)

    def _finish(self, job_id: str, result: dict, logs: list[str], *, blob: bytes = b"",
                status: str | None = None) -> None:
        status = status or ("COMPLETED" if result.get("status") == "COMPLETED" else "ERROR")
        error = result.get("error") if status != "COMPLETED" else None
        try:
            data = frame(result, blob)
        except ProtocolError as err:
            result = error_result("InternalError", f"the result could not be stored: {err}")
            status, error, data = "ERROR", result["error"], frame(result)
        if self.store.finish(job_id, status, result=data, error=error, logs="".join(logs)):
            event: dict[str, Any] = {"status": status}
            if error:
                event["error"] = error
            self.on_event(job_id, event)


def _gib(size: int) -> str:
    return f"{size / _GIB:.1f}" if size >= _GIB else f"{size / _GIB:.2f}"


def _memory_note(message: dict) -> str:
    used, limit = message.get("memory"), message.get("memory_limit")
    if not isinstance(used, int):
        return ""
    note = f", {_gib(used)} GiB in use"
    return note + (f" of its {_gib(limit)} GiB limit" if isinstance(limit, int) and limit else "")


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ", often the out-of-memory killer" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"
