"""Inside a process that runs jobs (the local worker, a Ray replica): load, run, limit, describe.

Offers:
    start(executor, specs, torch_threads, memory_limit) -> (module, models, reply)
                         import the executor, load the models; ``reply`` is the ``ready`` (or
                         ``failed``) message for the feeder
    handle_message(module, models, message, blob, send, memory_limit=0)
                         run one ``job`` / ``batch`` message (see ``channel.py``), then ``after_job``
    batch_requests(message, blob) -> [bytes]   a ``batch`` message's requests, one each
    handle_load(module, models, message, memory_limit=0) -> reply
                         a ``load`` message: evict what it names, load its model (on-demand loading)
    limit_memory(limit) / memory_in_use()      RLIMIT_DATA, and what it counts now
    is_out_of_memory(error)                    is a job's error a failed host allocation?
    SENSITIVE_ENV / WORKER_ENV / child_environment() / scrub_environment() / exit_with_parent()
    describe(model)                            what /v1/models says about a served model

Shared by ``local.py`` (the spawned worker process) and ``ray_replicas.py`` (the Ray actor), so
both run jobs exactly alike.

Memory: a worker limits itself to ``max_memory_bytes`` (``RLIMIT_DATA``, set before torch is
imported, so the models count too). An allocation over it fails inside the job (torch's "can't
allocate memory", Python's MemoryError) and the job ends with a MemoryError that names the
limit; the process lives on, so the next job does not wait for a restart. Without a limit the
same job would be killed by the kernel's OOM killer, or take the machine down with it. Why
``RLIMIT_DATA`` and not ``RLIMIT_AS``: both stop ``torch.zeros(5_000_000_000)`` here (measured on
CPU: the same error, and both models load and run under a 4 GiB limit), but ``RLIMIT_AS`` counts
address space that holds no memory: glibc's per-thread malloc arenas (64 MiB reserved each),
memory-mapped weight files, and CUDA's unified-address reservation (far more than the GPU has),
which makes CUDA fail to initialise under any realistic limit. ``RLIMIT_DATA`` counts private
writable mappings, i.e. memory a job can actually fill (Linux >= 4.7).

Every job starts from seed 0 (``remote.executor.seed_job``): sampling inside a job is reproducible and no job
inherits the random state of the one before.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from ...envoy import Envoy, module_of
from ...remote.executor import load_executor, seed_job
from ...remote.job import JobError, JobRequest, JobResult
from ...remote.protocol import ProtocolError
from .channel import gib

__all__ = ["SENSITIVE_ENV", "WORKER_ENV", "batch_requests", "child_environment", "describe",
           "exit_with_parent", "handle_load", "handle_message", "is_out_of_memory", "limit_memory",
           "memory_in_use", "scrub_environment", "start"]

SENSITIVE_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|DB_URL|DATABASE|COOKIE|SESSION",
                           re.IGNORECASE)
_ENV_LOCK = threading.Lock()


# How allocation failures read once the limit is hit: torch's CPU allocator, libc's errno text,
# and Python's own MemoryError (which has no message for a plain allocation failure).
_LOG_SECONDS = 0.05  # printed output waits at most this long to be sent, with what follows it...
_LOG_CHUNK = 65536  # ...unless this many characters are waiting
_DROPPED = ("\n[glassbox] later output of this job was dropped: the server keeps at most {limit:,} bytes of "
            "a job's printed output (max_log_bytes)\n")
_ALLOCATION_FAILED = re.compile(r"can't allocate memory|Cannot allocate memory|std::bad_alloc")


# Defaults for the processes that run jobs, unless the operator's environment says otherwise.
# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning. On a machine whose cores
# are shared (the API process, other replicas) spinning threads slowed a SmolLM2 forward pass from
# 91 ms to 1,960 ms (bench/throughput.py's findings); results are the same either way.
# OPENBLAS_NUM_THREADS=1: numpy's OpenBLAS would start a thread at import; a process with threads
# cannot be fully confined by Landlock below ABI 8, nor forked safely (confine.py, forked.py).
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}


@contextlib.contextmanager
def child_environment(keep: Callable[[str], bool] = lambda name: False) -> Iterator[None]:
    """While a process that will run jobs starts (it inherits the environment as it is then):
    no variable that looks like a secret (``SENSITIVE_ENV``, unless ``keep(name)``), the
    ``WORKER_ENV`` defaults, and no command-line arguments (``multiprocessing``'s spawn hands the
    parent's ``sys.argv`` to the child as its own: ``--db-url`` with its password, the state
    directory, every model's path). The API process's own are put back afterwards."""
    with _ENV_LOCK:
        hidden = {name: os.environ.pop(name) for name in list(os.environ)
                  if SENSITIVE_ENV.search(name) and not keep(name)}
        added = [name for name in WORKER_ENV if name not in os.environ]
        os.environ.update({name: WORKER_ENV[name] for name in added})
        arguments = sys.argv
        sys.argv = arguments[:1]
        try:
            yield
        finally:
            sys.argv = arguments
            for name in added:
                os.environ.pop(name, None)
            os.environ.update(hidden)


def is_out_of_memory(error: JobError) -> bool:
    """Whether a job's error is a failed host-memory allocation (and not, say, CUDA running out of
    GPU memory, or a size limit of the server, which say what they are themselves)."""
    kind, message = error.type, error.message
    if "CUDA" in message or "GPU" in message or "server" in message:
        return False
    if kind == "MemoryError":
        return True
    return kind in ("RuntimeError", "OutOfMemoryError") and bool(_ALLOCATION_FAILED.search(message))


def start(executor: str, specs: dict[str, str], torch_threads: int,
          memory_limit: int) -> tuple[Any, dict, dict]:
    """Import the executor module and load the models (call ``limit_memory`` first: the models
    count toward it). Returns ``(module, models, reply)``: ``reply`` is the ``ready`` message
    (model descriptions, seconds, threads, memory), or ``failed`` with the reason (then
    ``module`` and ``models`` are None and {})."""
    started = time.monotonic()
    try:
        import torch

        # torch's own default in this process (OMP_NUM_THREADS if set, else its count of cores):
        # what a local run on this machine uses, and what --torch-threads 0 means for jobs.
        default_threads = torch.get_num_threads()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        try:
            torch.set_num_interop_threads(1)  # jobs run one at a time; fewer idle threads
        except RuntimeError:
            pass  # already fixed by an import that ran parallel work: harmless
        _no_progress_thread()
        module = load_executor(executor)
        models = module.load_models(specs)
        _warm_up(module, models)
        prepare = getattr(module, "prepare_later_loads", None)
        if prepare is not None:  # before the worker is confined (on-demand loads come later)
            prepare()
    except BaseException as err:  # the feeder must hear why, whatever it was
        error = traceback.format_exc()
        if memory_limit and is_out_of_memory(JobError(type(err).__name__, str(err))):
            error += (f"\nThe worker's memory limit is {gib(memory_limit)} GiB (max_memory_bytes, models "
                      "included) and starting it and loading the models needs more: raise it, or 0 for no "
                      "limit.")
        return None, {}, {"op": "failed", "error": error}
    return module, models, {
        "op": "ready", "models": {name: describe(model) for name, model in models.items()},
        "seconds": round(time.monotonic() - started, 3), "threads": torch.get_num_threads(),
        "default_threads": default_threads, "memory": memory_in_use(), "memory_limit": memory_limit}


def handle_load(module: Any, models: dict, message: dict, memory_limit: int = 0) -> dict:
    """Evict the models ``message["evict"]`` names, then load ``message["model"]`` from
    ``message["spec"]`` (the executor's ``unload_model`` / ``load_model``). The reply is ``loaded``
    (its description, seconds, the memory now in use) or ``load_failed`` with the reason; either
    way the worker and its other models go on."""
    name = str(message.get("model"))
    started = time.monotonic()
    evicted = []
    try:
        for other in message.get("evict") or []:
            if other in models:
                freed = (module.unload_model(models, other) or 0) / 2**20
                evicted.append(other)
                print(f"[glassbox worker] evicted {other} ({freed:.0f} MiB of weights unmapped)",
                      file=sys.stderr, flush=True)
        models[name] = module.load_model(name, message["spec"])
        _warm_up(module, {name: models[name]})
    except BaseException as err:  # the feeder must hear why, and the worker must live on
        models.pop(name, None)
        error = f"{type(err).__name__}: {err}"
        if memory_limit and is_out_of_memory(JobError(type(err).__name__, str(err))):
            error += (f" (the worker's memory limit is {gib(memory_limit)} GiB, max_memory_bytes: raise it, "
                      "or lower memory_budget so that fewer models are loaded at once)")
        return {"op": "load_failed", "model": name, "error": error, "evicted": evicted}
    return {"op": "loaded", "model": name, "info": describe(models[name]), "evicted": evicted,
            "seconds": round(time.monotonic() - started, 3), "memory": memory_in_use()}


def _warm_up(module: Any, models: dict) -> None:
    """The executor's ``warm_up`` (optional), where models were just loaded: before any job's process
    is forked from here. Never fatal: a model that cannot run it serves jobs as it is."""
    warm_up = getattr(module, "warm_up", None)
    if warm_up is None:
        return
    try:
        warm_up(models)
    except Exception as err:
        print(f"[glassbox worker] warm-up skipped: {type(err).__name__}: {err}", file=sys.stderr, flush=True)


def _no_progress_thread() -> None:
    """tqdm (transformers' loading bar) starts a monitor thread; a worker must stay single-threaded
    until it is confined and forks (confine.py, forked.py), and nobody watches its bars anyway."""
    try:
        import tqdm
    except ImportError:
        return
    tqdm.tqdm.monitor_interval = 0


def handle_message(module: Any, models: dict, message: dict, blob: bytes, send: Callable[[dict, bytes], None],
                   *, memory_limit: int = 0, after: bool = True, links: tuple[int, ...] = ()) -> None:
    """Run what one ``job`` or ``batch`` message asks (see ``channel.py``), sending
    ``log`` and ``result`` messages through ``send(message, blob)``; then, with every reply on its
    way and ``after``, verify and restore the weights (``after_job``; a forked job's process needs
    none: it ends). Shared by the local worker (in a forked child) and the Ray replicas.
    In the processes of a split batch (``split.py``): ``host`` (the batch's forward, over ``links``)
    and ``body`` (one job, as a body of that forward, over ``links[0]``)."""
    limits = dict(message.get("limits") or {})
    op = message.get("op")
    if "torch" in sys.modules:
        seed_job()
    if op == "host":
        _run_host(module, models, message, blob, links)
        return
    if op == "body":
        send = _serialized(send)
        _send_results(send, [str(message["job"])], [_run_one(
            module, models, str(message["job"]), blob, limits, send,
            run=lambda models, request, **kw: module.run_body(models, request, links[0],
                                                               lone=bool(message.get("lone")), **kw))],
            memory_limit)
        return
    if op == "batch":
        ids, requests = [str(job_id) for job_id in message["jobs"]], batch_requests(message, blob)
    else:
        ids, requests = [str(message["job"])], [blob]
    send = _serialized(send)  # printed output may be sent from a timer thread (_JobLog)
    results = _run_many(module, models, ids, requests, limits, send)
    _send_results(send, ids, results, memory_limit)
    del results
    # The replies are on their way; now, before the next job, verify and restore the weights.
    after_job = getattr(module, "after_job", None)
    if after and after_job is not None:
        after_job(models)


def _run_host(module: Any, models: dict, message: dict, blob: bytes, links: tuple[int, ...]) -> None:
    """A split batch's host: its requests read, its forward run over the links; it sends nothing
    (each body sends its own result)."""
    module.run_host(models, [JobRequest.read(one) for one in batch_requests(message, blob)], list(links))


def batch_requests(message: dict, blob: bytes) -> list[bytes]:
    """A ``batch`` message's requests: its blob cut by its ``sizes`` (channel.py)."""
    requests, start = [], 0
    for size in message["sizes"]:
        requests.append(blob[start:start + int(size)])
        start += int(size)
    return requests


def _send_results(send: Callable[[dict, bytes], None], ids: list[str], results: list[JobResult],
                  memory_limit: int) -> None:
    for job_id, result in zip(ids, results):
        if memory_limit and result.error is not None and is_out_of_memory(result.error):
            result = over_memory_limit(result, memory_limit)
        try:
            send({"op": "result", "job": job_id, "result": result.envelope()}, result.blob)
        except (ProtocolError, MemoryError) as err:  # MemoryError: framing a huge result
            failed = JobResult.failed("InternalError", f"cannot send the result: {err}")
            send({"op": "result", "job": job_id, "result": failed.envelope()}, b"")


def _serialized(send: Callable[[dict, bytes], None]) -> Callable[[dict, bytes], None]:
    lock = threading.Lock()

    def send_one(message: dict, blob: bytes = b"") -> None:
        with lock:
            send(message, blob)

    return send_one


def _run_many(module: Any, models: dict, ids: list[str], requests: list[bytes], limits: dict,
              send: Callable[[dict, bytes], None]) -> list[JobResult]:
    """One job alone, or several through the executor's ``run_batch`` (one forward pass) when
    it has one; their printed output is kept per job and sent before each one's result. Each
    request is read here, once (``JobRequest.read``), and passed on as a value."""
    if len(ids) == 1 or getattr(module, "run_batch", None) is None:
        return [_run_one(module, models, job_id, request, dict(limits), send)
                for job_id, request in zip(ids, requests)]
    logs = [_JobLog(job_id, int(limits.get("max_log_bytes", 0) or 0), send) for job_id in ids]
    job_limits = {k: v for k, v in limits.items() if k != "max_log_bytes"}
    try:
        read = [JobRequest.read(request) for request in requests]
        results = module.run_batch(models, read, logs=logs, limits=job_limits)
        for log in logs:
            log.close()
        if len(results) != len(ids) or not all(isinstance(r, JobResult) for r in results):
            raise TypeError(f"run_batch returned {len(results)} results for {len(ids)} jobs, not JobResults")
        return list(results)
    except Exception as err:  # run_batch isolates the jobs' own errors; this is a server bug
        failed = JobResult.failed("InternalError", f"the server failed to run this job: {err!r}")
        return [failed for _ in ids]


class _JobLog:
    """A ``print`` target for one job: its output goes out as ``log`` messages, coalesced (what is
    printed within ``_LOG_SECONDS`` goes out as one message, sent by a timer even if the job then
    computes in silence), so 20,000 empty prints are a handful of messages, not 20,000 trips
    through the feeder; capped at ``max_bytes`` (0: no cap), every print counting at least one
    byte, so a loop of empty prints meets the cap too. ``send`` must be safe to call from the
    timer's thread (``handle_message`` serialises it)."""

    def __init__(self, job_id: str, max_bytes: int, send: Callable[[dict, bytes], None]) -> None:
        self.job_id, self.send = job_id, send
        self.left = self.limit = max_bytes or None  # bytes still allowed; None: no cap
        self.noted = False  # the note that later output was dropped has been added
        self.pending: list[str] = []
        self.size = 0
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None

    def __call__(self, text: str) -> None:
        text = str(text)
        if self.left is not None:
            if self.left <= 0:
                if self.noted:
                    return
                text = ""
            data = text.encode("utf-8", "replace")
            cost = len(data) + 1
            if cost > self.left:
                kept = data[:max(0, self.left - 1)].decode("utf-8", "ignore")
                text = kept + _DROPPED.format(limit=self.limit)
                self.left, self.noted = 0, True
            else:
                self.left -= cost
        with self.lock:
            self.pending.append(text)
            self.size += len(text)
            if self.size >= _LOG_CHUNK:
                self._send_pending()
            elif self.timer is None:
                self.timer = threading.Timer(_LOG_SECONDS, self.flush)
                self.timer.daemon = True
                self.timer.start()

    def flush(self) -> None:
        with self.lock:
            self._send_pending()

    def close(self) -> None:
        """Send what is left, now (before the job's result)."""
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
            self._send_pending()

    def _send_pending(self) -> None:
        self.timer = None
        if self.pending:
            text, self.pending, self.size = "".join(self.pending), [], 0
            if text:
                self.send({"op": "log", "job": self.job_id, "text": text}, b"")


def _run_one(module: Any, models: dict, job_id: str, request: bytes, limits: dict,
             send: Callable[[dict, bytes], None], run: Callable[..., JobResult] | None = None) -> JobResult:
    log = _JobLog(job_id, int(limits.pop("max_log_bytes", 0) or 0), send)
    try:
        read = JobRequest.read(request)
        try:
            result = (run or module.run_job)(models, read, log=log, limits=limits)
        finally:
            log.close()
        if not isinstance(result, JobResult):
            raise TypeError(f"run_job returned {type(result).__name__}, not a JobResult")
        return result
    except Exception as err:  # run_job handles user errors; this is a server bug
        return JobResult.failed("InternalError", f"the server failed to run this job: {err!r}")


def limit_memory(limit: int) -> int:
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


def memory_in_use() -> int | None:
    """This process's private writable memory (what RLIMIT_DATA counts), in bytes."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def over_memory_limit(result: JobResult, limit: int) -> JobResult:
    """The job's error, reworded to say which limit it ran into and what to do."""
    original = (result.error.message if result.error else "").strip()
    used = memory_in_use()  # the job's memory is freed by now: this is the models and the worker
    held = f"; the models and the worker hold {gib(used)} GiB of it" if used else ""
    asked = re.search(r"tried to allocate (\d+) bytes", original)
    what = f": an allocation of {gib(int(asked.group(1)))} GiB failed" if asked else ""
    message = (
        f"the job exceeded the worker memory limit of {gib(limit)} GiB (the server's "
        f"max_memory_bytes{held}){what}. Use smaller tensors or batches, or save fewer values"
    )
    lineno, line = (result.error.lineno, result.error.line) if result.error else (None, None)
    return result.replace(error=JobError("MemoryError", message, lineno, line))


def describe(model: Any) -> dict:
    module = module_of(model) if isinstance(model, Envoy) else model
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


def scrub_environment() -> None:
    for name in list(os.environ):
        if SENSITIVE_ENV.search(name):
            del os.environ[name]


def exit_with_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)  # orphaned: the API process died; free the models' memory now

    threading.Thread(target=watch, name="glassbox-parent-watch", daemon=True).start()

