"""Split execution: the model's forward in a host process that runs no user code, each request's
code in a process of its own (a body), for a co-tenant batch and for a lone job alike.

Offers:
    Host(zygote)        the worker's long-lived host process, forked from the zygote; ``.dead`` once
                        it ended (the worker forks a new one for the next pass), ``.stop()``
    body_process(zygote, later=False) -> JobProcess
                        a body's process, forked ahead, with its link made (``JobProcess.peer``);
                        ``later``: without waiting for the fork (``Zygote.fork_later``)
    run_split(host, bodies, message, blob, forward, control, max_log_bytes=0) -> later
        run a ``batch`` message (``channel.py``) as one pass of ``host`` and one of ``bodies`` per
        request; pass on what the bodies say (each for its own job only); return what the feeder
        sent meanwhile (as ``forked.JobProcess.run`` does)

Process layout::

    worker (never runs user code)          zygote ── forks ──► host (once) and each body
    ─────────────────────────────
    host process (long-lived): {"op": "host"} + the n requests, and the host's end of n links
      runs ONE forward (jobs/split_host.py), no user code ◄──── link i: a socket pair
    body process i (one request): {"op": "body"} + request i only
      runs request i's block (jobs/split_body.py) ─────────────────┘
      ──► log / result of job i ──► worker ──► feeder

Why split: in one process, requests that share a forward share an address space: a replaced
callable, a ``hook=True`` call, a hook installed from code the sandbox does not guard, or raw Python
reached through a library all act on the shared forward or read the neighbours' rows. Here a body's
process holds only its own request and its own rows; the host, which holds every request's rows,
runs nothing but the model and glassbox's relay (issue 21, README: Security).

Why one long-lived host rather than one per pass: a process forked from the zygote runs its first
forward far slower than a warm one (copy-on-write faults on every page of the interpreter and the
allocator it touches: the tiny GPT-2's first job in a fresh fork took 3,064 page faults and 14 ms
against 110 and 6 ms warm, timed by a one-off script; SmolLM2's job in bench/remote_latency.py,
141 ms with a host per pass against 114 with this one, as in a warm process), and the host is the
process that runs the forward. It is safe to keep: it runs no user code, so nothing a job does
persists in it; what it reads from a body is data (``split_link.py``: JSON and raw tensor bytes,
never pickle) that lands only in that body's own rows. Its freed heap holds earlier passes'
rows, but nothing that runs there can read it back. A host that fails (or is stopped with a pass,
on cancel or time-out) ends, and the next pass gets a new one.

A body that asks for what a shared pass cannot give (``.source``, ``hook=True``, the tracer...)
runs its request alone in its own process; a host that fails makes every body run alone; a body
that dies is reported (``crashed``) for its own job only, once every process of the pass ended.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from typing import Any

from .child import batch_requests
from .forked import FrameReader, JobProcess, frame_writer, run_processes
from .zygote import Zygote

__all__ = ["Host", "body_process", "run_split"]

_SETTLE_SECONDS = 60.0  # how long a host may take to end its pass once its bodies have ended


class Host:
    """The worker's handle on its host process (see the module docstring)."""

    def __init__(self, zygote: Zygote) -> None:
        job_r, self.job_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.fault_r, fault_w = os.pipe()
        self.links, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.reap = zygote.reap
        try:
            self.pid = zygote.fork_host(job_r, out_w, fault_w, theirs.fileno())
        except BaseException:
            for fd in (self.job_w, self.out_r, self.fault_r):
                os.close(fd)
            self.links.close()
            raise
        finally:
            for fd in (job_r, out_w, fault_w):
                os.close(fd)
            theirs.close()
        self.frames = FrameReader(self.out_r)
        self.dead = False

    def start(self, message: dict, blob: bytes, peers: list[socket.socket]) -> None:
        """Hand the host one pass: ``message`` with ``blob`` (the requests), and ``peers`` (its end of
        each body's link, closed here once sent). A host that is gone makes ``.dead`` True; its
        bodies then find their link closed and run alone."""
        try:
            frame_writer(self.job_w)(message, blob)
            socket.send_fds(self.links, [b"links"], [peer.fileno() for peer in peers])
        except OSError:
            self.stop()
        finally:
            for peer in peers:
                peer.close()

    def settle(self) -> None:
        """Wait for the host to end the pass it was given (its ``hosted``); a host that ends
        instead, or takes longer than ``_SETTLE_SECONDS`` after its bodies, is stopped for good."""
        if self.dead:
            return
        deadline = time.monotonic() + _SETTLE_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.out_r], [], [], left)
            if not ready:
                break
            frames = self.frames.read()
            if frames is None:
                break
            if frames:
                return  # "hosted": nothing else comes from a host
        self.stop()

    def stop(self) -> None:
        """End the host process (the worker stops, or it failed); ``.dead`` from now on."""
        if self.dead:
            return
        self.dead = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.reap(self.pid)
        for fd in (self.job_w, self.out_r, self.fault_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.links.close()


def body_process(zygote: Zygote, *, later: bool = False) -> JobProcess:
    """A process for the next job, forked ahead with a link to a host (used if the job runs split;
    a job that runs on its own leaves it unused)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        return JobProcess(zygote.fork_later if later else zygote.fork, zygote.reap, links=(theirs.fileno(),),
                          peer=ours, later=later)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()  # the process holds it now: a body sees its host end when the host dies


def run_split(host: Host, bodies: list[JobProcess], message: dict, blob: bytes,
              forward: Any, control: Any, *, max_log_bytes: int = 0) -> list[tuple[dict, bytes]]:
    """See the module docstring. ``bodies``: one per request of ``message``, made by
    ``body_process``."""
    ids = [str(job) for job in message["jobs"]]
    limits = message.get("limits") or {}
    host.start({"op": "host", "jobs": ids, "sizes": message["sizes"], "limits": limits}, blob,
               [body.peer for body in bodies])
    for body in bodies:
        body.peer = None  # closed by start: the host holds the other end now
    body_message = {"op": "body", "limits": limits, "lone": len(ids) == 1}
    jobs = [(body, {**body_message, "job": job_id}, request, [job_id])
            for body, job_id, request in zip(bodies, ids, batch_requests(message, blob))]
    later = run_processes(jobs, forward, control, max_log_bytes=max_log_bytes,
                          also=() if host.dead else (host.pid,))
    host.settle()
    return later
