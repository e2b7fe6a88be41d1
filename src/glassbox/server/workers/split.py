"""Split execution of a co-tenant batch: the model's forward in one process, each request's code in
a process of its own.

Offers:
    run_split(fork, reap, message, blob, forward, control, max_log_bytes=0) -> later
        run a ``batch`` message (``channel.py``) as a host process and one body process per
        request, all forked from the zygote; pass on what the bodies say (each for its own job
        only); return what the feeder sent meanwhile (as ``forked.JobProcess.run`` does)

Process layout::

    worker (never runs user code) ── fork n+1 via the zygote ──┐
                                                                   │
    host process: {"op": "host"} + the n requests                  │ link i: a socket pair
      runs ONE forward (jobs/split_host.py), no user code ◄────────┤ made here, one end each
    body process i: {"op": "body"} + request i only                │
      runs request i's block (jobs/split_body.py) ─────────────────┘
      ──► log / result of job i ──► worker ──► feeder

Why: in one process, requests that share a forward share an address space: a replaced callable, a
``hook=True`` call, a hook installed from code the sandbox does not guard, or raw Python reached
through a library all act on the shared forward or read the neighbours' rows. Here a body's
process holds only its own request and its own rows; the host, which holds every request's rows,
runs nothing but the model and glassbox's relay (issue 21, README: Security).

A body that asks for what a shared pass cannot give (``.source``, ``hook=True``, the tracer...)
runs its request alone in its own process; a host that fails makes every body run alone; a body
that dies is reported (``crashed``) for its own job only, once every process of the pass ended.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

from .child import batch_requests
from .forked import JobProcess, run_processes

__all__ = ["run_split"]


def run_split(fork: Callable[..., int], reap: Callable[[int], int], message: dict, blob: bytes,
              forward: Callable[[dict, bytes], None], control: Any, *,
              max_log_bytes: int = 0) -> list[tuple[dict, bytes]]:
    """See the module docstring."""
    ids = [str(job) for job in message["jobs"]]
    sizes = [int(size) for size in message["sizes"]]
    limits = message.get("limits") or {}
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in ids]
    processes: list[JobProcess] = []
    try:
        processes.append(JobProcess(fork, reap, links=tuple(host.fileno() for host, _ in pairs)))
        processes += [JobProcess(fork, reap, links=(body.fileno(),)) for _, body in pairs]
    except BaseException:
        for process in processes:
            process.discard()
        raise
    finally:
        for pair in pairs:  # the processes hold them now: a body sees its host end when it dies
            for end in pair:
                with contextlib.suppress(OSError):
                    end.close()
    host = {"op": "host", "jobs": ids, "sizes": sizes, "limits": limits}
    jobs = [(processes[0], host, blob, [])]
    for process, job_id, request in zip(processes[1:], ids, batch_requests(message, blob)):
        jobs.append((process, {"op": "body", "job": job_id, "limits": limits}, request, [job_id]))
    return run_processes(jobs, forward, control, max_log_bytes=max_log_bytes)
