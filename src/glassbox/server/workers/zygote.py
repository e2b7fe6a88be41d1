"""The zygote: a process forked from the worker before the worker reads any job, from which every
job's process is forked.

Offers:
    Zygote(handler, loader, threads=, confine=)
                   fork it (in the worker, once the worker is confined and before its first job)
    .fork(job_r, out_w, fault_w, *links) -> pid
                   a job's process (``forked.job_process_main``) holding only these descriptors
                   (``links``: the sockets of a shared pass, at most ``MAX_LINKS``)
    .fork_later(job_r, out_w, fault_w, *links) -> pid_of
                   the same, asked for without waiting: ``pid_of()`` waits for its pid. The
                   descriptors are the zygote's once this returns (the caller may close its own)
    .fork_host(job_r, out_w, fault_w, control) -> pid
                   a split host's process (``forked.host_process_main``, ``host.py``): it serves
                   pass after pass
    .reap(pid) -> wait status      the exit status of a job's process (call once it has ended)
    .load(message) -> reply        a ``load`` message (on-demand load, evictions), run here
    .stop()

Why: a process forked from the worker inherits the worker's whole address space, and the worker
reads every request and passes on every result and every printed line. Python and libc free that
memory without clearing it, so a job's process forked from the worker was handed the previous
tenants' prompts, code and saved values as "uninitialised" memory (``malloc``,
``PyObject_Malloc``: tests/server/workers/test_leftovers.py), and a job that escaped the sandbox
could read them from its own heap. The zygote is forked before the first job arrives and never
touches a job's bytes: it is sent three descriptors and a one-line request, and answers with a
pid. Requests travel from the worker into the job's process through a pipe and results back the
same way; the zygote's own heap holds nothing of them, so neither does any process it forks.

Models loaded on demand are loaded here (the processes that run jobs are forked from here), and
the worker drops its own references to the models once the zygote holds them, so an eviction
gives the memory back.

The zygote talks to the worker over a ``SOCK_SEQPACKET`` socket pair (one message a packet; the
descriptors ride along as ``SCM_RIGHTS``). It is single-threaded like the worker (so it can be
forked safely), dies with the worker (``PR_SET_PDEATHSIG``), and its job processes die with it.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

from ..jobs.weights_file import descriptors
from .forked import Handler, die_with_parent, host_process_main, job_process_main, keep_only, prepare_parent

__all__ = ["MAX_LINKS", "Zygote"]

_PACKET = 1 << 16  # a load reply (a model's description) is a few hundred bytes
MAX_LINKS = 250  # the links a shared pass's host holds: one per request (SCM_RIGHTS takes 253 fds)
# Answers to fork_later left unread at most: the zygote must never block sending one (its socket's
# buffer full) while the worker blocks writing a large job into a process not forked yet.
_MAX_UNANSWERED = 32


class Zygote:
    """The worker's handle on its zygote process (see the module docstring)."""

    def __init__(self, handler: Handler,
                 loader: Callable[[dict], dict], *, threads: int, confine: Callable[[], None] | None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # ------------------------------------------------------------ the zygote
            code = 70
            try:
                ours.close()
                # not the feeder's pipe: the zygote talks to the worker only; the weights files it
                # maps stay open, so that they stay locked while it lives (jobs/weights_file.py)
                keep_only(theirs.fileno(), *descriptors())
                die_with_parent()
                _serve(theirs, handler, loader, threads, confine)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self.pid, self._socket = pid, ours
        self._unanswered: list[dict] = []  # forks asked for with fork_later, oldest first

    def fork(self, job_r: int, out_w: int, fault_w: int, *links: int) -> int:
        return self.fork_later(job_r, out_w, fault_w, *links)()

    def fork_later(self, job_r: int, out_w: int, fault_w: int, *links: int) -> Callable[[], int]:
        """Why: forking a process that holds a model takes milliseconds (page tables: ~9 ms with
        SmolLM2 loaded), one after another in the zygote; a co-tenant batch's bodies asked for this
        way are forked while its host and its first bodies already run (split.py)."""
        if len(links) > MAX_LINKS:
            raise ValueError(f"a process can be handed at most {MAX_LINKS} links, not {len(links)}")
        while len(self._unanswered) >= _MAX_UNANSWERED:
            self._unanswered.pop(0).update(self._receive())
        self._send({"op": "fork"}, [job_r, out_w, fault_w, *links])
        answer: dict = {}
        self._unanswered.append(answer)

        def pid_of() -> int:
            while "pid" not in answer:
                self._unanswered.pop(0).update(self._receive())
            return int(answer["pid"])

        return pid_of

    def fork_host(self, job_r: int, out_w: int, fault_w: int, control: int) -> int:
        """A split host's process (``forked.host_process_main``): it serves pass after pass, each
        pass's links handed to it over ``control``."""
        return int(self._ask({"op": "fork", "host": True}, [job_r, out_w, fault_w, control])["pid"])

    def reap(self, pid: int) -> int:
        return int(self._ask({"op": "reap", "pid": pid})["status"])

    def load(self, message: dict) -> dict:
        return self._ask({"op": "load", "message": message})

    def stop(self) -> None:
        """End the zygote (and with it any job process it has waiting)."""
        try:
            self._socket.close()  # it reads end-of-file and exits
        finally:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass

    def _ask(self, message: dict, fds: list[int] | None = None) -> dict:
        self._send(message, fds)
        while self._unanswered:  # the zygote answers in order: the forks asked for before come first
            self._unanswered.pop(0).update(self._receive())
        return self._receive()

    def _send(self, message: dict, fds: list[int] | None = None) -> None:
        data = json.dumps(message).encode()
        if fds:
            socket.send_fds(self._socket, [data], fds)
        else:
            self._socket.send(data)

    def _receive(self) -> dict:
        reply = self._socket.recv(_PACKET)
        if not reply:
            raise OSError("the zygote process ended")
        return json.loads(reply)


def _serve(sock: socket.socket, handler: Handler,
           loader: Callable[[dict], dict], threads: int, confine: Callable[[], None] | None) -> None:
    """The zygote's loop: one request, one reply, until the worker closes the socket."""
    while True:
        data, fds, _, _ = socket.recv_fds(sock, _PACKET, 3 + MAX_LINKS)
        if not data:
            return
        message: dict[str, Any] = json.loads(data)
        op = message.get("op")
        if op == "fork" and len(fds) >= 3:
            pid = os.fork()
            if pid == 0 and message.get("host") and len(fds) == 4:
                host_process_main(*fds, handler, threads, confine, MAX_LINKS)  # never returns
            if pid == 0:
                job_process_main(*fds[:3], handler, threads, confine, tuple(fds[3:]))  # never returns
            for fd in fds:
                os.close(fd)
            reply: dict[str, Any] = {"pid": pid}
        elif op == "reap":
            try:
                _, status = os.waitpid(int(message["pid"]), 0)
            except ChildProcessError:  # not one of ours (or reaped already): nothing to report
                status = 0
            reply = {"status": status}
        elif op == "load":
            reply = loader(message["message"])
            prepare_parent()  # the new model's objects out of the collector, as at start
        else:
            for fd in fds:
                os.close(fd)
            return
        sock.send(json.dumps(reply).encode())
