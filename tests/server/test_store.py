"""The job store on SQLite and on PostgreSQL: keys stored hashed, FIFO queue, atomic transitions
(claims racing across processes), restart recovery, expiry, and several servers on one database:
jobs held by live servers, orphans of dead ones, cancel flags.

Every test taking ``db_url`` or ``store`` runs once per database: a new SQLite file, or a new
database on the session's private PostgreSQL server (``postgres.py``; skipped without one).
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import text

from glassbox.server.store import (
    MAX_ATTEMPTS,
    Finished,
    JobStore,
    OverQuota,
    TooManyJobs,
    hash_key,
    output_bytes,
)
from waiting import HANG  # thread joins and barriers: limits against hangs only


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("postgres").create_database("store")


@pytest.fixture
def store(db_url):
    store = JobStore(db_url)
    yield store
    store.close()


def _queued(store: JobStore, key_id: str = "k1", model: str = "gpt2", request: bytes = b"req") -> str:
    job = store.create_job(key_id, model, request)
    assert store.mark_queued(job)
    return job


def test_keys_are_stored_hashed_and_authenticate(store, tmp_path):
    info, key = store.create_key("alice")
    assert key.startswith("gbx_") and len(key) > 40
    assert store.authenticate(key) == info
    assert store.authenticate(key + "x") is None and store.authenticate("") is None
    assert store.authenticate(None) is None
    with store.engine.connect() as connection:
        raw = [tuple(row) for row in connection.execute(text("select name, key_hash from api_keys"))]
        # The key itself is nowhere in the database, in no column of no table.
        dumped = [str(tuple(row)) for table in ("api_keys", "jobs")
                  for row in connection.execute(text(f"select * from {table}"))]
    assert raw == [("alice", hash_key(key))]
    assert not any(key in row for row in dumped)
    if store.url.startswith("sqlite"):
        assert key.encode() not in (tmp_path / "jobs.db").read_bytes()


def test_revoke_by_name_or_id(store):
    a, key_a = store.create_key("alice")
    b, key_b = store.create_key("bob")
    assert [k.id for k in store.revoke_key(a.id)] == [a.id]
    assert store.authenticate(key_a) is None and store.authenticate(key_b) == b
    assert [k.name for k in store.revoke_key("bob")] == ["bob"]
    assert store.authenticate(key_b) is None
    assert store.revoke_key("bob") == []  # already revoked
    assert [k.revoked is not None for k in store.list_keys()] == [True, True]
    with pytest.raises(ValueError, match="name"):
        store.create_key("  ")


def test_queue_is_first_in_first_out_with_positions(store):
    jobs = [_queued(store) for _ in range(5)]
    assert [job.id for job in store.queued()] == jobs
    assert [store.position(job) for job in jobs] == [0, 1, 2, 3, 4]
    assert store.next_queued().id == jobs[0]
    assert store.claim(jobs[0]) and not store.claim(jobs[0])  # one claim wins
    assert store.position(jobs[0]) is None and store.position(jobs[1]) == 0
    assert store.get(jobs[0]).status == "RUNNING" and store.get(jobs[0]).attempts == 1
    assert len({*jobs}) == 5 and all(len(job) >= 20 for job in jobs)  # random, unguessable ids


def test_a_job_queued_at_admission_learns_its_place_in_the_same_transaction(store):
    first = _queued(store)
    store.create_job("k1", "gpt2", b"r")  # RECEIVED, not queued: no place in the queue
    second, ahead = store.queue_job("k1", "gpt2", b"q", batch_key="trace:gpt2")
    assert ahead == 1 == store.position(second) and store.get(second).status == "QUEUED"
    assert store.claim(first) == b"req" and store.request(second) == b"q"
    third, ahead = store.queue_job("k1", "gpt2", b"w")
    assert ahead == 1 == store.position(third)  # the running one no longer counts
    claimed = store.claim_many([second, third, "no-such-job"])
    assert claimed == {second: b"q", third: b"w"} and store.claim_many([second]) == {}


def test_received_is_not_queued_until_marked(store):
    job = store.create_job("k1", "gpt2", b"x")
    assert store.get(job).status == "RECEIVED" and store.next_queued() is None
    assert store.mark_queued(job) and not store.mark_queued(job)


def test_the_batch_key_decided_at_submit_is_kept_with_the_job(store):
    keyed = store.create_job("k1", "gpt2", b"x", batch_key="trace:gpt2")  # the feeder reads it from here
    alone = store.create_job("k1", "gpt2", b"x")
    assert store.mark_queued(keyed) and store.mark_queued(alone)
    assert [(info.id, info.batch_key) for info in store.queued()] == [(keyed, "trace:gpt2"), (alone, None)]
    assert store.get(keyed).batch_key == "trace:gpt2" and store.next_queued().batch_key == "trace:gpt2"


def test_finish_stores_result_drops_request_and_is_final(store):
    job = _queued(store, request=b"big request")
    store.claim(job)
    assert store.finish(job, "COMPLETED", result=b"result", logs="printed\n")
    info = store.get(job)
    assert (info.status, info.logs, info.has_result, info.error) == ("COMPLETED", "printed\n", True, None)
    assert info.finished >= info.started >= info.created
    assert store.result(job) == b"result" and store.request(job) is None
    assert not store.finish(job, "ERROR", error={"type": "X"})  # a final status never changes
    assert store.get(job).status == "COMPLETED"
    with pytest.raises(ValueError, match="final"):
        store.finish(job, "RUNNING")


def test_error_is_kept_as_json(store):
    job = _queued(store)
    store.claim(job)
    store.finish(job, "ERROR", error={"type": "ZeroDivisionError", "lineno": 3})
    assert store.get(job).error == {"type": "ZeroDivisionError", "lineno": 3}


def test_cancel_only_changes_jobs_that_have_not_started(store):
    waiting, running = _queued(store), _queued(store)
    store.claim(running)
    assert store.cancel(waiting, result=b"cancelled") == "CANCELLED"
    assert store.result(waiting) == b"cancelled" and store.request(waiting) is None
    assert store.cancel(running) == "RUNNING"
    assert store.cancel("no-such-job") is None
    assert not store.claim(waiting)  # a cancelled job is never run


def test_max_active_per_key_is_enforced_atomically(store):
    errors, made = [], []

    def submit() -> None:
        try:
            made.append(store.create_job("k1", "gpt2", b"x", max_active=5))
        except TooManyJobs as err:
            errors.append(err)

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG)
    assert len(made) == 5 and len(errors) == 15
    assert errors[0].limit == 5 and store.active_count("k1") == 5
    store.create_job("k2", "gpt2", b"x", max_active=5)  # other keys are not affected
    for job in made:
        store.mark_queued(job)
        store.claim(job)
        store.finish(job, "COMPLETED")
    store.create_job("k1", "gpt2", b"x", max_active=5)  # finished jobs do not count


def test_recover_after_a_dead_server(db_url):
    url = db_url
    store = JobStore(url, instance="server-1")
    store.begin_life()
    queued = _queued(store)
    running = _queued(store)
    rerun_already = _queued(store)
    received = store.create_job("k1", "gpt2", b"x")
    later = _queued(store)
    for job in (running, rerun_already):
        store.claim(job)
    for _ in range(MAX_ATTEMPTS - 1):  # it has been interrupted before and requeued
        store._transition(rerun_already, ("RUNNING",), status="QUEUED")
        store.claim(rerun_already)
    store.close()

    store = JobStore(url, instance="server-1")  # "the server restarted" (the same id: see InstanceSlot)
    counts = store.recover()
    assert counts == {"requeued": 1, "failed": 1, "dropped": 1, "cancelled": 0, "queued": 2}
    # The interrupted job keeps its place: it was taken first, it runs first.
    assert [job.id for job in store.queued()] == [queued, running, later]
    assert store.get(running).attempts == 1 and store.request(running) == b"req"
    failed = store.get(rerun_already)
    assert failed.status == "ERROR" and failed.error["type"] == "ServerRestarted"
    assert "not run again" in failed.error["message"]
    assert store.get(received).status == "ERROR" and "submit it again" in store.get(received).error["message"]
    assert store.recover() == {"requeued": 0, "failed": 0, "dropped": 0, "cancelled": 0, "queued": 3}
    store.close()


def test_requeue_does_not_count_an_attempt(store):
    job = _queued(store)
    store.claim(job)
    assert store.requeue(job)
    info = store.get(job)
    assert info.status == "QUEUED" and info.attempts == 0 and info.started is None


def test_delete_expired_keeps_active_and_recent_jobs(store):
    old, recent, waiting = _queued(store), _queued(store), _queued(store)
    for job in (old, recent):
        store.claim(job)
        store.finish(job, "COMPLETED", result=b"r")
    now = time.time()
    assert store.delete_expired(3600, now=now) == 0
    assert store.delete_expired(3600, now=now + 7200) == 2
    assert store.get(old) is None and store.get(recent) is None
    assert store.get(waiting).status == "QUEUED"


def test_in_memory_database_is_shared_across_threads():
    store = JobStore("sqlite://")
    job = _queued(store)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(store.get(job)))
    thread.start()
    thread.join(HANG)
    assert seen[0].status == "QUEUED"
    store.close()


def test_listing_a_keys_jobs_skips_blobs(store):
    a = _queued(store, key_id="alice", request=b"x" * 1000)
    _queued(store, key_id="bob")
    jobs = store.jobs_of("alice")
    assert [job.id for job in jobs] == [a] and not jobs[0].has_result


def test_stored_results_are_counted_per_key_and_the_quota_refuses_at_or_over_it(store):
    big, small = _queued(store), _queued(store)
    for job, result in ((big, b"r" * 600), (small, b"s" * 400)):
        store.claim(job)
        store.finish(job, "COMPLETED", result=result)
    cancelled = _queued(store)
    store.cancel(cancelled, result=b"c" * 24)  # what its owner fetches counts too
    _queued(store, key_id="k2")
    assert store.stored_bytes("k1") == 1024 and store.stored_bytes("k2") == 0
    assert store.stored_bytes("nobody") == 0
    store.create_job("k1", "gpt2", b"x", max_stored_bytes=1025)  # under it: accepted
    with pytest.raises(OverQuota) as err:
        store.create_job("k1", "gpt2", b"x", max_stored_bytes=1024)  # at it: refused
    assert (err.value.stored, err.value.limit) == (1024, 1024)
    store.create_job("k2", "gpt2", b"x", max_stored_bytes=1024)  # other keys are not affected
    store.create_job("k1", "gpt2", b"x", max_stored_bytes=0)  # 0: no quota
    # Results are held until they expire; then the key may submit again.
    assert store.delete_expired(3600, now=time.time() + 7200) == 3
    assert store.stored_bytes("k1") == 0
    store.create_job("k1", "gpt2", b"x", max_stored_bytes=1024)


def test_errors_and_printed_output_count_toward_the_quota_like_results(store):
    job = _queued(store)
    store.claim(job)
    error, logs = {"type": "ValueError", "message": "bad é"}, "printed ü\n"
    assert store.finish(job, "ERROR", result=b"r" * 100, error=error, logs=logs)
    assert store.stored_bytes("k1") == output_bytes(b"r" * 100, error, logs) > 100 + len(logs)
    assert store.replace_result(job, b"n" * 10) == 90  # deleting the result frees only the result
    assert store.stored_bytes("k1") == output_bytes(b"n" * 10, error, logs)


def test_the_quota_holds_when_an_output_is_stored_not_only_at_submit(store):
    jobs = [_queued(store) for _ in range(4)]  # all accepted: the key holds nothing yet
    for job in jobs:
        store.claim(job)
    kept = store.finish(jobs[0], "COMPLETED", result=b"a" * 600, logs="x" * 100, max_stored_bytes=1000)
    assert kept == Finished("COMPLETED", None, kept=True)
    refused = store.finish(jobs[1], "COMPLETED", result=b"b" * 600, logs="y" * 10, max_stored_bytes=1000)
    assert refused.status == "ERROR" and not refused.kept and refused.error["type"] == "QuotaExceeded"
    message = refused.error["message"]
    assert "its result, error and printed output are 610 bytes" in message and "hold 700 bytes" in message
    assert "quota of 1,000 bytes (max_stored_bytes_per_key" in message
    assert "DELETE /v1/jobs/ID/result" in message
    info = store.get(jobs[1])
    assert info.status == "ERROR" and info.error == refused.error and info.logs == "" and not info.has_result
    assert store.result(jobs[1]) is None  # none of its bytes kept: only the (small) error
    assert store.stored_bytes("k1") == 700 + len(json.dumps(refused.error))
    # A cancelled job stays cancelled; an output that fits is kept as it was. (The errors that
    # took the place of outputs count too: a key over its quota gets no more jobs, so few exist.)
    cancelled = store.finish(jobs[2], "CANCELLED", logs="z" * 500, max_stored_bytes=1000)
    assert cancelled.status == "CANCELLED" and not cancelled.kept
    assert store.finish(jobs[3], "ERROR", error={"type": "E"}, max_stored_bytes=10_000).kept


def test_finishes_racing_for_one_keys_quota_keep_at_most_the_quota(db_url):
    """Jobs of one key finishing at once (on PostgreSQL through two stores: two API processes)
    keep no more than the quota between them: the count and the write are one locked transaction."""
    first = JobStore(db_url)
    stores = [first, JobStore(db_url) if db_url.startswith("postgresql") else first]
    try:
        jobs = [_queued(first) for _ in range(12)]
        for job in jobs:
            assert first.claim(job)
        for store in stores:  # a job may be finished only by the instance that claimed it
            store.instance = first.instance
        outcomes: list = []
        start = threading.Barrier(len(jobs))

        def finish(n: int) -> None:
            start.wait(HANG)
            outcomes.append(stores[n % 2].finish(jobs[n], "COMPLETED", result=b"r" * 300,
                                                 max_stored_bytes=1000))

        threads = [threading.Thread(target=finish, args=(n,)) for n in range(len(jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG)
        assert sum(outcome.kept for outcome in outcomes) == 3 and len(outcomes) == len(jobs)
        assert sum(len(first.result(job) or b"") for job in jobs) == 900
    finally:
        for store in {id(s): s for s in stores}.values():
            store.close()


# ---------------------------------------------------------------- several processes, one database


def test_claims_racing_from_two_stores_run_each_job_exactly_once(db_url):
    """Two JobStores (two engines and connection pools: what two API processes have), four
    claimers each, all racing for the same jobs: each job is claimed once, by one of them."""
    stores = [JobStore(db_url), JobStore(db_url)]
    try:
        jobs = [_queued(stores[0]) for _ in range(30)]
        won: list[tuple[int, str]] = []
        start = threading.Barrier(8)

        def claimer(n: int) -> None:
            store = stores[n % 2]
            start.wait(HANG)
            # Each claimer walks the queue in its own order, so they collide mid-list too.
            for job in jobs[n:] + jobs[:n]:
                if store.claim(job):
                    won.append((n, job))

        threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG)
        assert sorted(job for _, job in won) == sorted(jobs)
        assert {info.attempts for job in jobs if (info := stores[1].get(job))} == {1}
        assert len({n for n, _ in won}) > 1  # the race really had several winners
        assert stores[1].queued() == []
    finally:
        for store in stores:
            store.close()


def test_stores_opened_at_once_on_a_new_postgres_database_all_work(postgres):
    # Several API processes starting together on one new database each create the tables if
    # missing: none may fail. (PostgreSQL only: it is what several API processes share.)
    db_url = postgres.create_database("schema")
    stores, errors = [], []

    def open_store() -> None:
        try:
            stores.append(JobStore(db_url))
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=open_store) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG)
    try:
        assert errors == [] and len(stores) == 5
        job = _queued(stores[0])
        assert stores[4].get(job).status == "QUEUED"
    finally:
        for store in stores:
            store.close()


def test_blobs_timestamps_and_printed_text_survive_the_database(store):
    request = bytes(range(256)) * 4096  # every byte value, 1 MiB: a binary column, not text
    job = _queued(store, request=request)
    assert store.request(job) == request
    store.claim(job)
    # A job may print anything, NUL included (which PostgreSQL text cannot hold).
    store.finish(job, "ERROR", result=b"\x00" * 10, error={"message": "a\x00b ü"}, logs="x\x00y ü\n")
    info = store.get(job)
    assert info.logs == "x\N{REPLACEMENT CHARACTER}y ü\n" and info.error == {"message": "a\x00b ü"}
    assert store.result(job) == b"\x00" * 10
    # Timestamps keep sub-millisecond precision (double precision, not a 4-byte real).
    assert isinstance(info.created, float) and info.created == store.jobs_of("k1")[0].created
    assert info.created % 1 != 0 and info.started > info.created and info.finished > info.started


# ---------------------------------------------------------------- servers that come and go


def _make_silent(store: JobStore, instance: str, seconds: float = 3600) -> None:
    """As if ``instance`` had not beaten for ``seconds``: its heartbeat moved back in the database."""
    with store.engine.begin() as connection:
        connection.execute(text("UPDATE instances SET heartbeat = heartbeat - :s WHERE id = :i"),
                           {"s": seconds, "i": instance})


def test_a_restarting_server_leaves_the_jobs_of_live_servers_alone(db_url):
    a, b = JobStore(db_url, instance="a"), JobStore(db_url, instance="b")
    try:
        a.recover()
        running = _queued(a)
        assert a.claim(running)
        received = a.create_job("k1", "gpt2", b"x")  # a's API answers its client in a moment
        b.recover()
        b.close()
        b = JobStore(db_url, instance="b")  # b restarts while a runs a job
        assert b.recover() == {"requeued": 0, "failed": 0, "dropped": 0, "cancelled": 0, "queued": 0}
        assert (a.get(running).status, a.get(running).attempts) == ("RUNNING", 1)
        assert a.get(received).status == "RECEIVED" and a.mark_queued(received)
        assert b.requeue_orphans() == {"requeued": 0, "failed": 0, "dropped": 0, "cancelled": 0}
        assert a.finish(running, "COMPLETED", result=b"r")
    finally:
        a.close()
        b.close()


def test_the_jobs_of_a_silent_server_run_once_more_elsewhere_and_it_cannot_undo_that(db_url):
    a, b = JobStore(db_url, instance="a"), JobStore(db_url, instance="b")
    try:
        a.recover()
        b.recover()
        job, received, mine = _queued(a), a.create_job("k1", "gpt2", b"x"), _queued(b)
        assert a.claim(job) and b.claim(mine)
        _make_silent(a, "a")
        assert b.requeue_orphans() == {"requeued": 1, "failed": 0, "dropped": 1, "cancelled": 0}
        # Back at the head of the queue, the attempt counted (as after a crash); b's own job untouched.
        assert [info.id for info in b.queued()] == [job] and b.get(job).attempts == 1
        assert b.get(received).error["type"] == "ServerRestarted" and b.get(mine).status == "RUNNING"
        assert b.claim(job)
        # a was not dead after all: it can neither requeue nor finish what b runs now.
        assert not a.requeue(job) and not a.retry(job) and not a.finish(job, "COMPLETED", result=b"a")
        assert b.get(job).status == "RUNNING"
        _make_silent(b, "b")  # then b goes silent too: run twice, the job fails; b's own runs again
        a.heartbeat()
        assert a.requeue_orphans() == {"requeued": 1, "failed": 1, "dropped": 0, "cancelled": 0}
        assert a.get(job).error["type"] == "ServerRestarted" and "2 times" in a.get(job).error["message"]
        assert a.get(mine).status == "QUEUED"
    finally:
        a.close()
        b.close()


def test_a_server_that_left_cleanly_has_its_leftovers_taken_at_once(db_url):
    a, b = JobStore(db_url, instance="a"), JobStore(db_url, instance="b")
    try:
        a.recover()
        b.recover()
        job = _queued(a)
        assert a.claim(job)
        assert b.requeue_orphans()["requeued"] == 0
        a.leave()  # its worker could not stop the job in time
        assert b.requeue_orphans()["requeued"] == 1 and b.get(job).status == "QUEUED"
        assert [i.id for i in b.instances()] == ["b", "a"] and b.instances()[1].heartbeat == 0
    finally:
        a.close()
        b.close()


def test_a_cancel_asked_anywhere_flags_the_running_job_for_its_server(db_url):
    a, b = JobStore(db_url, instance="a"), JobStore(db_url, instance="b")
    try:
        a.recover()
        b.recover()
        job, other = _queued(a), _queued(a)
        assert a.claim(job) and a.claim(other)
        assert a.cancel_requests([job, other]) == []
        assert b.cancel(job, result=b"c") == "RUNNING"  # through another server: only a flag
        assert a.cancel_requests([job, other]) == [job] and a.cancel_requests([]) == []
        assert a.get(job).status == "RUNNING" and a.result(job) is None
        # Its server died before it saw the flag: the job is cancelled, not run again.
        _make_silent(a, "a")
        assert b.requeue_orphans() == {"requeued": 1, "failed": 0, "dropped": 0, "cancelled": 1}
        assert (b.get(job).status, b.get(job).error["type"]) == ("CANCELLED", "Cancelled")
    finally:
        a.close()
        b.close()


def test_a_database_from_before_instances_gets_the_new_columns(db_url):
    store = JobStore(db_url)
    job = _queued(store)
    with store.engine.begin() as connection:  # the jobs table as it was
        connection.execute(text("ALTER TABLE jobs DROP COLUMN held_by"))
        connection.execute(text("ALTER TABLE jobs DROP COLUMN cancel_requested"))
    store.close()
    store = JobStore(db_url, instance="new")
    try:
        assert store.recover()["queued"] == 1 and store.claim(job)
        assert store.cancel(job) == "RUNNING" and store.cancel_requests([job]) == [job]
        assert store.finish(job, "CANCELLED")
    finally:
        store.close()


def test_a_running_jobs_note_is_stored_for_every_server_and_cleared_when_it_ends_or_requeues(db_url):
    a, b = JobStore(db_url, instance="a"), JobStore(db_url, instance="b")
    try:
        a.recover()
        b.recover()
        done, again, crashed, orphan = (_queued(a) for _ in range(4))
        assert not a.set_note(done, "loading gpt2")  # not running: nothing is done for it yet
        assert a.claim(done) and a.get(done).note is None
        assert not b.set_note(done, "loading gpt2")  # only the server running it says what it does
        assert a.set_note(done, "loading gpt2 (evicting tiny)")
        assert b.get(done).note == "loading gpt2 (evicting tiny)"  # any server answers with it
        assert [j.note for j in b.jobs_of("k1") if j.id == done] == ["loading gpt2 (evicting tiny)"]
        assert a.set_note(done, "x" * 600) and len(b.get(done).note) == 500  # a long one is cut
        assert a.finish(done, "COMPLETED", result=b"r") and b.get(done).note is None
        for job, back in ((again, a.requeue), (crashed, a.retry)):
            assert a.claim(job) and a.set_note(job, "loading gpt2")
            assert back(job) and (b.get(job).status, b.get(job).note) == ("QUEUED", None)
        assert a.claim(orphan) and a.set_note(orphan, "loading gpt2")
        _make_silent(a, "a")
        assert b.requeue_orphans()["requeued"] == 1 and b.get(orphan).note is None
        assert b.claim(orphan) and b.get(orphan).note is None  # a new run starts with nothing said
    finally:
        a.close()
        b.close()


def test_what_the_queue_wait_estimate_reads_counts_and_durations(store):
    ahead = [_queued(store, model=m) for m in ("gpt2", "llama", "gpt2")]
    mine = _queued(store, model="gpt2")
    assert store.ahead_of(mine) == {"gpt2": 2, "llama": 1}
    assert store.ahead_of(ahead[0]) == {} and store.ahead_of("no-such-job") is None
    assert store.recent_durations(["gpt2", "llama"]) == {}  # no history yet
    for job in ahead:
        assert store.claim(job)
    assert store.ahead_of(ahead[0]) is None and store.ahead_of(mine) == {}
    assert store.finish(ahead[0], "COMPLETED", result=b"r") and store.finish(ahead[2], "ERROR")
    assert store.finish(ahead[1], "COMPLETED", result=b"r")
    durations = store.recent_durations(["gpt2", "llama", "other"])
    assert sorted(durations) == ["gpt2", "llama"] and len(durations["gpt2"]) == 1  # COMPLETED only
    [info] = [store.get(ahead[0])]
    assert durations["gpt2"] == [info.finished - info.started]
    assert len(store.recent_durations(["gpt2"], limit=0).get("gpt2", [])) == 0


def test_a_database_from_before_job_notes_gets_the_column(db_url):
    store = JobStore(db_url)
    job = _queued(store)
    with store.engine.begin() as connection:  # the jobs table as it was
        connection.execute(text("ALTER TABLE jobs DROP COLUMN note"))
    store.close()
    store = JobStore(db_url, instance="new")
    try:
        assert store.get(job).note is None and store.claim(job) and store.set_note(job, "loading gpt2")
        assert store.get(job).note == "loading gpt2"
    finally:
        store.close()


def test_claims_and_finishes_commit_without_waiting_for_the_disk_and_admission_waits(store):
    """A job's claim and finish may be undone by a power cut (recovery runs the job again), so
    their commits do not wait for the disk; admitting a job, which the client is told about, does
    (as far as the database is set to: the tests' PostgreSQL runs without fsync altogether)."""
    def setting(durable: bool) -> object:
        with store._session(durable=durable) as session:
            if store.url.startswith("sqlite"):
                return session.exec_driver_sql("PRAGMA synchronous").scalar()  # 2 FULL, 1 NORMAL
            return session.exec_driver_sql("SHOW synchronous_commit").scalar()

    if store.url.startswith("sqlite"):
        assert (setting(True), setting(False), setting(True)) == (2, 1, 2)  # each kind its own connections
    else:
        assert setting(False) == "off"  # SET LOCAL: this transaction only
    job, _ = store.queue_job("k1", "gpt2", b"request")
    assert store.claim(job) == b"request"
    assert store.finish(job, "COMPLETED", result=b"r") is not None
    assert store.result(job) == b"r"  # what either kind commits, the other reads
