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

import contextlib
import importlib
import multiprocessing
import multiprocessing.connection
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from ..remote.framing import frame, unframe
from ..remote.protocol import PROTOCOL_VERSION, ProtocolError
from .config import ServerConfig
from .store import JobInfo, JobStore

__all__ = ["SENSITIVE_ENV", "WORKER_ENV", "ChannelClosed", "LocalProcess", "WorkerHandle", "WorkerStartError",
           "child_environment", "error_result", "handle_message", "is_out_of_memory"]

SENSITIVE_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|DB_URL|DATABASE|COOKIE|SESSION",
                           re.IGNORECASE)
_ENV_LOCK = threading.Lock()
_POLL = 0.05  # seconds between looks at the deadline / cancel flag while a job runs
_GIB = 1024**3
# How allocation failures read once the limit is hit: torch's CPU allocator, libc's errno text,
# and Python's own MemoryError (which has no message for a plain allocation failure).
_ALLOCATION_FAILED = re.compile(r"can't allocate memory|Cannot allocate memory|std::bad_alloc")


# Defaults for the processes that run jobs, unless the operator's environment says otherwise.
# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning. On a machine whose cores
# are shared (the API process, other replicas) spinning threads slowed a SmolLM2 forward pass from
# 91 ms to 1,960 ms (bench/throughput.py's findings); results are the same either way.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


@contextlib.contextmanager
def child_environment(keep: Callable[[str], bool] = lambda name: False) -> Iterator[None]:
    """While a process that will run jobs starts (it inherits the environment as it is then):
    no variable that looks like a secret (``SENSITIVE_ENV``, unless ``keep(name)``), and the
    ``WORKER_ENV`` defaults. The API process's own environment is put back afterwards."""
    with _ENV_LOCK:
        hidden = {name: os.environ.pop(name) for name in list(os.environ)
                  if SENSITIVE_ENV.search(name) and not keep(name)}
        added = [name for name in WORKER_ENV if name not in os.environ]
        os.environ.update({name: WORKER_ENV[name] for name in added})
        try:
            yield
        finally:
            for name in added:
                os.environ.pop(name, None)
            os.environ.update(hidden)


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
        if message.get("op") not in ("job", "batch"):
            return  # "stop", or anything unexpected: end cleanly

        def send(reply: dict, out: bytes = b"") -> None:
            _send(conn, reply, out)

        try:
            handle_message(module, models, message, blob, send, memory_limit=limit)
        except OSError:
            return  # the pipe is gone: so is the parent


def handle_message(module: Any, models: dict, message: dict, blob: bytes, send: Callable[[dict, bytes], None],
                   *, memory_limit: int = 0) -> None:
    """Run what one ``job`` or ``batch`` message asks (see ``WorkerHandle._send_jobs``), sending
    ``log`` and ``result`` messages through ``send(message, blob)``; then, with every reply on its
    way, verify and restore the weights (``after_job``). Shared by the local worker process and
    the Ray replicas, so both run jobs exactly alike."""
    limits = dict(message.get("limits") or {})
    if message.get("op") == "batch":
        ids = [str(job_id) for job_id in message["jobs"]]
        sizes = [int(size) for size in message["sizes"]]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        requests = [blob[start:start + size] for start, size in zip(offsets, sizes)]
    else:
        ids, requests = [str(message["job"])], [blob]
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(0)
    results = _run_many(module, models, ids, requests, limits, send)
    for job_id, (result, out) in zip(ids, results):
        if memory_limit and result.get("status") == "ERROR" and is_out_of_memory(result.get("error") or {}):
            result = _over_memory_limit(result, memory_limit)
        try:
            send({"op": "result", "job": job_id, "result": result}, out)
        except (ProtocolError, MemoryError) as err:  # MemoryError: framing a huge result
            send({"op": "result", "job": job_id,
                  "result": error_result("InternalError", f"cannot send the result: {err}")}, b"")
    del results
    # The replies are on their way; now, before the next job, verify and restore the weights.
    after_job = getattr(module, "after_job", None)
    if after_job is not None:
        after_job(models)


def _run_many(module: Any, models: dict, ids: list[str], requests: list[bytes], limits: dict,
              send: Callable[[dict, bytes], None]) -> list[tuple[dict, bytes]]:
    """One job alone, or several through the executor's ``run_batch`` (one forward pass) when
    it has one; their printed output is kept per job and sent before each one's result."""
    if len(ids) == 1 or getattr(module, "run_batch", None) is None:
        return [_run_one(module, models, job_id, request, dict(limits), send)
                for job_id, request in zip(ids, requests)]
    logs = [_job_log(job_id, int(limits.get("max_log_bytes", 0) or 0), send) for job_id in ids]
    job_limits = {k: v for k, v in limits.items() if k != "max_log_bytes"}
    try:
        items = [unframe(request) for request in requests]
        results = module.run_batch(models, items, logs=logs, limits=job_limits)
        if len(results) != len(ids):
            raise TypeError(f"run_batch returned {len(results)} results for {len(ids)} jobs")
        return [(result, bytes(out or b"")) for result, out in results]
    except Exception as err:  # run_batch isolates the jobs' own errors; this is a server bug
        failed = error_result("InternalError", f"the server failed to run this job: {err!r}")
        return [(failed, b"") for _ in ids]


def _job_log(job_id: str, max_bytes: int, send: Callable[[dict, bytes], None]) -> Callable[[str], None]:
    """A ``print`` target for one job: sends its output as ``log`` messages, capped at
    ``max_bytes`` (0: no cap) so a print loop cannot flood the pipe and the API process."""
    left = [max_bytes or None]  # bytes still allowed; None: no cap

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
        send({"op": "log", "job": job_id, "text": text}, b"")

    return log


def _run_one(module: Any, models: dict, job_id: str, request: bytes, limits: dict,
             send: Callable[[dict, bytes], None]) -> tuple[dict, bytes]:
    log = _job_log(job_id, int(limits.pop("max_log_bytes", 0) or 0), send)
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


class ChannelClosed(Exception):
    """The process (or Ray actor) on the other side of a channel is gone."""


class LocalProcess:
    """The channel to one spawned worker process on this machine (the ``local`` backend).

    Every channel offers the same few calls, which is all ``WorkerHandle`` uses (the Ray
    backend's ``RayReplica`` is the other one):

        start(stopping) -> ready      spawn and wait until the models are loaded (WorkerStartError)
        send(message, blob)           hand over a ``job`` / ``batch`` message
        receive(timeout)              the next ``log`` / ``result`` message, or None; ChannelClosed
        alive() / kill() / exit_reason() / pid / label / serves (model names it holds)
    """

    def __init__(self, config: ServerConfig, say: Callable[[str], None]) -> None:
        self.config = config
        self.say = say
        self.serves = list(config.models)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._exit_code: int | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def label(self) -> str:
        return f"worker {self.pid}"

    def start(self, stopping: threading.Event) -> dict:
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe(duplex=True)
        config = self.config
        process = context.Process(
            target=_worker_main,
            args=(child_conn, dict(config.models), config.executor, config.torch_threads,
                  config.max_memory_bytes),
            name="glassbox-worker",
            daemon=True,
        )
        with child_environment():
            process.start()
        child_conn.close()
        self._process, self._conn, self._exit_code = process, parent_conn, None
        names = ", ".join(config.models) or "no models"
        self.say(f"worker {process.pid}: loading {names}")
        deadline = time.monotonic() + config.worker_start_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                limit = config.worker_start_timeout
                raise WorkerStartError(f"the worker did not load its models within {limit:g} s "
                                       "(the server's worker_start_timeout)")
            ready = multiprocessing.connection.wait([parent_conn, process.sentinel], min(remaining, 1.0))
            if stopping.is_set():
                self.kill()
                raise WorkerStartError("the server is stopping")
            if parent_conn in ready:
                try:
                    message, _ = unframe(parent_conn.recv_bytes())
                except (EOFError, OSError, ProtocolError):
                    message = {"op": "failed", "error": "the worker process exited while loading the models"}
                if message.get("op") == "ready":
                    note = f"{message.get('threads')} torch threads{_memory_note(message)}"
                    return {**message, "note": note}
                self.kill()
                raise WorkerStartError(str(message.get("error") or message))
            if process.sentinel in ready:
                code = process.exitcode
                self.kill()
                raise WorkerStartError(
                    f"the worker process exited while loading the models ({_exit_reason(code)})")

    def send(self, message: dict, blob: bytes = b"") -> None:
        if self._conn is None:
            raise ChannelClosed("no worker process")
        try:
            self._conn.send_bytes(frame(message, blob))
        except OSError as err:
            raise ChannelClosed(str(err)) from None

    def receive(self, timeout: float) -> tuple[dict, bytes] | None:
        conn, process = self._conn, self._process
        if conn is None or process is None:
            raise ChannelClosed("no worker process")
        ready = multiprocessing.connection.wait([conn, process.sentinel], timeout)
        if conn in ready:
            try:
                return unframe(conn.recv_bytes())
            except (EOFError, OSError, ProtocolError):
                raise ChannelClosed("the pipe closed") from None
        if process.sentinel in ready:
            raise ChannelClosed("the worker exited")
        return None

    def exit_reason(self) -> str:
        if self._process is not None:
            self._process.join(1)  # the pipe can close a moment before the exit status is known
            self._exit_code = self._process.exitcode
        return _exit_reason(self._exit_code)

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def kill(self) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join(10)
            self._exit_code = process.exitcode
            if process.exitcode is not None:
                process.close()
        if conn is not None:
            conn.close()


class WorkerHandle:
    """Feeds queued jobs from ``store`` to one channel (a local worker process by default, or one
    Ray replica), first come first served; compatible jobs for the same model are claimed together
    and run as one batch (co-tenant batching, see ``cotenant.py``).

        handle = WorkerHandle(ServerConfig(models={"gpt2": path}), store, on_event=print)
        handle.start()                  # returns once the models are loaded
        handle.wake()                   # after store.mark_queued(job_id)

    Several handles may feed from one store (one per Ray replica): ``store.claim`` is atomic, so a
    job runs on exactly one of them. ``solo`` (shared by those handles) holds jobs that must run
    alone: the members of a batch that timed out or crashed, which then run one by one so that
    only the job at fault fails.
    """

    def __init__(
        self,
        config: ServerConfig,
        store: JobStore,
        *,
        on_event: Callable[[str, dict], None] | None = None,
        say: Callable[[str], None] | None = None,
        channel: Any = None,
        solo: set[str] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.on_event = on_event or (lambda job_id, event: None)
        self.say = say or (lambda text: None)
        self.channel = channel if channel is not None else LocalProcess(config, self.say)
        self.solo = solo if solo is not None else set()
        self.state = "stopped"  # stopped | starting | ready | restarting | failed
        self.models: dict[str, dict] = {}
        self.error: str | None = None
        self.running: list[str] = []
        self.restarts = 0
        self.batches = 0  # batches of more than one job run so far
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._keys: dict[str, Any] = {}  # job id -> batch key (None: runs alone)
        self._loaded_once = False

    @property
    def pid(self) -> int | None:
        return self.channel.pid

    @property
    def running_job(self) -> str | None:
        running = self.running
        return running[0] if running else None

    # ------------------------------------------------------------ control

    def start(self, wait: bool = True) -> None:
        """Start the worker and start feeding it. With ``wait``, return once the models are loaded
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
        """Ask the feeder to kill the job ``job_id`` if it is running here (it then becomes
        CANCELLED and the worker restarts). Returns whether it was running."""
        with self._lock:
            if job_id not in self.running:
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
        self.channel.kill()
        self.state = "stopped"

    # ------------------------------------------------------------ process

    def _spawn(self) -> None:
        self.state = "starting"
        self.error = None
        try:
            ready = self.channel.start(self._stopping)
        except WorkerStartError as err:
            self.state = "failed"
            self.error = str(err)
            raise WorkerStartError(f"the worker could not load its models:\n{err}") from None
        self.models = dict(ready.get("models") or {})
        if self._loaded_once:
            self.restarts += 1
        self._loaded_once = True
        self.state = "ready"
        self.say(f"{self.channel.label}: ready in {ready.get('seconds')} s ({ready.get('note', '')})")

    # ------------------------------------------------------------ feeding

    def _feed(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            try:
                if not self.channel.alive():
                    self.channel.kill()
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
                jobs = self._take()
                if not jobs:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._run(jobs)
            except Exception:  # the feeder must survive anything (e.g. a database hiccup)
                self.say(f"feeder error (continuing):\n{traceback.format_exc()}")
                with self._lock:
                    self.running = []
                self._stopping.wait(0.5)

    def _claim(self, job: JobInfo) -> bool:
        # Known as running before the claim, so a cancel that sees RUNNING in the store
        # always finds it here.
        with self._lock:
            self.running = [*self.running, job.id]
        if self.store.claim(job.id):
            return True
        with self._lock:
            self.running = [j for j in self.running if j != job.id]
        return False

    def _take(self) -> list[JobInfo]:
        """Claim the next queued job this channel serves and, when batching is on and it can
        share, compatible jobs queued now or within ``batch_window_ms``: one batch."""
        job = self.store.next_queued(self.channel.serves)
        if job is None or not self._claim(job):
            return []
        batch = [job]
        try:
            self._gather(job, batch)
        except Exception:  # the claimed jobs must run whatever went wrong while gathering
            self.say(f"could not gather a batch (running {len(batch)} job(s)):\n{traceback.format_exc()}")
        for other in batch:
            self._keys.pop(other.id, None)
        return batch

    def _gather(self, job: JobInfo, batch: list[JobInfo]) -> None:
        key = self._key(job)
        if key is None or self.config.max_batch <= 1:
            return
        deadline = time.monotonic() + self.config.batch_window_ms / 1000.0
        while len(batch) < self.config.max_batch:
            found = False
            for other in self.store.queued([job.model], limit=4 * self.config.max_batch):
                if len(batch) >= self.config.max_batch:
                    break
                if self._key(other) == key and self._claim(other):
                    batch.append(other)
                    found = True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                break
            if not found:
                self._wake.wait(min(remaining, 0.002))
                self._wake.clear()

    def _key(self, job: JobInfo) -> Any:
        """The job's batch key (None: it runs alone), computed once per job from its request."""
        if job.id in self.solo or self.config.max_batch <= 1:
            return None
        if job.id not in self._keys:
            if len(self._keys) > 10_000:
                self._keys.clear()
            from .cotenant import batch_key

            request = self.store.request(job.id)
            self._keys[job.id] = batch_key(request) if request is not None else None
        return self._keys[job.id]

    def _run(self, jobs: list[JobInfo]) -> None:
        ids = [job.id for job in jobs]
        attempts = {job.id: job.attempts + 1 for job in jobs}  # counted by the claim
        logs: dict[str, list[str]] = {job_id: [] for job_id in ids}
        pending = list(ids)
        try:
            requests = {}
            for job_id in ids:
                self.on_event(job_id, {"status": "RUNNING"})
                request = self.store.request(job_id)
                if request is None:
                    lost = error_result("InternalError", "the request of this job was lost")
                    self._finish(job_id, lost, [])
                    pending.remove(job_id)
                else:
                    requests[job_id] = request
            if not pending:
                return
            if len(pending) > 1:
                self.batches += 1
            try:
                self._send_jobs(pending, requests)
            except ChannelClosed:
                self._crashed(pending, attempts, logs, batch=len(pending) > 1)
                return
            deadline = time.monotonic() + self.config.max_seconds
            while pending:
                if self._stopping.is_set():
                    # Not the jobs' fault: they run again, from the start, when the server is back.
                    self._drop_channel()
                    for job_id in pending:
                        self.store.requeue(job_id)
                    return
                cancelled = [job_id for job_id in pending if job_id in self._cancel]
                if cancelled:
                    self._drop_channel()
                    for job_id in pending:
                        if job_id in cancelled:
                            result = error_result("Cancelled", "the job was cancelled by its owner")
                            self._finish(job_id, result, logs[job_id], status="CANCELLED")
                        else:
                            self._interrupted(job_id)
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._drop_channel()
                    self._timed_out(pending, len(ids) > 1, logs)
                    return
                try:
                    received = self.channel.receive(min(remaining, _POLL))
                except ChannelClosed:
                    self._crashed(pending, attempts, logs, batch=len(ids) > 1)
                    return
                if received is None:
                    continue
                message, blob = received
                job_id = str(message.get("job"))
                if job_id not in pending:
                    continue  # left over from a job that was already settled
                if message.get("op") == "log":
                    text = str(message.get("text", ""))
                    offset = sum(len(chunk) for chunk in logs[job_id])
                    logs[job_id].append(text)
                    self.on_event(job_id, {"status": "RUNNING", "log": text, "offset": offset})
                elif message.get("op") == "result":
                    pending.remove(job_id)
                    self._completed(job_id, message.get("result"), blob, logs[job_id])
        finally:
            with self._lock:
                self.running = []
                self._cancel.difference_update(ids)

    def _drop_channel(self) -> None:
        """Kill the worker (the only way to stop arbitrary code); the feeder starts a new one."""
        self.channel.kill()
        self.state = "restarting"

    def _send_jobs(self, ids: list[str], requests: dict[str, bytes]) -> None:
        limits = {**self.config.limits(), "max_log_bytes": self.config.max_log_bytes}
        if len(ids) == 1:
            self.channel.send({"op": "job", "job": ids[0], "limits": limits}, requests[ids[0]])
            return
        sizes = [len(requests[job_id]) for job_id in ids]
        self.channel.send({"op": "batch", "jobs": ids, "sizes": sizes, "limits": limits},
                          b"".join(requests[job_id] for job_id in ids))

    def _interrupted(self, job_id: str, *, alone: bool = False) -> None:
        """Back to the head of the queue through no fault of its own (a batch it shared failed)."""
        if alone:
            self.solo.add(job_id)
        if self.store.requeue(job_id):
            self.on_event(job_id, {"status": "QUEUED", "position": 0})

    def _timed_out(self, pending: list[str], batch: bool, logs: dict[str, list[str]]) -> None:
        if batch:
            # Which of them ran too long is unknown: each runs again alone, so only that one fails.
            self.say(f"a batch of {len(pending)} jobs exceeded the time limit; running each alone")
            for job_id in pending:
                self._interrupted(job_id, alone=True)
            return
        limit = f"{self.config.max_seconds:g}"
        self._finish(pending[0], error_result(
            "TimeoutError",
            f"the job exceeded the time limit of {limit} s and was stopped (the server's max_seconds)"),
            logs[pending[0]])

    def _crashed(self, pending: list[str], attempts: dict[str, int], logs: dict[str, list[str]], *,
                 batch: bool = False) -> None:
        reason = self.channel.exit_reason()
        label = self.channel.label
        self._drop_channel()
        if batch:
            self.say(f"{label} died while running a batch of {len(pending)} jobs ({reason}); "
                     "running each alone")
            for job_id in pending:
                self._interrupted(job_id, alone=True)
            return
        for job_id in pending:
            if attempts.get(job_id, 1) <= self.config.crash_retries:
                self.say(f"{label} died while running job {job_id} ({reason}); it runs once more")
                self.solo.add(job_id)
                if self.store.retry(job_id):
                    self.on_event(job_id, {"status": "QUEUED", "position": 0})
                continue
            self._finish(job_id, error_result("WorkerCrashed", (
                f"the worker died while running this job ({reason}), {attempts.get(job_id, 1)} time(s); "
                "the job may need more memory than the server has. The worker was restarted.")),
                logs[job_id])

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

    def _finish(self, job_id: str, result: dict, logs: list[str], *, blob: bytes = b"",
                status: str | None = None) -> None:
        self.solo.discard(job_id)
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
