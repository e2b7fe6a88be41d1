"""Servers that restart or die while another one shares their PostgreSQL database (instances.py).

Two real ``glassbox serve`` processes on one database of the session's private PostgreSQL, with
the instance timeout cut to a few seconds ($GLASSBOX_INSTANCE_TIMEOUT) so that a dead server is
noticed quickly:

- restarting one server while the other runs a job leaves that job alone: it runs on, claimed
  once, and the restarted server runs other jobs meanwhile;
- a server killed with SIGKILL has its running job taken by the other one once its heartbeat is
  older than the timeout: the job runs there once more and completes (printed once, as stored);
- ``InstanceSlot`` gives a restarted server its previous id, and live servers sharing a state
  dir an id each.

Claims are counted by the database trigger of test_postgres.py (``claims``), not by the code
under test.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text
from test_postgres import AUDIT, FOREVER, MARKED, claimed, claims, marked_job, saved_values, wait_final

from glassbox.cli import RunningServer, start_server
from glassbox.offline import tiny_gpt2_path
from glassbox.remote import transport
from glassbox.server.instances import InstanceSlot
from glassbox.server.store import JobStore
from waiting import HANG, REQUEST, patient

NAMES = ("server-a", "server-b")
# Seconds without a heartbeat before a server counts as dead (default 30): short, so that the test
# of a killed server waits little, and long enough that a live server on a busy machine, beating
# every TIMEOUT / 6 s, never misses six beats in a row (the other one would take its jobs).
TIMEOUT = patient(20.0)
# Spins long enough that the server running it is killed mid-way, then prints and saves its marker.
SPINNING = ("n = 0\nwhile n < spins:\n    n = n + 1\n"
            "print('ran', marker, 'once')\necho = glassbox.save(marker)\n")
SPINS = 30_000_000


@pytest.fixture(scope="module")
def shared(postgres):
    url = postgres.create_database("shared")
    store = JobStore(url)
    with store.engine.begin() as connection:
        connection.execute(text(AUDIT))
    try:
        yield url, store
    finally:
        store.close()


def _start(url: str, name: str, state_dir: str) -> RunningServer:
    args = ["--db-url", f"{url}?application_name={name}", "--max-batch", "1", "--torch-threads", "1",
            "--max-seconds", str(HANG)]  # FOREVER jobs end when cancelled
    for attempt in range(3):
        try:
            return start_server({"gpt2": str(tiny_gpt2_path())}, state_dir=state_dir, args=args)
        except RuntimeError:  # the free port was taken before the server bound it
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def pair(shared, tmp_path_factory):
    """Both servers, by name (a test may replace one: the fixture stops whatever is there at the end)."""
    url, _store = shared
    started: dict[str, RunningServer] = {}
    with pytest.MonkeyPatch.context() as patch:
        # The servers (restarted ones too) inherit it; it is this module's only while it runs.
        patch.setenv("GLASSBOX_INSTANCE_TIMEOUT", str(TIMEOUT))
        threads = [threading.Thread(target=lambda n=name: started.__setitem__(
            n, _start(url, n, str(tmp_path_factory.mktemp(n))))) for name in NAMES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()  # start_server's own limit ends a start that hangs
        try:
            assert set(started) == set(NAMES), "a server did not start (see its server.log)"
            yield started
        finally:
            for server in started.values():
                server.stop()


@pytest.fixture
def key(shared, request) -> str:
    return shared[1].create_key(request.node.name[:60])[1]


def _claimed_by(store: JobStore, job: str) -> str:
    return claimed(store, job)[0][1]


def test_restarting_a_server_leaves_the_job_the_other_one_runs_alone(pair, shared, key):
    url, store = shared
    job = transport.submit(pair[NAMES[0]].url, key, marked_job(FOREVER, "long"), timeout=REQUEST)
    holder = _claimed_by(store, job)
    other = next(name for name in NAMES if name != holder)
    state_dir = pair[other].state_dir
    pair[other].stop()
    pair[other] = _start(url, other, state_dir)  # its startup settles what its last life left
    # The restarted server runs other jobs (the long one did not come back to the queue ahead of them),
    next_job = transport.submit(pair[other].url, key, marked_job(MARKED, "next"), timeout=REQUEST)
    assert wait_final(pair[other].url, key, next_job)["status"] == "COMPLETED"
    assert [server for _, server, _ in claims(store, [next_job])] == [other]
    # while the long one is still running where it started, claimed once.
    assert (store.get(job).status, store.get(job).attempts) == ("RUNNING", 1)
    assert claims(store, [job]) == [(job, holder, 1)]
    assert "interrupted and queued again" not in pair[other].output().rpartition("loading models")[2]
    # It ends once, stopped through the restarted server.
    transport.cancel(pair[other].url, key, job)
    assert wait_final(pair[holder].url, key, job)["status"] == "CANCELLED"
    assert claims(store, [job]) == [(job, holder, 1)]


def test_the_running_job_of_a_killed_server_runs_again_on_the_other_one(pair, shared, key):
    _url, store = shared
    job = transport.submit(pair[NAMES[0]].url, key, marked_job(SPINNING, "m1", spins=SPINS), timeout=REQUEST)
    holder = _claimed_by(store, job)
    other = next(name for name in NAMES if name != holder)
    pair[holder].kill()  # SIGKILL: no requeue, no goodbye; its heartbeat just stops
    state = wait_final(pair[other].url, key, job)
    assert state["status"] == "COMPLETED" and state["attempts"] == 2
    assert [(server, attempts) for _, server, attempts in claims(store, [job])] == [(holder, 1), (other, 2)]
    assert state["logs"] == "ran m1 once\n"  # the interrupted run's output went with it
    assert saved_values(pair[other].url, key, job)["echo"] == "m1"
    assert "1 queued again" in pair[other].output()


def test_a_restarted_server_gets_its_previous_id_and_live_ones_sharing_a_state_dir_one_each(tmp_path):
    first, second = InstanceSlot(tmp_path), InstanceSlot(tmp_path)
    try:
        assert first.id != second.id and first.id.startswith(second.id.rpartition("-")[0])
        previous = first.id
        first.release()  # what the kernel does when the process dies
        first = InstanceSlot(tmp_path)
        assert first.id == previous
    finally:
        first.release()
        second.release()
    elsewhere = InstanceSlot(tmp_path / "new" / "dir")
    elsewhere.release()
    assert elsewhere.id not in (previous, second.id)
