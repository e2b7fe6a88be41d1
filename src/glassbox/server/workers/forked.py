"""Run each job or batch in a fresh process: memory that dies with it.

Offers:
    JobProcess(fork, reap, links=(), peer=None)
        a process that waits for one job, made by ``fork(job_r, out_w, fault_w, *links) -> pid``
        (``zygote.Zygote.fork``: forked from the zygote, never from the worker) and reaped by
        ``reap(pid) -> wait status``; ``.run(message, blob, ids, forward, control)`` hands it the
        job and, in the worker, passes the process's ``log`` / ``result`` frames on to the feeder
        (checked: only this message's jobs, one result each, logs within their cap), stops it on
        ``abort``, and reports a process that died (``crashed``, with the user's line when
        Python's own traceback of the crash shows it); ``.discard()`` if no job comes; ``peer``:
        the worker's end of its link (``split.py``), closed by ``.drop_peer()``
    run_processes([(process, message, blob, ids), ...], forward, control)
                       ``.run`` for the processes of one shared pass at once (``split.py``)
    job_process_main(job_r, out_w, fault_w, handler, threads, confine, links)
                       the job's process itself (in the child the zygote forked): confine it
                       further, set its torch threads, read its one job, run ``handler``; never
                       returns
    host_process_main(job_r, out_w, fault_w, control, handler, threads, confine, max_links)
                       a split host's process (``split.Host``): the same, pass after pass
    frame_writer(fd) -> send(message, blob)  /  FrameReader(fd).read_one() / .read()
                       the length-prefixed frames between the worker and the processes it runs
    prepare_parent()   the part of making fork safe that the forking process does (gc frozen)
    die_with_parent()  SIGKILL when the parent ends (the zygote and each job's process)
    keep_only(*fds)    close every descriptor above stderr but these

Why a process per job (``isolation = "process"``, the default on CPU):
- Nothing a job does outlives it. Hooks on the served model, replaced torch functions, edited
  configs, module globals, a generator parked inside ``torch.autocast``, caches, freed memory
  holding its activations: all of it lives in the child and ends with it. The worker that forks
  the next job never ran user code, so the next job starts from exactly the state the models
  were loaded in, and ``torch.empty`` can never return an earlier job's numbers.
- The weights need no check afterwards: the child's writes to the worker's memory are
  copy-on-write (and the parameters are read-only memory anyway, ``jobs/sealed.py``).
- A crash (a write to read-only weights, a C stack overflow) kills the child only: the job (or
  its batch, whose members then run again alone) fails; the worker and its loaded models stay.
- Cancel and time-out kill the child, not the worker: no model reload, no stall for others.

Cost, measured on SmolLM2 (bench/remote_latency.py, README: Performance): the fork itself is
paid ahead (the next job's process is forked as soon as the last one ends); the job then runs
slower than in the worker itself (SmolLM2: 163 vs 127 ms in one run, the bench's "run_job in
the worker" line for each mode), most likely copy-on-write page faults: Python writes
reference counts into pages it shares with the worker, and allocations reuse the worker's freed
heap. The weights live in private read-only memory, whose page tables the fork copies (with a
shared mapping each job faulted them in again: ~14 ms slower in that bench).

Which process forks: the zygote (``zygote.py``), forked from the worker before the worker has
read any job. The worker reads every request and passes on every result, so its freed heap holds
them; a process forked from it could read them back as uninitialised memory.

The worker keeps ONE torch thread: GNU OpenMP cannot be used in a forked child once the parent
has run a parallel region (the child hangs), so every parallel region runs in children, with
``threads`` threads.

The child talks to the worker through a private pipe (length-prefixed frames), not the feeder's
pipe: if it dies mid-frame, the worker sees a short read, not a corrupted stream to the feeder,
and nothing a child writes reaches the feeder unchecked.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import gc
import os
import re
import select
import signal
import socket
import struct
from collections.abc import Callable
from typing import Any

from ...remote.framing import frame, unframe
from ...remote.protocol import ProtocolError
from .channel import exit_reason
from .child import SENSITIVE_ENV

__all__ = [
    "FrameReader",
    "Handler",
    "JobProcess",
    "die_with_parent",
    "frame_writer",
    "host_process_main",
    "job_process_main",
    "keep_only",
    "prepare_parent",
    "run_processes",
]

_HEADER = struct.Struct("<Q")
# What runs a job in its process: (message, blob, send, links) -> None
Handler = Callable[[dict, bytes, Callable[[dict, bytes], None], tuple[int, ...]], None]
_PR_SET_PDEATHSIG = 1
_MAX_FRAME = 1 << 40
_LOG_SLACK = 65536  # the child caps bytes plus one per print; this counts characters of batches
_LINE = re.compile(r'File "<glassbox job \d+>", line (\d+)')
# What a job's process keeps of the environment: locale, time zone, the interpreter's own, and the
# settings of the libraries a job runs (threads, allocators, torch, Hugging Face).
_JOB_ENV = re.compile(r"(PATH|HOME|LANG|LANGUAGE|LC_\w+|TZ|TMPDIR|PYTHON\w*|VIRTUAL_ENV|LD_LIBRARY_PATH"
                      r"|(OMP|KMP|GOMP|MKL|OPENBLAS|TORCH|PYTORCH|CUDA|HF|HUGGINGFACE|TRANSFORMERS|TOKENIZERS"
                      r"|SAFETENSORS|ACCELERATE|MALLOC|GLIBC)_\w*)\Z")


def die_with_parent() -> None:
    """This process gets SIGKILL when the process that forked it ends (and exits now if that
    already happened)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(0)  # the parent died before the line above ran


def prepare_parent() -> None:
    """In the worker, before its first fork (which loaded its models with one torch thread: see
    the module docstring): the objects that exist now frozen out of the garbage collector, so that
    a child's collections do not touch (and copy) every page of the models' Python objects."""
    gc.collect()
    gc.freeze()


class JobProcess:
    """A process made ahead of its job (so the fork is off the job's path), waiting for exactly one
    job; the handler the zygote was given runs it there.

        spare = JobProcess(zygote.fork, zygote.reap)
        later = spare.run(message, blob, ids, forward, control)   # then make the next spare
    """

    def __init__(self, fork: Callable[..., int], reap: Callable[[int], int],
                 links: tuple[int, ...] = (), peer: Any = None, *, later: bool = False) -> None:
        """``fork(job_r, out_w, fault_w, *links)`` makes the process and gives its pid; with
        ``later``, it gives a function that waits for the pid (``Zygote.fork_later``): the process
        may still be being forked when this returns, and ``pid`` waits for it."""
        job_r, job_w = os.pipe()
        out_r, out_w = os.pipe()
        fault_r, fault_w = os.pipe()
        try:
            made = fork(job_r, out_w, fault_w, *links)
        except BaseException:
            for fd in (job_w, out_r, fault_r):
                os.close(fd)
            raise
        finally:
            for fd in (job_r, out_w, fault_w):  # the process (or the zygote, forking it) holds them now
                os.close(fd)
        self._pid: int | None = None if later else made
        self._pid_of: Callable[[], int] | None = made if later else None
        self.job_w, self.out_r, self.fault_r, self.reap = job_w, out_r, fault_r, reap
        self.peer = peer  # the worker's end of the process's link, if it has one (split.py)

    @property
    def pid(self) -> int:
        if self._pid is None:
            assert self._pid_of is not None
            self._pid = self._pid_of()
        return self._pid

    def drop_peer(self) -> None:
        """Close the worker's end of this process's link (handed on to a host, or unused)."""
        if self.peer is not None:
            with contextlib.suppress(OSError):
                self.peer.close()
            self.peer = None

    def run(self, message: dict, blob: bytes, ids: list[str], forward: Callable[[dict, bytes], None],
            control: Any, *, max_log_bytes: int = 0) -> list[tuple[dict, bytes]]:
        """Hand over the job and pass on what the process says until it ends; see the module
        docstring. ``control`` is the feeder's connection: its ``abort`` stops the process;
        anything else it sends meanwhile (the next job, sent as soon as this one's results
        arrived) is returned, for the worker to handle next."""
        self.drop_peer()  # a job of its own: the link stays unused
        return run_processes([(self, message, blob, ids)], forward, control, max_log_bytes=max_log_bytes)

    def discard(self) -> None:
        """End a process that will get no job (the worker is stopping)."""
        self.drop_peer()
        with contextlib.suppress(OSError):
            os.close(self.job_w)  # it reads an empty job and exits
        with contextlib.suppress(OSError):
            self.reap(self.pid)
        for fd in (self.out_r, self.fault_r):
            with contextlib.suppress(OSError):
                os.close(fd)


def run_processes(jobs: list[tuple[JobProcess, dict, bytes, list[str]]],
                  forward: Callable[[dict, bytes], None], control: Any, *,
                  max_log_bytes: int = 0, also: tuple[int, ...] = ()) -> list[tuple[dict, bytes]]:
    """``JobProcess.run`` for several processes at once (a shared pass: its host and one process per
    request, ``split.py``): each gets its message; what each says is passed on for its own ``ids``
    only; an ``abort`` stops them all; a process that died is reported for its own jobs once every
    process has ended. Returns what the feeder sent meanwhile that was not an ``abort``. ``also``:
    the pids of other processes an ``abort`` stops too (the pass's host, ``split.py``)."""
    relays, readers = {}, {}
    for process, message, blob, ids in jobs:
        relays[process.out_r] = _Relay(ids, forward, max_log_bytes)
        readers[process.out_r] = FrameReader(process.out_r)
        with contextlib.suppress(OSError):  # a process that died already: reported below
            frame_writer(process.job_w)(message, blob)
        os.close(process.job_w)
    # Asked for only now: a process still being forked (``JobProcess(later=True)``) got its job
    # above, and reads it once it exists.
    pids = [process.pid for process, *_ in jobs] + list(also)
    aborted = False
    later: list[tuple[dict, bytes]] = []
    statuses: dict[int, int] = {}
    try:
        talking = set(relays)
        while talking:
            ready, _, _ = select.select([*talking, control], [], [])
            if control in ready and _feeder_says_abort(control, pids, later):
                aborted = True
                break
            for out_r in talking.intersection(ready):
                frames = readers[out_r].read()
                if frames is None:
                    talking.discard(out_r)  # the process closed its end: it ended (or died)
                    continue
                for data in frames:
                    relays[out_r].pass_on(data)
    finally:
        faults = {}
        for process, *_ in jobs:
            status, stopped = _wait(process.pid, process.reap, control, later, already=aborted, all_pids=pids)
            statuses[process.pid] = status
            aborted = aborted or stopped
            faults[process.pid] = _drain(process.fault_r)
            os.close(process.out_r)
            os.close(process.fault_r)
    if aborted:
        forward({"op": "aborted"}, b"")
        return later
    for process, *_ in jobs:
        code = os.waitstatus_to_exitcode(statuses[process.pid])
        relay = relays[process.out_r]
        if code != 0 or relay.unanswered():
            relay.crashed(_crash_reason(code, faults[process.pid]))
    return later


def job_process_main(job_r: int, out_w: int, fault_w: int, handler: Handler, threads: int,
                     confine: Callable[[], None] | None, links: tuple[int, ...] = ()) -> None:
    """The job's process: holds only its three pipes (and the ``links`` of a shared pass,
    ``split.py``), confined further, reads one job and runs ``handler(message, blob, send, links)``
    on it; exits (never returns)."""
    code = 70
    try:
        # Every descriptor but its own pipes goes: the zygote's socket, and whatever else the worker
        # had when it forked the zygote (the pipe to the feeder above all: only the worker may write
        # there, and it checks what this process says). Confinement does not cover open descriptors.
        keep_only(job_r, out_w, fault_w, *links)
        _job_environment()
        _child_setup(fault_w, threads, confine)
        frames = FrameReader(job_r).read_one()
        os.close(job_r)
        if frames is not None:
            message, blob = unframe(frames)
            handler(message, blob, frame_writer(out_w), links)
        code = 0
    finally:
        os._exit(code)


def host_process_main(job_r: int, out_w: int, fault_w: int, control: int, handler: Handler, threads: int,
                      confine: Callable[[], None] | None, max_links: int) -> None:
    """A split host's process (``split.Host``): like a job's process, but it serves pass after pass.
    Each pass is one frame on ``job_r`` (the requests) and, on the ``control`` socket, the host's end
    of each body's link; it runs ``handler`` on them and answers ``hosted``.
    Exits at end of file, or on anything it did not expect (the worker forks a new one)."""
    code = 70
    try:
        keep_only(job_r, out_w, fault_w, control)
        _job_environment()
        _child_setup(fault_w, threads, confine)
        frames, send = FrameReader(job_r), frame_writer(out_w)
        links_from = socket.socket(fileno=control)
        while True:
            data = frames.read_one()
            if data is None:
                break
            _, fds, _, _ = socket.recv_fds(links_from, 16, max_links)
            message, blob = unframe(data)
            # The handler owns the links (the pass's relays close them); if it raises, this process
            # ends rather than serve on with descriptors and state it cannot vouch for.
            handler(message, blob, send, tuple(fds))
            send({"op": "hosted"}, b"")
        code = 0
    finally:
        os._exit(code)


def _wait(pid: int, reap: Callable[[int], int], control: Any, later: list[tuple[dict, bytes]], *,
          already: bool, all_pids: list[int]) -> tuple[int, bool]:
    """Wait for the job's process to end, still listening to the feeder: a process that closed its
    pipe but runs on (raw code can do that) is stopped by an ``abort`` like any other, instead of
    holding the worker until the feeder gives up on it and restarts it (an ``abort`` stops
    ``all_pids``: the processes of one shared pass go together). Returns (wait status, whether it
    was aborted here)."""
    stopped = already
    if not stopped:
        exited = os.pidfd_open(pid)  # readable once the process has ended
        try:
            while True:
                ready, _, _ = select.select([exited, control], [], [])
                if exited in ready:
                    break
                if _feeder_says_abort(control, all_pids, later):
                    stopped = True
                    break
        finally:
            os.close(exited)
    return reap(pid), stopped and not already


def _job_environment() -> None:
    """Only the variables a job's libraries read (``_JOB_ENV``): the worker's environment has no
    secrets (``child.SENSITIVE_ENV``), but what else an operator sets (hosts, buckets, paths) is
    none of a job's business."""
    for name in list(os.environ):
        if not _JOB_ENV.match(name) or SENSITIVE_ENV.search(name):
            del os.environ[name]


def keep_only(*fds: int) -> None:
    """Close every descriptor above stderr except ``fds``."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    top = limit if limit != resource.RLIM_INFINITY else 65536
    start = 3
    for fd in sorted(fds):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, top)


def _child_setup(fault_w: int, threads: int, confine: Callable[[], None] | None) -> None:
    die_with_parent()  # the zygote, and so the worker, killed (time-out, stop): so is this
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    faulthandler.enable(file=fault_w, all_threads=False)  # the user's line, if it crashes
    if confine is not None:
        confine()
    import torch

    torch.set_num_threads(max(1, threads))


def frame_writer(fd: int) -> Callable[[dict, bytes], None]:
    def send(message: dict, blob: bytes = b"") -> None:
        data = frame(message, blob)
        view = memoryview(_HEADER.pack(len(data)) + data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    return send


class FrameReader:
    """Length-prefixed frames from the child's pipe, as they complete."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()

    def read_one(self) -> bytes | None:
        """Block until one whole frame has arrived; None if the pipe closes first."""
        while True:
            frames = self.read()
            if frames is None:
                return None
            if frames:
                return frames[0]

    def read(self) -> list[bytes] | None:
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            return None
        self.buffer += chunk
        frames = []
        while len(self.buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buffer)
            if size > _MAX_FRAME:
                return None  # nonsense from the child: treat it as dead
            if len(self.buffer) < _HEADER.size + size:
                break
            frames.append(bytes(self.buffer[_HEADER.size:_HEADER.size + size]))
            del self.buffer[:_HEADER.size + size]
        return frames


class _Relay:
    """What the worker passes on from a child: ``log`` and ``result`` messages of this message's
    jobs only, one result per job, logs within ``max_log_bytes`` per job (an escaped child could
    write anything into its pipe; the feeder must only see what a job may say)."""

    def __init__(self, ids: list[str], forward: Callable[[dict, bytes], None], max_log_bytes: int) -> None:
        self.ids = list(ids)
        self.forward = forward
        self.answered: set[str] = set()
        self.logged = dict.fromkeys(ids, 0)
        self.max_log_bytes = max_log_bytes

    def pass_on(self, data: bytes) -> None:
        try:
            message, blob = unframe(data)
        except ProtocolError:
            return
        job, op = str(message.get("job")), message.get("op")
        if job not in self.logged or job in self.answered:
            return
        if op == "log":
            text = str(message.get("text", ""))
            self.logged[job] += len(text)
            if self.max_log_bytes and self.logged[job] > 2 * self.max_log_bytes + _LOG_SLACK:
                return  # a backstop: the child's own cap (child.py) ends its output first
            self.forward({"op": "log", "job": job, "text": text}, b"")
        elif op == "result" and isinstance(message.get("result"), dict):
            self.answered.add(job)
            self.forward({"op": "result", "job": job, "result": message["result"]}, blob)

    def unanswered(self) -> list[str]:
        return [job for job in self.ids if job not in self.answered]

    def crashed(self, reason: dict) -> None:
        for job in self.unanswered():
            self.forward({"op": "crashed", "job": job, **reason}, b"")


def _crash_reason(code: int, fault: str) -> dict:
    """Why the child died, in words, with the user's line when faulthandler printed it."""
    reason = exit_reason(code) if code else "ended without answering"
    if code == -signal.SIGSEGV or code == -signal.SIGBUS:
        reason += (": the job wrote to the served model's weights (read-only memory), or recursed "
                   "deeper than the C stack allows (e.g. hashing, printing or comparing a deeply "
                   "nested object)")
    lines = _LINE.findall(fault)
    return {"reason": reason, "lineno": int(lines[0]) if lines else None}


def _feeder_says_abort(control: Any, pids: list[int], later: list[tuple[dict, bytes]]) -> bool:
    """Read the feeder's next message: ``abort`` (or the feeder gone) kills the job's processes and
    returns True; anything else is kept in ``later`` for the worker."""
    try:
        received = unframe(control.recv_bytes())
    except (EOFError, OSError, ProtocolError):
        received = None
    if received is None or received[0].get("op") == "abort":
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return True
    later.append(received)
    return False


def _drain(fd: int) -> str:
    chunks = []
    with contextlib.suppress(OSError):
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")
