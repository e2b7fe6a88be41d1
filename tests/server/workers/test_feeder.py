"""The feeder (``workers/feeder.py``) and the local worker process it drives (``workers/local.py``,
``child.py``, ``forked.py``): FIFO jobs, printed output, time limit, crashes, cancel, no secrets.

Real jobs on a real (tiny, random) GPT-2 through ``glassbox.server.jobs.execute``.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from glassbox.remote.job import JobRequest, JobResult
from glassbox.server.config import ServerConfig
from glassbox.server.store import JobStore
from glassbox.server.workers.channel import WorkerStartError
from glassbox.server.workers.feeder import Feeder
from job_requests import job_request, saved
from waiting import HANG, wait_until

MAX_SECONDS = 3.0  # the time limit of the ``limited`` worker (``worker``'s jobs run until they end)
ECHO = "echo = glassbox.save(marker)\n"
FOREVER = "n = 0\nwhile True:\n    n = n + 1\n"


def _job(source: str, marker: str = "m", model: str = "gpt2", returns: tuple = ("echo", "h")) -> JobRequest:
    """A job as the glassbox client sends it: the block's source plus the values it reads."""
    return job_request(source, model=model, values={"marker": marker}, inputs=["The Eiffel Tower is in"],
                       model_refs={}, modules={"glassbox": "glassbox"}, returns=returns,
                       filename="<remote block>")


@pytest.fixture(scope="module")
def tiny_path() -> str:
    from glassbox.offline import tiny_gpt2_path

    return str(tiny_gpt2_path())


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []

    def __call__(self, job_id: str, event: dict) -> None:
        self.seen.append((job_id, event))

    def of(self, job_id: str) -> list[dict]:
        return [event for job, event in list(self.seen) if job == job_id]


SECRETS = {"GLASSBOX_API_KEY": "gbx_top_secret", "GLASSBOX_DB_URL": "postgresql://user:pw@db/glassbox",
           "GLASSBOX_HARMLESS": "kept"}


def _feeder(tmp_path_factory, tiny_path, max_seconds: float):
    saved_env = {name: os.environ.get(name) for name in SECRETS}
    os.environ.update(SECRETS)  # present in the API process for the whole module: no worker may see them
    store = JobStore(f"sqlite:///{tmp_path_factory.mktemp('worker') / 'jobs.db'}")
    # Batching off: these tests are about one job at a time (tests/server/jobs/test_cotenant.py batches).
    config = ServerConfig(models={"gpt2": tiny_path}, max_seconds=max_seconds, max_log_bytes=2000,
                          torch_threads=1, max_batch=1)
    events = Events()
    handle = Feeder(config, store, on_event=events, say=lambda text: None)
    handle.events = events  # type: ignore[attr-defined]
    try:
        handle.start()
        yield handle
    finally:
        handle.stop()
        store.close()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def worker(tmp_path_factory, tiny_path):
    # HANG: a limit only for a job that hangs; FOREVER jobs here end when a test cancels or kills them.
    yield from _feeder(tmp_path_factory, tiny_path, HANG)


@pytest.fixture(scope="module")
def limited(tmp_path_factory, tiny_path):
    yield from _feeder(tmp_path_factory, tiny_path, MAX_SECONDS)


def _submit(handle: Feeder, source: str, marker: str = "m") -> str:
    job = handle.store.create_job("k1", "gpt2", _job(source, marker).frame())
    handle.store.mark_queued(job)
    handle.wake()
    return job


def _wait(handle: Feeder, job: str):
    return wait_until(lambda: (lambda info: info.terminal and info)(handle.store.get(job)),
                      f"job {job} to finish", interval=0.02)


def _wait_running(handle: Feeder, job: str, other_than: int | None = None) -> None:
    wait_until(lambda: handle.running_job == job and handle.pid != other_than and handle.state == "ready",
               f"job {job} to run" + (f" on a worker other than {other_than}" if other_than else ""),
               interval=0.01)


def _result(handle: Feeder, job: str) -> JobResult:
    return JobResult.read(handle.store.result(job))


def _saved(handle: Feeder, job: str) -> dict:
    _wait(handle, job)
    result = _result(handle, job)
    assert result.ok, result
    return saved(result)


def test_jobs_run_first_in_first_out_with_their_output(worker):
    source = "print('start', marker)\nh = glassbox_model.transformer.h[0].output.save()\n" + ECHO
    jobs = [_submit(worker, source, marker=f"m{i}") for i in range(4)]
    infos = [_wait(worker, job) for job in jobs]
    assert [info.status for info in infos] == ["COMPLETED"] * 4
    starts = [info.started for info in infos]
    assert starts == sorted(starts)  # in the order they were queued
    for i, job in enumerate(jobs):
        values = _saved(worker, job)
        assert values["echo"] == f"m{i}" and tuple(values["h"].shape) == (1, 7, 64)
        assert worker.store.get(job).logs == f"start m{i}\n"
        events = worker.events.of(job)
        assert [e["status"] for e in events] == ["RUNNING", "RUNNING", "COMPLETED"]
        assert events[1]["log"] == f"start m{i}\n" and events[1]["offset"] == 0


def test_a_user_error_is_an_error_result_with_its_line(worker):
    job = _submit(worker, "x = 1\ny = x / 0\n")
    info = _wait(worker, job)
    assert info.status == "ERROR"
    assert info.error["type"] == "ZeroDivisionError" and info.error["lineno"] == 3
    result = _result(worker, job)
    assert result.status == "ERROR" and result.error.line == "y = x / 0"


def test_printed_output_is_capped(worker):
    job = _submit(worker, "for i in range(500):\n    print('line', i)\n" + ECHO)
    info = _wait(worker, job)
    assert info.status == "COMPLETED"
    assert len(info.logs.encode()) < 2000 + 200
    assert info.logs.startswith("line 0\nline 1\n") and "dropped" in info.logs


def test_time_limit_kills_the_job_and_the_next_job_runs(limited):
    worker = limited
    first_pid = worker.pid
    slow = _submit(worker, FOREVER)
    after = _submit(worker, ECHO, marker="after")
    started = time.monotonic()
    info = _wait(worker, slow)
    assert time.monotonic() - started >= MAX_SECONDS
    assert info.status == "ERROR" and info.error["type"] == "TimeoutError"
    assert f"exceeded the time limit of {MAX_SECONDS:g} s" in info.error["message"]
    assert _wait(worker, after).status == "COMPLETED" and _saved(worker, after)["echo"] == "after"
    # The job ran in a process of its own, and only that process was killed: the same worker,
    # with its models still loaded, ran the next job.
    assert worker.pid == first_pid and worker.state == "ready" and worker.restarts == 0


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_job_whose_worker_dies_runs_once_more_and_fails_if_it_dies_again(worker):
    doomed = _submit(worker, FOREVER)
    after = _submit(worker, ECHO, marker="survivor")
    _wait_running(worker, doomed)
    first_pid = worker.pid
    os.kill(first_pid, signal.SIGKILL)  # what the out-of-memory killer does
    _wait_running(worker, doomed, other_than=first_pid)  # crash_retries=1: it runs again
    os.kill(worker.pid, signal.SIGKILL)
    info = _wait(worker, doomed)
    assert info.status == "ERROR" and info.error["type"] == "WorkerCrashed"
    assert "SIGKILL" in info.error["message"] and "restarted" in info.error["message"]
    assert "2 time(s)" in info.error["message"] and info.attempts == 2
    assert _saved(worker, after)["echo"] == "survivor"
    assert worker.restarts >= 2


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_job_whose_worker_died_once_completes_on_the_restarted_one(worker):
    job = _submit(worker, "n = 0\nfor i in range(2_000_000):\n    n = n + 1\necho = glassbox.save(n)\n")
    _wait_running(worker, job)
    os.kill(worker.pid, signal.SIGKILL)
    info = _wait(worker, job)
    assert info.status == "COMPLETED" and info.attempts == 2
    assert _saved(worker, job)["echo"] == 2_000_000


def test_cancelling_the_running_job_kills_it_and_keeps_the_queue(worker):
    running = _submit(worker, FOREVER)
    queued = _submit(worker, ECHO, marker="next")
    _wait_running(worker, running)
    assert worker.cancel(running)
    assert not worker.cancel(queued)  # not running: the API cancels queued jobs in the store
    info = _wait(worker, running)
    assert info.status == "CANCELLED"
    assert _result(worker, running).error.type == "Cancelled"
    assert _saved(worker, queued)["echo"] == "next"
    assert [e["status"] for e in worker.events.of(running)][-1] == "CANCELLED"


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="needs /proc")
def test_the_worker_process_gets_no_secrets(worker):
    job = _submit(worker, ECHO, marker="env")
    assert _wait(worker, job).status == "COMPLETED"
    with open(f"/proc/{worker.pid}/environ", "rb") as file:
        environ = file.read()  # what the process was started with, not only what it kept
    assert b"gbx_top_secret" not in environ and b"user:pw" not in environ
    assert b"GLASSBOX_HARMLESS=kept" in environ
    if "OMP_WAIT_POLICY" not in os.environ:  # the workers' default, not the API process's
        assert b"OMP_WAIT_POLICY=PASSIVE" in environ
    assert os.environ["GLASSBOX_API_KEY"] == "gbx_top_secret"  # the server's own environment is intact


def test_a_model_that_cannot_load_stops_the_start_with_the_reason(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    handle = Feeder(ServerConfig(models={"broken": str(tmp_path / "no-such-model")}), store)
    try:
        with pytest.raises(WorkerStartError, match="no-such-model"):
            handle.start()
        assert handle.state == "failed" and handle.pid is None
    finally:
        handle.stop()
        store.close()
