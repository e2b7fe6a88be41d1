"""Tenant isolation against a real ``glassbox serve``: every limit counts everything a tenant
makes the server hold or send, and nothing tells one tenant about another.

A key whose finished results fill its stored-bytes quota is refused (429, with the numbers, the
flag and what to do) while other keys go on; saved strings count against the result limit like
tensors; one key cancelling its queued jobs in a loop does not stop another key's running job.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from glassbox.cli import start_server
from glassbox.remote import transport
from job_requests import job_request

QUOTA = 100_000
MAX_RESULT = 20_000_000
ECHO = "echo = glassbox.save(marker)\n"
BIG = "h = glassbox.save(torch.zeros(50_000))\n"  # 200,000 bytes of tensor: twice the quota
# Plain Python in the sandbox: a few seconds on one core (about 4 s here), while the 20 submits
# and cancels below take a fraction of a second.
LONG = "print('looping')\nn = 0\nfor i in range(40_000_000):\n    n = n + 1\necho = glassbox.save(marker)\n"


def _job(source: str, marker: str = "m"):
    return job_request(source, values={"marker": marker}, inputs=["The Eiffel Tower is in"], model_refs={},
                       modules={"glassbox": "glassbox", "torch": "torch"}, returns=("echo", "h", "s"),
                       filename="<remote block>")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from glassbox.offline import tiny_gpt2_path

    state_dir = str(tmp_path_factory.mktemp("limits"))
    running = start_server({"gpt2": str(tiny_gpt2_path())}, state_dir=state_dir, args=[
        "--max-stored-bytes-per-key", str(QUOTA), "--max-result-bytes", str(MAX_RESULT),
        "--max-seconds", "120", "--torch-threads", "1",
        "--max-batch", "1",  # a job runs alone: the queue waits behind it
    ])
    try:
        yield running
    finally:
        running.stop()


def submit(server, key: str, source: str, marker: str = "m") -> str:
    return transport.submit(server.url, key, _job(source, marker), timeout=30)


def final(server, key: str, job: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (state := transport.status(server.url, key, job))["status"] not in transport.FINAL:
        assert time.monotonic() < deadline, f"job {job} is still {state['status']} after {timeout} s"
        time.sleep(0.05)
    return state


def saved(server, key: str, job: str) -> dict:
    result = transport.result(server.url, key, job)
    assert result.ok, result.error
    return result.decoded()["saved"]


def test_a_key_over_its_stored_bytes_quota_gets_429_and_other_keys_go_on(server):
    alice, bob = server.create_key("alice"), server.create_key("bob")
    big = submit(server, alice, BIG)
    assert final(server, alice, big)["status"] == "COMPLETED"
    stored = httpx.get(f"{server.url}/v1/jobs/{big}/result", headers={"X-API-Key": alice}, timeout=30)
    assert stored.status_code == 200 and len(stored.content) > QUOTA  # what the quota counts
    response = httpx.post(server.url + "/v1/jobs", headers={"X-API-Key": alice}, timeout=30,
                          content=_job(ECHO).frame())
    assert response.status_code == 429
    message = response.json()["detail"]
    assert f"hold {len(stored.content):,} bytes of results" in message
    assert f"quota of {QUOTA:,} bytes (--max-stored-bytes-per-key)" in message
    assert re.search(r"fetch the results you need and let them expire .* larger quota", message), message
    # The refused key still has its result, and another key is not affected.
    assert tuple(saved(server, alice, big)["h"].shape) == (50_000,)
    job = submit(server, bob, ECHO, "bob's")
    assert final(server, bob, job)["status"] == "COMPLETED" and saved(server, bob, job)["echo"] == "bob's"


def test_saved_strings_count_against_the_result_limit(server):
    key = server.create_key("strings")
    over = submit(server, key, 's = glassbox.save("x" * 30_000_000)\n')
    state = final(server, key, over)
    assert state["status"] == "ERROR" and state["error"]["type"] == "MemoryError"
    assert f"over this server's result limit of {MAX_RESULT:,}" in state["error"]["message"]
    under = submit(server, key, 's = glassbox.save("x" * 1_000_000)\n')
    assert final(server, key, under)["status"] == "COMPLETED"
    assert saved(server, key, under)["s"] == "x" * 1_000_000


def test_one_key_cancelling_its_queued_jobs_does_not_stop_another_keys_job(server):
    canceller, worker_user = server.create_key("canceller"), server.create_key("runner")
    running = submit(server, worker_user, LONG, "ran to the end")
    deadline = time.monotonic() + 120
    while transport.status(server.url, worker_user, running)["status"] != "RUNNING":
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.02)
    queued = [submit(server, canceller, ECHO, f"c{i}") for i in range(20)]
    outcomes = []
    for job in queued:
        outcomes.append(transport.cancel(server.url, canceller, job)["status"])
        # The other key is answered between the cancels.
        assert transport.status(server.url, worker_user, running)["status"] in ("RUNNING", "COMPLETED")
    # Normally all were still queued; had the long job finished first, some ran and completed.
    assert set(outcomes) <= {"CANCELLED", "COMPLETED"}, outcomes
    for job in queued:
        assert final(server, canceller, job)["status"] in ("CANCELLED", "COMPLETED")
    state = final(server, worker_user, running)
    assert state["status"] == "COMPLETED" and state["attempts"] == 1, state
    assert state["logs"] == "looping\n" and saved(server, worker_user, running)["echo"] == "ran to the end"
