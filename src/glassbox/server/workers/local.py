"""The ``local`` backend: one spawned worker process on this machine that holds every model.

Offers:
    LocalProcess(config, say, models=None, python=None)
                                 the channel to it (``channel.Channel``); ``models``: the ones it
                                 serves (default: every Hugging Face one); ``python``: another
                                 interpreter to run it (a vLLM model's worker: its own process,
                                 jobs run in it, confined in place, in the vLLM virtualenv;
                                 docs/vllm.md)
    worker_main(conn)            the worker process's main loop (``spawn`` target; its first
                                 message says what to load)

Process layout and why::

    API process (keys, database)                       worker process (models, no secrets)
    ───────────────────────────                        ──────────────────────────────────
    Feeder thread:                                     worker_main:
      store.queued() ─ claim ──────► pipe ─ job ──►    child.handle_message(...)
      wait(pipe, sentinel, deadline)  ◄── log ────────        print(...) -> log messages
      store.finish(...)               ◄── result ─────

- The worker is started with the ``spawn`` method: a fresh interpreter that inherits no memory of
  the API process (no database engine, no keys), and it is given only the model specs, the
  executor's module name and the torch thread count. Environment variables whose names look like
  secrets (``child.SENSITIVE_ENV``) are removed before it starts and again inside it.
- Both directions of the pipe carry ``framing`` messages (JSON + bytes), never pickle: the API
  process must not unpickle what a process running untrusted code sends it.
- A worker left behind by an API process that died (``kill -9``) notices its parent is gone and
  exits, so a restarted server does not find the old one still holding the models' memory.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ...envoy import Envoy, module_of
from ...remote.framing import frame, unframe
from ...remote.protocol import ProtocolError
from ..config import ServerConfig
from ..jobs.weights_file import sweep
from .channel import ChannelClosed, WorkerStartError, exit_reason, ready_note
from .child import (
    child_environment,
    exit_with_parent,
    handle_load,
    handle_message,
    limit_memory,
    scrub_environment,
    start,
)
from .confine import confine_job, confine_worker
from .forked import JobProcess, prepare_parent
from .split import Host, body_process, run_split
from .zygote import Zygote

__all__ = ["LocalProcess", "worker_main"]


def worker_main(conn: multiprocessing.connection.Connection) -> None:
    """The worker process: its first message (``start``) says what to load and how to run; see
    ``LocalProcess.start``. Nothing comes as the process's arguments: those stay reachable (from
    ``multiprocessing.current_process()``) in every process forked from this one."""
    try:
        _serve(conn)
    finally:
        # No interpreter teardown: a confined worker may not run multiprocessing's finalizers
        # (unlinking the semaphore tqdm made while loading is a write Landlock refuses), and it
        # holds nothing that needs cleaning up.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _serve(conn: multiprocessing.connection.Connection) -> None:
    """``start``'s ``specs``: the models to load now; ``read_paths``: what the confined worker must
    still read later (the folders of models loaded on demand, offload folders); ``write_paths``:
    what it must still write (the offload folders of models loaded on demand; never its jobs)."""
    scrub_environment()
    try:
        setup, _ = unframe(conn.recv_bytes())
    except (EOFError, OSError, ProtocolError):
        return  # the API process is gone before it said what to do
    isolation = str(setup["isolation"])
    torch_threads = int(setup["torch_threads"])
    # Before anything big is imported or loaded: the models count toward the limit, so a server
    # whose limit cannot even hold them fails at start, saying so, rather than at the first job.
    limit = limit_memory(int(setup["max_memory_bytes"]))
    forking = isolation != "none"
    if forking:
        # The Rust tokenizers' thread pool would start threads in this process (which must stay
        # single-threaded to be confined and forked) and cannot survive a fork anyway.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def send(message: dict, out: bytes = b"") -> None:
        conn.send_bytes(frame(message, out))

    # A forking worker keeps one torch thread (forked.py says why); its children use the rest.
    threads_now = 1 if forking else torch_threads
    module, models, reply = start(str(setup["executor"]), dict(setup["specs"]), threads_now, limit)
    on_gpu = [name for name, model in models.items() if _on_accelerator(model)]
    if module is not None and forking and on_gpu:
        module, reply = None, {"op": "failed", "error": (
            f"{', '.join(on_gpu)} loaded onto a GPU, and --isolation {isolation} runs each job in a process "
            "forked from the worker, which CUDA does not survive: serve GPU models with --isolation none "
            "(each job then runs in the worker, its weights checked after it: README, Security)")}
    if module is not None and forking:
        try:
            reply["isolation"] = _isolate(isolation, tuple(setup["read_paths"]), tuple(setup["write_paths"]))
            reply["threads"] = torch_threads or reply["default_threads"]
        except Exception as err:  # the operator must hear why, and nothing may run unconfined
            module, reply = None, {"op": "failed", "error": f"{type(err).__name__}: {err}"}
    elif module is not None and setup.get("confine_in_place"):
        try:
            reply["isolation"] = _confine_in_place(tuple(setup["read_paths"]))
        except Exception as err:  # as above: nothing runs in a worker that failed to confine itself
            module, reply = None, {"op": "failed", "error": f"{type(err).__name__}: {err}"}
    del setup  # what was loaded from where: not in any frame a job's process could walk up to
    send(reply)
    if module is None:
        return
    exit_with_parent()  # a thread: only once confined (Landlock covers threads started after it)
    threads = torch_threads or reply["default_threads"]  # torch's default, as a local run has it

    def handler(message: dict, blob: bytes, child_send: Callable[[dict, bytes], None],
                links: tuple[int, ...]) -> None:
        handle_message(module, models, message, blob, child_send, memory_limit=limit, after=False,
                       links=links)

    def load(message: dict) -> dict:
        return handle_load(module, models, message, memory_limit=limit)

    # Every job's process is forked from the zygote, which is forked now, before the first job's
    # bytes reach this process (zygote.py says why); it holds the models from here on.
    zygote = Zygote(handler, load, threads=threads, confine=_confine_job(isolation)) if forking else None
    if zygote is not None:
        _drop_models(module, models)

    # A batch, and a lone job that could share a pass (the feeder marks it ``shared``), runs split
    # (split.py) where the executor offers it: the model's forward in the host, a long-lived process
    # that runs no user code, each request's code in a process of its own.
    split = zygote is not None and callable(getattr(module, "run_host", None)) \
        and callable(getattr(module, "run_body", None))
    host: Host | None = None

    def fork() -> JobProcess | None:
        # Without waiting (Zygote.fork_later): the worker goes on to its next message meanwhile.
        if zygote is None:
            return None
        if split:
            return body_process(zygote, later=True)
        return JobProcess(zygote.fork_later, zygote.reap, later=True)

    spare = fork()  # the next job's process, forked ahead
    waiting: list[tuple[dict, bytes]] = []  # sent while a forked job was still finishing
    try:
        while True:
            try:
                message, blob = waiting.pop(0) if waiting else unframe(conn.recv_bytes())
            except (EOFError, OSError):
                return  # the parent is gone
            op = message.get("op")
            if op == "abort":
                send({"op": "aborted"})  # nothing was running
                continue
            if op == "load":
                # The spare was forked with the old set of models: fork it again after.
                if spare is not None:
                    spare.discard()
                    spare = None
                if host is not None:  # likewise the host
                    host.stop()
                    host = None
                send(zygote.load(message) if zygote is not None else load(message))
                spare = fork()
                continue
            if op not in ("job", "batch"):
                return  # "stop", or anything unexpected: end cleanly
            try:
                if spare is None:
                    handle_message(module, models, message, blob, send, memory_limit=limit)
                    continue
                max_log = int((message.get("limits") or {}).get("max_log_bytes", 0) or 0)
                if split and (op == "batch" or message.get("shared")):  # each request in its own process
                    if op == "job":
                        message = {"op": "batch", "jobs": [message["job"]], "sizes": [len(blob)],
                                   "limits": message.get("limits") or {}}
                    if host is None or host.dead:
                        host = Host(zygote)
                    bodies, spare = [spare], None
                    # Forked while the host and the first bodies already run (Zygote.fork_later).
                    bodies += [body_process(zygote, later=True) for _ in message["jobs"][1:]]
                    waiting += run_split(host, bodies, message, blob, send, conn, max_log_bytes=max_log)
                    spare = fork()
                    continue
                ids = [str(j) for j in message["jobs"]] if op == "batch" else [str(message["job"])]
                process, spare = spare, None
                waiting += process.run(message, blob, ids, send, conn, max_log_bytes=max_log)
                spare = fork()
            except OSError:
                return  # the pipe is gone: so is the parent
    finally:
        if spare is not None:
            spare.discard()
        if host is not None:
            host.stop()
        if zygote is not None:
            zygote.stop()


def _drop_models(module: Any, models: dict) -> None:
    """The worker's own references to the models, once the zygote holds them: an eviction there
    then gives their memory back to the system (the two shared it, copy-on-write)."""
    unload = getattr(module, "unload_model", None)
    for name in list(models):
        if unload is not None:
            unload(models, name)
        else:
            del models[name]


def _on_accelerator(model: Any) -> bool:
    module = module_of(model) if isinstance(model, Envoy) else model
    return any(p.device.type not in ("cpu", "meta") for p in module.parameters())


def _isolate(isolation: str, read_paths: tuple[str, ...], write_paths: tuple[str, ...] = ()) -> str:
    """Seal the fork-ready state and confine this process (``confine.py``); returns what was applied."""
    prepare_parent()
    for path in write_paths:
        os.makedirs(path, exist_ok=True)  # a confined process could not make it later
    confinement = confine_worker(read_paths=[*_python_paths(), *read_paths], write_paths=list(write_paths),
                                 allow_fork=True, require=isolation == "process")
    return confinement.describe()


def _confine_in_place(read_paths: tuple[str, ...]) -> str:
    """Confine a worker that runs its jobs in itself (a vLLM engine's: its engine and OpenMP threads
    run already, so it can be neither forked per job nor confined whole): the seccomp filter covers
    every thread (no programs, sockets or new processes); Landlock covers the thread that runs the
    jobs (below ABI 8 the threads started before keep filesystem access, which the result says).
    The weights are still checked after every job (served.py)."""
    confinement = confine_worker(read_paths=[*_python_paths(), *read_paths], allow_fork=False, require=False)
    return confinement.describe()


def _confine_job(isolation: str) -> Callable[[], None]:
    return lambda: confine_job(require=isolation == "process")


def _python_paths() -> list[str]:
    """What a confined worker may still read: the Python installation and its packages (torch and
    transformers import modules lazily while jobs run). Nothing else: no models (loaded already;
    those loaded on demand are added by the caller), no state directory, no home."""
    import sysconfig

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        with contextlib.suppress(KeyError):
            paths.add(sysconfig.get_paths()[key])
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    return sorted(p for p in paths if os.path.exists(p))


def _loads_later(config: ServerConfig) -> bool:
    """Do models load (on demand, or again after an eviction under memory_budget) after start?"""
    return bool(config.memory_budget) or any(config.load_mode(name) == "on_demand" for name in config.models)


def _later_reads(config: ServerConfig) -> tuple[str, ...]:
    """What the worker reads after it is confined: every offload folder (offloaded weights are read
    at each forward) and, when models load after start (on demand, or again after an eviction
    under memory_budget), the models' folders (a hub id: the Hugging Face cache)."""
    paths = [str(config.load_options(name)["offload_folder"]) for name in config.models
             if config.load_options(name).get("offload_folder")]
    if _loads_later(config):
        for path in config.models.values():
            if os.path.exists(path):
                paths.append(os.path.realpath(path))
            else:
                from huggingface_hub.constants import HF_HUB_CACHE

                paths.append(HF_HUB_CACHE)
    return tuple(dict.fromkeys(paths))


def _later_writes(config: ServerConfig) -> tuple[str, ...]:
    """What the worker writes after it is confined: the offload folders of models loaded on demand
    (accelerate writes their offloaded weights there at load) and, when models load or leave after
    start, the --share-weights folder (their files are made and removed there). Its jobs may not
    (confine_job)."""
    paths = [os.path.realpath(str(config.load_options(name)["offload_folder"])) for name in config.models
             if config.load_mode(name) == "on_demand" and config.load_options(name).get("offload_folder")]
    if config.share_weights and _loads_later(config):
        folder = os.path.realpath(os.path.expanduser(config.share_weights))
        os.makedirs(folder, mode=0o700, exist_ok=True)  # Landlock grants only folders that exist
        paths.append(folder)
    return tuple(dict.fromkeys(paths))


_paths_of: dict[str, list[str]] = {}


@contextlib.contextmanager
def _interpreter(python: str | None):
    """While a process starts (``child_environment`` holds its lock, so starts never overlap): spawn
    it with ``python``, and hand it that interpreter's own ``sys.path`` (spawn gives the child the
    parent's, which would import this virtualenv's torch into the vLLM one)."""
    # abspath, not realpath: a virtualenv's python is a symlink to the base one, and it is the link
    # (beside its pyvenv.cfg) that makes it that virtualenv's
    if python is None or os.path.abspath(python) == os.path.abspath(sys.executable):
        yield
        return
    if python not in _paths_of:
        try:
            shown = subprocess.run([python, "-c", "import json, sys; print(json.dumps(sys.path))"],
                                   capture_output=True, text=True, timeout=60, check=True)
        except (OSError, subprocess.SubprocessError) as err:
            raise WorkerStartError(f"cannot run the vLLM worker's Python {python!r} (the server's "
                                   f"vllm_python): {err}") from None
        _paths_of[python] = [p for p in json.loads(shown.stdout) if p]
    import multiprocessing.spawn as spawn

    before_exe, before_path = spawn.get_executable(), list(sys.path)
    spawn.set_executable(python)
    sys.path[:] = _paths_of[python] + [p for p in before_path if p not in _paths_of[python] and
                                       "site-packages" not in p]
    try:
        yield
    finally:
        sys.path[:] = before_path
        spawn.set_executable(before_exe)




class LocalProcess:
    """The channel to one spawned worker process on this machine (the ``local`` backend).

    A ``channel.Channel``: the few calls a ``Feeder`` uses (``ray_replicas.RayReplica`` is the other
    one):

        start(stopping) -> ready      spawn and wait until the models are loaded (WorkerStartError)
        send(message, blob)           hand over a ``job`` / ``batch`` message
        receive(timeout)              the next ``log`` / ``result`` message, or None; ChannelClosed
        alive() / kill() / exit_reason() / pid / label / serves (model names it holds)
    """

    def __init__(self, config: ServerConfig, say: Callable[[str], None], *, models: list[str] | None = None,
                 python: str | None = None) -> None:
        self.config = config
        self.say = say
        self.serves = list(models) if models is not None else [
            name for name in config.models if config.engine(name) == "hf"]
        self.loads_at_start = [name for name in self.serves if config.load_mode(name) == "eager"]
        self.python = python
        # vLLM runs threads (its engine core, OpenMP) in the process that holds it: that process can
        # be neither forked per job nor confined whole, so its worker runs jobs in itself and
        # confines itself in place (_confine_in_place; docs/vllm.md).
        self.isolation = "none" if python is not None else config.isolation
        # A forking worker stops a job by killing the job's process, not itself (forked.py).
        self.can_abort = self.isolation != "none"
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._exit_code: int | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def label(self) -> str:
        return f"{'vLLM ' if self.python is not None else ''}worker {self.pid}"

    def start(self, stopping: threading.Event) -> dict:
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe(duplex=True)
        config = self.config
        process = context.Process(target=worker_main, args=(child_conn,), name="glassbox-worker", daemon=True)
        with child_environment(), _interpreter(self.python):
            process.start()
        child_conn.close()
        parent_conn.send_bytes(frame({
            "op": "start", "specs": config.worker_specs(self.loads_at_start), "executor": config.executor,
            "torch_threads": config.torch_threads, "max_memory_bytes": config.max_memory_bytes,
            "isolation": self.isolation, "read_paths": list(_later_reads(config)),
            "write_paths": list(_later_writes(config)),
            # a vLLM worker runs its jobs in itself, but is confined all the same unless the
            # operator chose --isolation none for the whole server
            "confine_in_place": self.python is not None and config.isolation != "none"}))
        self._process, self._conn, self._exit_code = process, parent_conn, None
        names = ", ".join(self.loads_at_start) or "no models (all load on demand)"
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
                    return {**message, "note": ready_note(message)}
                self.kill()
                raise WorkerStartError(str(message.get("error") or message))
            if process.sentinel in ready:
                code = process.exitcode
                self.kill()
                raise WorkerStartError(
                    f"the worker process exited while loading the models ({exit_reason(code)})")

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
        return exit_reason(self._exit_code)

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
        if self.config.share_weights:
            # the files no process maps any more (the worker's job processes die with it, each in
            # its own time: what one still maps is removed at the next start, by map_shared's sweep)
            try:
                sweep(os.path.expanduser(self.config.share_weights))
            except OSError as err:  # tidying up must not stop a shutdown or a restart
                self.say(f"could not tidy the --share-weights folder: {err}")
