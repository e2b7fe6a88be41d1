"""The zygote's forks asked for without waiting (``Zygote.fork_later``): a batch's bodies are
forked while the pass already runs, so their pids are read later, and the zygote's answers must
still reach the process each was for. Real processes, forked from a real zygote; the handler
stands in for a job (it reports the pid of the process it runs in and the job it was given)."""

from __future__ import annotations

import multiprocessing
import os

from glassbox.server.workers.forked import JobProcess, run_processes
from glassbox.server.workers.zygote import Zygote


def _report(message: dict, blob: bytes, send, links) -> None:
    send({"op": "result", "job": message["job"], "result": {"pid": os.getpid(), "blob": blob.decode()}})


def test_processes_forked_later_get_their_own_jobs_and_pids_in_any_order_of_asking() -> None:
    zygote = Zygote(_report, lambda message: {}, threads=1, confine=None)
    feeder, control = multiprocessing.Pipe()
    try:
        now = JobProcess(zygote.fork, zygote.reap)  # one asked for the usual way, in between
        later = [JobProcess(zygote.fork_later, zygote.reap, later=True) for _ in range(3)]
        last = JobProcess(zygote.fork_later, zygote.reap, later=True)
        heard: list[tuple[dict, bytes]] = []
        processes = [*later, now, last]
        # Each gets its job before anyone asked for its pid: the pipes exist, the process reads
        # its job once it is forked.
        jobs = [(process, {"op": "job", "job": f"j{i}"}, f"request {i}".encode(), [f"j{i}"])
                for i, process in enumerate(processes)]
        assert run_processes(jobs, lambda message, blob: heard.append((message, blob)), control) == []
        results = {message["job"]: message["result"] for message, _ in heard if message["op"] == "result"}
        assert sorted(results) == [f"j{i}" for i in range(len(processes))]
        for i, process in enumerate(processes):
            assert results[f"j{i}"] == {"pid": process.pid, "blob": f"request {i}"}
        assert len({process.pid for process in processes}) == len(processes)
        assert not [message for message, _ in heard if message["op"] == "crashed"]
    finally:
        feeder.close()
        control.close()
        zygote.stop()


def test_an_unused_spare_forked_later_is_discarded_cleanly() -> None:
    zygote = Zygote(_report, lambda message: {}, threads=1, confine=None)
    try:
        spare = JobProcess(zygote.fork_later, zygote.reap, later=True)
        spare.discard()  # reads an empty job and exits; its pid was asked for to reap it
        assert spare.pid > 0
        other = JobProcess(zygote.fork, zygote.reap)  # the zygote answers in order afterwards
        assert other.pid not in (spare.pid, 0)
        other.discard()
    finally:
        zygote.stop()
