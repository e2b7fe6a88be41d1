"""Real ``glassbox serve`` processes on the session's private PostgreSQL (``postgres.py``).

Two API processes (each with its own worker) share one database: the client's ``remote=True``
traces and the CLI's keys work against either; jobs submitted to both all complete, each claimed
and run exactly once, while both keep answering; a job queued on a server whose worker is busy is
run by the other one (every feeder takes from the one queue in the database), and a client that
follows it on the first server gets its printed output and error; a running job is cancelled
through the server that does not run it. (Servers that restart or die: test_shared_database.py.)

How runs are counted without trusting the code under test: a trigger installed in the test
database records every row update that moves a job to RUNNING (a claim that lost changes no row,
so fires nothing), with the ``application_name`` of the connection that made it, which each
server gets from its ``--db-url`` (``?application_name=server-a``). Jobs print a marker, and
each marker must be in its own job's stored output exactly once.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from sqlalchemy import text

from glassbox import CONFIG, LanguageModel
from glassbox.cli import RunningServer, start_server
from glassbox.offline import tiny_gpt2_path
from glassbox.remote import transport
from glassbox.remote.job import JobRequest
from glassbox.server.store import JobStore
from job_requests import job_request, saved
from waiting import HANG, REQUEST, wait_until

NAMES = ("server-a", "server-b")
FOREVER = "n = 0\nwhile True:\n    n = n + 1\n"

# Every update that makes a job RUNNING, and who made it: the test's own count of claims.
AUDIT = """
CREATE TABLE claim_audit (job_id text NOT NULL, server text NOT NULL, attempts integer NOT NULL);
CREATE FUNCTION audit_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'RUNNING' AND OLD.status <> 'RUNNING' THEN
        INSERT INTO claim_audit VALUES (NEW.id, current_setting('application_name'), NEW.attempts);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER jobs_claim_audit AFTER UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION audit_claim();
"""


def marked_job(source: str, marker: str, **values: object) -> JobRequest:
    """A job as the client sends it: the block's source plus the values it reads (``marker``, ``values``)."""
    return job_request(source, values={"marker": marker, **values}, inputs=["The Eiffel Tower is in"],
                       model_refs={}, modules={"glassbox": "glassbox"}, returns=("echo",),
                       filename="<remote block>")


# The marker is a value the job reads (sent with it), so one source serves every job.
MARKED = "print('ran', marker, 'once')\necho = glassbox.save(marker)\n"


@pytest.fixture(scope="module")
def database(postgres):
    """The shared database: tables made by the store, the audit trigger, and a JobStore to read it."""
    url = postgres.create_database("serve")
    store = JobStore(url)
    with store.engine.begin() as connection:
        connection.execute(text(AUDIT))
    try:
        yield url, store
    finally:
        store.close()


@pytest.fixture(scope="module")
def servers(database, tmp_path_factory) -> dict[str, RunningServer]:
    """Two ``glassbox serve`` processes on the one database, started at the same time."""
    url, _store = database
    path = str(tiny_gpt2_path())
    started: dict[str, RunningServer] = {}
    failed: list[BaseException] = []

    def start(name: str) -> None:
        args = ["--db-url", f"{url}?application_name={name}", "--max-batch", "1", "--torch-threads", "1",
                "--max-seconds", str(HANG)]  # FOREVER jobs end when cancelled
        for attempt in range(3):
            try:
                started[name] = start_server({"gpt2": path}, state_dir=str(tmp_path_factory.mktemp(name)),
                                             args=args)
                return
            except RuntimeError as err:  # the free port was taken before the server bound it
                if attempt == 2:
                    failed.append(err)

    threads = [threading.Thread(target=start, args=(name,)) for name in NAMES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()  # start_server's own limit ends a start that hangs
    try:
        assert not failed, failed
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture
def key(database, request) -> str:
    return database[1].create_key(request.node.name[:60])[1]


def claims(store: JobStore, jobs: list[str]) -> list[tuple[str, str, int]]:
    """(job, server, attempts) for every claim of these jobs, as the trigger saw them."""
    with store.engine.connect() as connection:
        rows = connection.execute(text("SELECT job_id, server, attempts FROM claim_audit"))
        return [tuple(row) for row in rows if row.job_id in set(jobs)]


def wait_final(url: str, key: str, job: str) -> dict:
    def final() -> dict | None:
        state = transport.status(url, key, job)
        return state if state["status"] in transport.FINAL else None

    return wait_until(final, f"job {job} to finish")


def claimed(store: JobStore, job: str) -> list[tuple[str, str, int]]:
    """The claims of ``job`` once it has one."""
    return wait_until(lambda: claims(store, [job]), f"job {job} to be claimed")


def saved_values(url: str, key: str, job: str) -> dict:
    result = transport.result(url, key, job)
    assert result.ok, result.error
    return saved(result)


# ---------------------------------------------------------------- one database, each server


def test_the_client_and_the_keys_cli_work_against_either_server(servers, database, monkeypatch):
    url, _store = database
    made = subprocess.run([sys.executable, "-m", "glassbox.cli", "keys", "create", "--name", "pg-cli",
                           "--db-url", url], capture_output=True, text=True, timeout=HANG)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert [info.name for info in _store.list_keys()].count("pg-cli") == 1

    model = LanguageModel(str(tiny_gpt2_path()), remote_name="gpt2")  # the name the servers serve it as
    with model.trace("The Eiffel Tower is in"):
        expected = model.output.logits.save()
    monkeypatch.setattr(CONFIG, "API_KEY", key)
    monkeypatch.setattr(CONFIG, "STATUS", False)
    monkeypatch.setattr(CONFIG, "TIMEOUT", HANG)
    for name in NAMES:
        monkeypatch.setattr(CONFIG, "HOST", servers[name].url)
        with model.trace("The Eiffel Tower is in", remote=True):
            logits = model.output.logits.save()
        # Same weights; the worker's thread count may order float sums differently, hence a tolerance.
        torch.testing.assert_close(logits, expected.detach(), msg=name)
    assert [job.status for job in _store.jobs_of(_store.authenticate(key).id)] == ["COMPLETED"] * 2


# ---------------------------------------------------------------- two servers, one queue


def test_jobs_submitted_to_two_servers_are_each_claimed_and_run_exactly_once(servers, database, key):
    _url, store = database
    urls = [servers[name].url for name in NAMES]
    markers = [f"m{i:02d}" for i in range(12)]
    answered: Counter = Counter()
    failures: list[str] = []
    done = threading.Event()

    def watch() -> None:
        # Both servers keep answering while the jobs run (health, and a job list from the database).
        while not done.is_set():
            for name, url in zip(NAMES, urls):
                try:
                    health = httpx.get(url + "/v1/health", headers={"X-API-Key": key}, timeout=REQUEST)
                    listing = httpx.get(url + "/v1/jobs", headers={"X-API-Key": key}, timeout=REQUEST)
                    if health.status_code == listing.status_code == 200:
                        answered[name] += 1
                    else:
                        failures.append(f"{name}: {health.status_code} {listing.status_code}")
                except httpx.HTTPError as err:
                    failures.append(f"{name}: {err!r}")
            done.wait(0.1)

    def submit(i: int) -> tuple[str, str]:
        url = urls[i % 2]
        return url, transport.submit(url, key, marked_job(MARKED, markers[i]), timeout=REQUEST)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            submitted = list(pool.map(submit, range(12)))
        # Each job's status is asked of the server it was NOT submitted to: one shared database.
        states = [wait_final(urls[1 - urls.index(url)], key, job) for url, job in submitted]
    finally:
        done.set()
        watcher.join()
    jobs = [job for _, job in submitted]
    assert [state["status"] for state in states] == ["COMPLETED"] * 12
    for (url, job), marker in zip(submitted, markers):
        assert saved_values(url, key, job)["echo"] == marker
    for state, marker in zip(states, markers):
        assert state["logs"].count(f"ran {marker} once") == 1, state["logs"]
        assert sum(other["logs"].count(f"ran {marker} ") for other in states) == 1
    assert [store.get(job).attempts for job in jobs] == [1] * 12
    claimed = claims(store, jobs)
    assert sorted(job for job, _, _ in claimed) == sorted(jobs)  # 12 claims: one per job, no more
    assert {attempts for _, _, attempts in claimed} == {1}
    by_server = Counter(server for _, server, _ in claimed)
    assert set(by_server) == set(NAMES), by_server  # both workers ran some of them
    assert failures == [] and min(answered[name] for name in NAMES) >= 1, (failures, answered)


def test_a_job_queued_on_a_busy_server_is_run_by_the_other(servers, database, key):
    _url, store = database
    blocker = transport.submit(servers["server-a"].url, key, marked_job(FOREVER, "blocker"), timeout=REQUEST)
    [(_, holder, _)] = claimed(store, blocker)  # whichever worker took it is now busy until it is cancelled
    busy = servers[holder].url
    other = next(name for name in NAMES if name != holder)
    try:
        job = transport.submit(busy, key, marked_job(MARKED, "next"), timeout=REQUEST)
        # Followed on the busy server, which learns of the end from the database.
        events = list(transport.events(busy, key, job, timeout=HANG))
        assert events[-1]["status"] == "COMPLETED"
        assert saved_values(busy, key, job)["echo"] == "next"
        assert [(server, attempts) for _, server, attempts in claims(store, [job])] == [(other, 1)]
        assert store.get(blocker).status == "RUNNING"
    finally:
        # Only the server running a job can stop it (its worker holds the process).
        cancelled = httpx.delete(f"{busy}/v1/jobs/{blocker}", headers={"X-API-Key": key}, timeout=REQUEST)
    assert cancelled.json()["cancelled"] is True
    assert wait_final(busy, key, blocker)["status"] == "CANCELLED"
    assert [server for _, server, _ in claims(store, [blocker])] == [holder]


@contextlib.contextmanager
def one_worker_held(servers: dict[str, RunningServer], store: JobStore, key: str
                    ) -> Iterator[tuple[str, str, str]]:
    """(holder, other, blocker): a job that never ends runs on the server ``holder``, so the next
    job submitted anywhere runs on ``other``. The blocker is cancelled at the end."""
    blocker = transport.submit(servers[NAMES[0]].url, key, marked_job(FOREVER, "blocker"), timeout=REQUEST)
    [(_, holder, _)] = claimed(store, blocker)
    try:
        yield holder, next(name for name in NAMES if name != holder), blocker
    finally:
        if not store.get(blocker).terminal:
            httpx.delete(f"{servers[holder].url}/v1/jobs/{blocker}", headers={"X-API-Key": key},
                         timeout=REQUEST)
        wait_final(servers[holder].url, key, blocker)


# ---------------------------------------------------------------- following and cancelling across servers


def test_a_client_following_a_job_on_a_server_that_does_not_run_it_gets_its_output(
        servers, database, key, monkeypatch, capsys):
    _url, store = database
    model = LanguageModel(str(tiny_gpt2_path()), remote_name="gpt2")
    monkeypatch.setattr(CONFIG, "API_KEY", key)
    monkeypatch.setattr(CONFIG, "STATUS", False)
    monkeypatch.setattr(CONFIG, "TIMEOUT", HANG)
    with one_worker_held(servers, store, key) as (holder, other, _blocker):
        monkeypatch.setattr(CONFIG, "HOST", servers[holder].url)  # submitted and followed here, run there
        capsys.readouterr()
        with model.trace("The Eiffel Tower is in", remote=True):
            print("printed on", "the other server")
            logits = model.output.logits.save()
        assert "printed on the other server\n" in capsys.readouterr().out
        assert logits.shape[-1] == model.config.vocab_size
        [job] = [info for info in store.jobs_of(store.authenticate(key).id) if info.id != _blocker]
        assert [server for _, server, _ in claims(store, [job.id])] == [other]
        # The polling fallback reads the same output (and a job's error) from the database.
        assert transport.status(servers[holder].url, key, job.id)["logs"] == "printed on the other server\n"
        failing = transport.submit(servers[holder].url, key, marked_job("print('x')\n1 / 0\n", "e"),
                                   timeout=REQUEST)
        events = list(transport.events(servers[holder].url, key, failing, timeout=HANG))
        assert events[-1]["status"] == "ERROR" and events[-1]["error"]["type"] == "ZeroDivisionError"
        assert "".join(event.get("log", "") for event in events) == "x\n"
        assert [server for _, server, _ in claims(store, [failing])] == [other]


def test_a_running_job_is_cancelled_through_a_server_that_does_not_run_it(servers, database, key):
    _url, store = database
    with one_worker_held(servers, store, key) as (holder, other, blocker):
        answer = httpx.delete(f"{servers[other].url}/v1/jobs/{blocker}", headers={"X-API-Key": key},
                              timeout=REQUEST)
        assert answer.status_code == 200
        assert answer.json() == {"id": blocker, "status": "CANCELLED", "cancelled": True,
                                 "cancel_requested": True}
        state = wait_final(servers[holder].url, key, blocker)
        assert state["status"] == "CANCELLED" and state["attempts"] == 1
        # The holder's worker is free again: a job submitted to the other server may run on either.
        job = transport.submit(servers[other].url, key, marked_job(MARKED, "after"), timeout=REQUEST)
        assert wait_final(servers[holder].url, key, job)["status"] == "COMPLETED"
    assert [server for _, server, _ in claims(store, [blocker])] == [holder]
    assert transport.result(servers[other].url, key, blocker).error.type == "Cancelled"
