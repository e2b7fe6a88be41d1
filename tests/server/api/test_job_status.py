"""A job's status says why it waits, against real servers (tiny GPT-2) and their stores.

- while its model loads on demand, a running job's ``note`` ("loading late", then "late loaded in
  N s") is in ``GET /v1/jobs/{id}``, the websocket's events, ``glassbox jobs status`` and the
  polling fallback, and it is gone once the job ends;
- with several API processes on one PostgreSQL database, every one of them answers with the note
  of a job that another one runs (the note lives in the store);
- a queued job has its position and ``estimated_start_seconds``, None until its model has
  finished jobs, then from their median run time (api/queue_wait.py), in REST, the events, the
  CLI and the client's status line; it names nothing of other tenants.

The server's executor (``gated_executor``, test-only) holds every on-demand load until the test
creates a file, so the test looks at a loading job for as long as it needs: no race with a fast
load, and no fixed sleeps.
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from gated_executor import gated_servers

from glassbox import CONFIG
from glassbox.cli import main
from glassbox.jobs_cli import OK
from glassbox.remote import transport
from glassbox.remote.client import JobHandle, _follow
from job_requests import job_request
from waiting import HANG, REQUEST
from waiting import wait_until as wait_for

pytest.importorskip("fastapi", reason="tested against a real server: pip install 'glassbox[server]'")

ECHO = "echo = glassbox.save(marker)\n"
FOREVER = "print('started')\nn = 0\nwhile True:\n    n = n + 1\n"


def submit(url: str, key: str, source: str, model: str, marker: str = "m") -> str:
    request = job_request(source, model=model, values={"marker": marker}, inputs=["The Eiffel Tower is in"],
                          model_refs={}, modules={"glassbox": "glassbox"}, returns=("echo",),
                          filename="<remote block>")
    return transport.submit(url, key, request, timeout=REQUEST)


def status(url: str, key: str, job: str) -> dict:
    return transport.status(url, key, job)


def finish(url: str, key: str, job: str) -> dict:
    """Follow the job to its end; its final status."""
    list(transport.events(url, key, job, timeout=HANG))
    return status(url, key, job)


def cli(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["jobs", *args])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> Iterator:
    with gated_servers(tmp_path_factory.mktemp("status"), {"gpt2": "eager", "late": "on_demand",
                                                          "est": "eager"}) as (gate, [server]):
        yield gate, server


def test_a_job_whose_model_loads_says_so_in_its_status_everywhere(gated, capsys, monkeypatch):
    gate, server = gated
    key = server.create_key("loading")
    monkeypatch.setenv("GLASSBOX_CONFIG", str(gate.parent / "no-config"))
    loading = submit(server.url, key, FOREVER, "late")
    state = wait_for(lambda: (s := status(server.url, key, loading))["note"] and s, "the loading note")
    assert (state["status"], state["note"], state["position"]) == ("RUNNING", "loading late", None)
    assert state["estimated_start_seconds"] is None
    [listed] = [job for job in transport._json(transport._request("GET", server.url, "/v1/jobs", api_key=key))
                ["jobs"] if job["id"] == loading]
    assert listed["note"] == "loading late"
    code, out = cli(capsys, "status", loading, "--url", server.url, "--key", key)
    assert code == OK and re.search(r"^status\s+RUNNING$", out, re.M)
    assert re.search(r"^note\s+loading late$", out, re.M)
    # The events: a listener that comes late gets the note in its first event, on the websocket
    # and on the polling fallback alike.
    for follow in (transport.events(server.url, key, loading),
                   transport._follow_polling(server.url, key, loading, None, [0], 0.1)):
        first = next(follow)
        follow.close()
        assert (first["status"], first["note"]) == ("RUNNING", "loading late")

    # Queued behind it, for a model with no finished job yet: a position, no estimate.
    behind = submit(server.url, key, ECHO, "late")
    queued = status(server.url, key, behind)
    assert (queued["status"], queued["position"], queued["estimated_start_seconds"], queued["note"]) == (
        "QUEUED", 0, None, None)
    code, out = cli(capsys, "status", behind, "--url", server.url, "--key", key)
    assert re.search(r"^position\s+0 \(jobs ahead in the queue\)$", out, re.M)
    assert re.search(r"^starts in\s+unknown \(no finished jobs of this model", out, re.M)

    (gate / "late").touch()  # the load goes on
    wait_for(lambda: "started" in (status(server.url, key, loading)["logs"] or ""), "the job to run")
    state = status(server.url, key, loading)
    assert state["status"] == "RUNNING" and re.fullmatch(r"late loaded in \d+\.\d s", state["note"]), state
    transport.cancel(server.url, key, loading)
    ended = finish(server.url, key, loading)
    assert ended["status"] == "CANCELLED" and ended["note"] is None
    done = finish(server.url, key, behind)
    assert done["status"] == "COMPLETED" and done["note"] is None  # its model was loaded: nothing to say


def test_a_queued_job_has_a_position_and_an_estimate_from_run_times(gated, capsys):
    _gate, server = gated
    key, other = server.create_key("estimates"), server.create_key("other-tenant")
    # The "est" model's history: these runs only (no other test uses it).
    for n in range(3):
        job = submit(server.url, key, ECHO, "est", f"run{n}")
        assert finish(server.url, key, job)["status"] == "COMPLETED"
    mine = transport._json(transport._request("GET", server.url, "/v1/jobs", api_key=key))["jobs"]
    median = statistics.median(job["finished"] - job["started"] for job in mine if job["model"] == "est")

    blocker = submit(server.url, key, FOREVER, "est")
    started = wait_for(lambda: status(server.url, key, blocker)["started"], "the blocker to start")
    first, second = submit(server.url, key, ECHO, "est", "a"), submit(server.url, other, ECHO, "est", "b")
    # Once the blocker has run longer than the typical run, nothing of it is counted as left.
    wait_for(lambda: time.time() - started > median + 0.1, "the blocker to outlast a typical run")
    a, b = status(server.url, key, first), status(server.url, other, second)
    assert (a["status"], a["position"], a["estimated_start_seconds"]) == ("QUEUED", 0, 0.0)
    assert (b["status"], b["position"], b["estimated_start_seconds"]) == ("QUEUED", 1, round(median, 2))
    # Counts and durations only: nothing of the other tenant's jobs in either answer.
    assert first not in json.dumps(b) and blocker not in json.dumps(b) and second not in json.dumps(a)
    expected = f"~{round(median, 2):.1f} s"
    code, out = cli(capsys, "status", second, "--url", server.url, "--key", other)
    line = rf"^starts in\s+{re.escape(expected)} \(estimated from recent run times\)$"
    assert code == OK and re.search(line, out, re.M), out
    for follow in (transport.events(server.url, other, second),
                   transport._follow_polling(server.url, other, second, None, [0], 0.1)):
        event = next(follow)
        follow.close()
        assert (event["status"], event["position"], event["estimated_start_seconds"]) == (
            "QUEUED", 1, round(median, 2))

    # The client's status line (not a terminal: one line per change), while the job waits.
    lines: list[str] = []
    old = CONFIG.STATUS
    CONFIG.STATUS = True
    follower = threading.Thread(target=_follow, args=(JobHandle(second, server.url, other), HANG))
    try:
        capsys.readouterr()
        follower.start()

        def shown() -> bool:
            lines.extend(capsys.readouterr().err.splitlines())
            return any("QUEUED" in line for line in lines)

        wait_for(shown, "the status line")
        transport.cancel(server.url, key, blocker)
        follower.join(HANG)
    finally:
        CONFIG.STATUS = old
    lines.extend(capsys.readouterr().err.splitlines())
    assert lines[0] == f"[glassbox] job {second[:8]}: QUEUED (position 1, starts in {expected})", lines
    assert lines[-1] == f"[glassbox] job {second[:8]}: COMPLETED", lines
    assert finish(server.url, key, first)["status"] == "COMPLETED"


def test_every_api_process_on_the_database_answers_with_the_note(tmp_path, postgres):
    db_url = postgres.create_database("notes")
    with gated_servers(tmp_path, {"gpt2": "eager", "late": "on_demand"}, count=2, db_url=db_url) as (
            gate, servers):
        key = servers[0].create_key("shared")
        job = submit(servers[0].url, key, FOREVER, "late")

        def notes() -> list:
            return [status(server.url, key, job)["note"] for server in servers]

        # Whichever of the two runs it, both say what it waits for.
        assert wait_for(lambda: all(notes()) and notes(), "both to show the note") == ["loading late"] * 2
        (gate / "late").touch()
        wait_for(lambda: all(re.fullmatch(r"late loaded in \d+\.\d s", note or "") for note in notes()),
                 "both to show the model loaded")
        answer = httpx.delete(f"{servers[1].url}/v1/jobs/{job}", headers={"X-API-Key": key}, timeout=REQUEST)
        assert answer.status_code == 200, answer.text
        ended = [finish(server.url, key, job) for server in servers]
        assert [(state["status"], state["note"]) for state in ended] == [("CANCELLED", None)] * 2
