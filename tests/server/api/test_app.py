"""The real server as a subprocess (``python -m glassbox.cli serve``) on loopback, on SQLite and on
PostgreSQL.

Keys on every endpoint, owner-only jobs, the 4xx refusals, ordered websocket events, time limit,
cancel, concurrency without lost or swapped results, and durability across ``kill -9``.

Jobs that must be running while the test looks (FOREVER) end when the test cancels them or kills
the server, never by a time limit a busy machine could race; the time limit has a server of its
own (``limited``), where nothing else has to happen while it runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import psutil
import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from glassbox import RemoteError
from glassbox.cli import start_server
from glassbox.remote import transport
from glassbox.remote.framing import frame
from glassbox.remote.job import JobRequest, JobResult
from glassbox.remote.protocol import PROTOCOL_VERSION
from job_requests import job_request, saved
from waiting import HANG, REQUEST, wait_until

MAX_SECONDS = 3  # the limited server's time limit
MAX_REQUEST_BYTES = 1_000_000
RATE_LIMIT = 20  # submissions per key and minute: the test makes them in far less than a minute
MAX_JOBS = 3
ECHO = "echo = glassbox.save(marker)\n"
FOREVER = "n = 0\nwhile True:\n    n = n + 1\n"


def _job(source: str, marker: str = "m", model: str = "gpt2", **values) -> JobRequest:
    """A job as the glassbox client sends it: the block's source plus the values it reads."""
    return job_request(source, model=model, values={"marker": marker, **values},
                       inputs=["The Eiffel Tower is in"], model_refs={}, modules={"glassbox": "glassbox"},
                       returns=("echo", "h"), filename="<remote block>")


@pytest.fixture(scope="module")
def tiny_path() -> str:
    from glassbox.offline import tiny_gpt2_path

    return str(tiny_gpt2_path())


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(tmp_path_factory, tiny_path, request):
    """The same server on each database the store supports (a private PostgreSQL: conftest.py)."""
    state = tmp_path_factory.mktemp("server")
    database = []
    if request.param == "postgresql":
        database = ["--db-url", request.getfixturevalue("postgres").create_database("app")]
    running = start_server({"gpt2": tiny_path}, state_dir=str(state), args=[
        *database,
        "--max-seconds", str(HANG), "--max-request-bytes", str(MAX_REQUEST_BYTES),
        "--rate-limit-per-minute", str(RATE_LIMIT), "--max-jobs-per-key", str(MAX_JOBS),
        "--torch-threads", "1", "--max-batch", "1",  # queue order is under test: one job at a time
    ])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def limited(tmp_path_factory, tiny_path):
    """A server whose jobs may run MAX_SECONDS, for the time limit itself."""
    running = start_server({"gpt2": tiny_path}, state_dir=str(tmp_path_factory.mktemp("limited")), args=[
        "--max-seconds", str(MAX_SECONDS), "--torch-threads", "1", "--max-batch", "1"])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def key(server, request) -> str:
    return server.create_key(request.node.name[:60])


def _run(url: str, key: str, source: str, marker: str = "m") -> tuple[JobResult, dict, str]:
    """Submit, follow to the end, fetch: (result, saved values, printed output)."""
    job = transport.submit(url, key, _job(source, marker), timeout=REQUEST)
    printed = "".join(event.get("log", "") for event in transport.events(url, key, job, timeout=HANG))
    result = transport.result(url, key, job, timeout=REQUEST)
    return result, saved(result) or {}, printed


def _wait_final(url: str, key: str, job: str) -> dict:
    def final() -> dict | None:
        state = transport.status(url, key, job)
        return state if state["status"] in transport.FINAL else None

    return wait_until(final, f"job {job} to finish")


def _wait_status(url: str, key: str, job: str, wanted: str) -> None:
    wait_until(lambda: transport.status(url, key, job)["status"] == wanted, f"job {job} to be {wanted}",
               interval=0.02)


# ---------------------------------------------------------------- open endpoints and keys


def test_health_and_models_need_no_key(server, key):
    health = httpx.get(server.url + "/v1/health", timeout=REQUEST).json()
    assert health["protocol"] == PROTOCOL_VERSION and health["glassbox"] and health["status"] == "ok"
    # Without a valid key nothing about what runs where (worker state, pids, other tenants' jobs
    # and batches): test_open_endpoints.py checks every open endpoint.
    assert set(health) == {"glassbox", "protocol", "status"}
    wrong = httpx.get(server.url + "/v1/health", headers={"X-API-Key": "gbx_wrong"}, timeout=REQUEST)
    assert wrong.status_code == 200 and set(wrong.json()) == set(health)
    for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}):
        full = httpx.get(server.url + "/v1/health", headers=headers, timeout=REQUEST).json()
        assert full["backend"] == "local" and full["running"] in (True, False) and full["worker"] == "ready"
        [replica] = full["replicas"]
        assert isinstance(replica["pid"], int) and {"running", "restarts", "batches"} <= set(replica)
    assert transport.models(server.url) == [{"name": "gpt2", "load": "eager", "pinned": False, "replicas": 1}]
    served = transport.models(server.url, key)
    assert [m["name"] for m in served] == ["gpt2"]
    assert served[0]["class"] == "GPT2LMHeadModel" and served[0]["parameters"] > 0
    listing = subprocess.run([sys.executable, "-m", "glassbox.cli", "models", "--host", server.url],
                             capture_output=True, text=True, timeout=HANG,
                             env={**os.environ, "GLASSBOX_API_KEY": key})
    assert listing.returncode == 0 and "gpt2" in listing.stdout and "GPT2LMHeadModel" in listing.stdout


ENDPOINTS = [("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/abc"),
             ("GET", "/v1/jobs/abc/result"), ("DELETE", "/v1/jobs/abc")]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_every_job_endpoint_needs_a_valid_key(server, method, path):
    for headers in ({}, {"Authorization": "Bearer gbx_wrong"}, {"X-API-Key": "gbx_wrong"},
                    {"Authorization": "Basic abc"}):
        response = httpx.request(method, server.url + path, headers=headers, content=b"x", timeout=REQUEST)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_events_websocket_needs_a_valid_key(server, key):
    job = transport.submit(server.url, key, _job(ECHO), timeout=REQUEST)
    for first in ({"api_key": "gbx_wrong"}, {"nothing": 1}):
        with connect(server.url.replace("http", "ws") + f"/v1/jobs/{job}/events", legacy=True,
                     open_timeout=REQUEST) as ws:
            ws.send(json.dumps(first))
            assert json.loads(ws.recv(timeout=REQUEST))["code"] == 401
    with pytest.raises(RemoteError, match=r"API key rejected: set glassbox\.CONFIG\.API_KEY"):
        list(transport.events(server.url, "gbx_wrong", job, timeout=HANG))
    # The key also works as a header or a query parameter.
    url = server.url.replace("http", "ws") + f"/v1/jobs/{job}/events"
    with connect(url, additional_headers={"X-API-Key": key}, legacy=True, open_timeout=REQUEST) as ws:
        assert "status" in json.loads(ws.recv(timeout=REQUEST))
    with connect(url + f"?api_key={key}", legacy=True, open_timeout=REQUEST) as ws:
        assert "status" in json.loads(ws.recv(timeout=REQUEST))


def test_transport_explains_a_rejected_key(server):
    rejected = r"API key rejected: .*GLASSBOX_API_KEY .*glassbox keys create"
    with pytest.raises(RemoteError, match=rejected) as err:
        transport.submit(server.url, "gbx_wrong", _job(ECHO), timeout=REQUEST)
    assert err.value.status_code == 401
    with pytest.raises(RemoteError, match="API key rejected"):
        transport.status(server.url, None, "abc")


def test_keys_cli_create_list_revoke(server):
    def cli(*args: str) -> subprocess.CompletedProcess:
        where = ["--db-url", server.db_url] if server.db_url else ["--state-dir", server.state_dir]
        return subprocess.run([sys.executable, "-m", "glassbox.cli", "keys", *args, *where],
                              capture_output=True, text=True, timeout=HANG)

    made = cli("create", "--name", "carol")
    assert made.returncode == 0
    key = made.stdout.strip()
    assert key.startswith("gbx_") and "\n" not in key and "shown only this once" in made.stderr
    assert "carol" in cli("list").stdout and key not in cli("list").stdout
    _, values, _ = _run(server.url, key, ECHO, marker="carol")
    assert values["echo"] == "carol"
    assert cli("revoke", "carol").returncode == 0
    with pytest.raises(RemoteError, match="API key rejected"):
        transport.submit(server.url, key, _job(ECHO), timeout=REQUEST)
    assert cli("revoke", "carol").returncode == 1  # nothing left to revoke


# ---------------------------------------------------------------- jobs


def test_the_result_comes_on_the_events_websocket_when_asked(server, key):
    """``keep_result``: the result arrives after the final event on the same websocket (no GET),
    the same bytes GET answers; a failed job's error too."""
    job = transport.submit(server.url, key, _job("h = glassbox_model.transformer.h[1].output.save()\n"
                                                  + ECHO, "inline"), timeout=REQUEST)
    kept: dict = {}
    events = list(transport.events(server.url, key, job, timeout=HANG, keep_result=kept))
    assert events[-1]["status"] == "COMPLETED"
    assert kept["result"].frame() == transport.result(server.url, key, job).frame()
    assert saved(kept["result"])["echo"] == "inline"
    failed = transport.submit(server.url, key, _job("raise KeyError('no such thing')\n"), timeout=REQUEST)
    kept = {}
    list(transport.events(server.url, key, failed, timeout=HANG, keep_result=kept))
    assert kept["result"].error.type == "KeyError"
    with connect(server.url.replace("http://", "ws://") + f"/v1/jobs/{job}/events") as plain:
        plain.send(json.dumps({"api_key": key}))  # not asked: the final event is the last message
        assert json.loads(plain.recv(timeout=REQUEST))["status"] == "COMPLETED"
        with pytest.raises(ConnectionClosed):
            plain.recv(timeout=REQUEST)


def test_a_job_streams_its_output_in_order_and_returns_its_values(server, key):
    source = ("for i in range(30):\n    print('line', i)\n"
              "h = glassbox_model.transformer.h[1].output.save()\n" + ECHO)
    job = transport.submit(server.url, key, _job(source, "m-1"), timeout=REQUEST)
    events = list(transport.events(server.url, key, job, timeout=HANG))
    order = {"QUEUED": 0, "RUNNING": 1, "COMPLETED": 2}
    ranks = [order[event["status"]] for event in events]
    assert ranks == sorted(ranks) and events[-1]["status"] == "COMPLETED"
    logs = [event for event in events if event.get("log")]
    assert "".join(event["log"] for event in logs) == "".join(f"line {i}\n" for i in range(30))
    offsets = [event["offset"] for event in logs]
    assert offsets == [sum(len(e["log"]) for e in logs[:i]) for i in range(len(logs))]  # no gap, no repeat
    assert all(event["elapsed"] >= 0 for event in events)
    values = saved(transport.result(server.url, key, job))
    assert values["echo"] == "m-1" and tuple(values["h"].shape) == (1, 7, 64)
    state = transport.status(server.url, key, job)
    assert state["status"] == "COMPLETED" and state["logs"].startswith("line 0\n")
    assert transport.status(server.url, key, job, log_offset=7)["logs"].startswith("line 1\n")


def test_polling_gives_the_same_events_when_the_websocket_is_unavailable(server, key, monkeypatch):
    import websockets.sync.client

    def refuse(*args, **kwargs):
        raise OSError("websocket blocked by a proxy")

    monkeypatch.setattr(websockets.sync.client, "connect", refuse)
    source = "for i in range(20):\n    print('p', i)\n" + ECHO
    _, values, printed = _run(server.url, key, source, marker="polled")
    assert printed == "".join(f"p {i}\n" for i in range(20)) and values["echo"] == "polled"


def test_a_users_error_comes_back_with_its_line(server, key):
    result, _, printed = _run(server.url, key, "print('before')\nx = [1, 2][5]\n")
    assert printed == "before\n"
    assert result.status == "ERROR"
    assert result.error.type == "IndexError" and result.error.lineno == 3


def test_jobs_are_visible_to_their_owner_only(server):
    alice, bob = server.create_key("alice"), server.create_key("bob")
    job = transport.submit(server.url, alice, _job(ECHO, "alice's"), timeout=REQUEST)
    _wait_final(server.url, alice, job)
    for call in (transport.status, transport.result, transport.cancel):
        with pytest.raises(RemoteError, match=f"job {job} not found") as err:
            call(server.url, bob, job)
        assert err.value.status_code == 404
    with pytest.raises(RemoteError, match="not found"):
        list(transport.events(server.url, bob, job, timeout=HANG))

    def listed(key: str) -> list[str]:
        jobs = httpx.get(server.url + "/v1/jobs", headers={"X-API-Key": key}, timeout=REQUEST).json()["jobs"]
        return [j["id"] for j in jobs]

    assert listed(bob) == [] and job in listed(alice)
    assert saved(transport.result(server.url, alice, job))["echo"] == "alice's"


def test_an_unknown_model_is_404_naming_the_served_ones(server, key):
    with pytest.raises(RemoteError, match=r"model 'llama-70b' is not served here; this server serves: gpt2"):
        transport.submit(server.url, key, _job(ECHO, model="llama-70b"), timeout=REQUEST)


def test_an_oversized_request_is_413_naming_the_limit(server, key):
    big = _job(ECHO, pad=torch.zeros(MAX_REQUEST_BYTES // 4 + 1))  # its tensors alone are over the limit
    with pytest.raises(RemoteError, match=r"request too large: .*max_request_bytes") as err:
        transport.submit(server.url, key, big, timeout=REQUEST)
    assert err.value.status_code == 413
    # A body without a declared length is counted as it streams.
    body = iter([b"\0" * 500_000] * 3)
    response = httpx.post(server.url + "/v1/jobs", content=body, headers={"X-API-Key": key}, timeout=REQUEST)
    assert response.status_code == 413


def test_protocol_errors_are_400_with_the_servers_words(server, key):
    request = _job(ECHO)  # a newer client's request: only its header differs, so sent as raw bytes
    newer = frame({**request.envelope(), "protocol": PROTOCOL_VERSION + 1}, request.blob)
    response = httpx.post(server.url + "/v1/jobs", content=newer, headers={"X-API-Key": key}, timeout=REQUEST)
    assert response.status_code == 400
    assert re.match(r"protocol mismatch: .*upgrade the server", response.json()["detail"])
    response = httpx.post(server.url + "/v1/jobs", content=b"not a frame", headers={"X-API-Key": key},
                          timeout=REQUEST)
    assert response.status_code == 400 and "not a glassbox message" in response.json()["detail"]
    # A well-framed request with a malformed field is refused at submit as well: no job is made.
    for field, value, words in (("tracer_name", "__x", "bad tracer name '__x'"),
                                ("method", "train", "unknown method 'train'")):
        bad = frame({**request.envelope(), field: value}, request.blob)
        response = httpx.post(server.url + "/v1/jobs", content=bad, headers={"X-API-Key": key},
                              timeout=REQUEST)
        assert response.status_code == 400
        assert response.json()["detail"].startswith(f"malformed job request: {words}")
    listing = httpx.get(server.url + "/v1/jobs", headers={"X-API-Key": key}, timeout=REQUEST)
    assert listing.json()["jobs"] == []


def test_submissions_over_the_rate_limit_are_429(server, key):
    for _ in range(RATE_LIMIT):  # refused bodies count too: the limit is on requests
        response = httpx.post(server.url + "/v1/jobs", content=b"x", headers={"X-API-Key": key},
                              timeout=REQUEST)
        assert response.status_code == 400
    with pytest.raises(RemoteError, match=rf"rate limit: this API key may submit {RATE_LIMIT} jobs per"):
        transport.submit(server.url, key, _job(ECHO), timeout=REQUEST)
    response = httpx.post(server.url + "/v1/jobs", content=b"x", headers={"X-API-Key": key}, timeout=REQUEST)
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    _, values, _ = _run(server.url, server.create_key("other"), ECHO, "other keys are not limited")
    assert values["echo"] == "other keys are not limited"


def test_the_time_limit_stops_a_job_and_the_next_runs(limited):
    key = limited.create_key("slow")
    slow = transport.submit(limited.url, key, _job(FOREVER), timeout=REQUEST)
    after = transport.submit(limited.url, key, _job(ECHO, "after"), timeout=REQUEST)
    events = list(transport.events(limited.url, key, slow, timeout=HANG))
    assert events[-1]["status"] == "ERROR"
    assert events[-1]["error"]["type"] == "TimeoutError"
    assert f"exceeded the time limit of {MAX_SECONDS} s" in events[-1]["error"]["message"]
    result = transport.result(limited.url, key, slow)
    assert result.status == "ERROR" and result.error.type == "TimeoutError"
    final = _wait_final(limited.url, key, after)
    assert final["status"] == "COMPLETED", final.get("error")
    assert saved(transport.result(limited.url, key, after))["echo"] == "after"


def test_active_jobs_per_key_are_capped(server, key):
    blocker = transport.submit(server.url, key, _job(FOREVER), timeout=REQUEST)
    _wait_status(server.url, key, blocker, "RUNNING")  # until it is cancelled below
    waiting = [transport.submit(server.url, key, _job(ECHO, f"w{i}"), timeout=REQUEST)
               for i in range(MAX_JOBS - 1)]
    too_many = rf"already has {MAX_JOBS} jobs queued or running.*max_jobs_per_key"
    with pytest.raises(RemoteError, match=too_many) as err:
        transport.submit(server.url, key, _job(ECHO), timeout=REQUEST)
    assert err.value.status_code == 429
    state = transport.status(server.url, key, waiting[-1])
    assert state["status"] == "QUEUED" and state["position"] == MAX_JOBS - 2
    with pytest.raises(RemoteError, match="is not finished") as err:
        transport.result(server.url, key, blocker)
    assert err.value.status_code == 409
    assert transport.cancel(server.url, key, blocker)["status"] == "CANCELLED"
    for i, job in enumerate(waiting):
        final = _wait_final(server.url, key, job)
        assert final["status"] == "COMPLETED", final.get("error")
        assert saved(transport.result(server.url, key, job))["echo"] == f"w{i}"


def test_cancel_a_queued_and_a_running_job(server, key):
    running = transport.submit(server.url, key, _job(FOREVER), timeout=REQUEST)
    queued = transport.submit(server.url, key, _job(ECHO, "cancelled"), timeout=REQUEST)
    after = transport.submit(server.url, key, _job(ECHO, "after"), timeout=REQUEST)
    _wait_status(server.url, key, running, "RUNNING")
    cancelled = transport.cancel(server.url, key, queued)
    assert cancelled == {"id": queued, "status": "CANCELLED", "cancelled": True}
    assert transport.cancel(server.url, key, running)["status"] == "CANCELLED"
    assert transport.cancel(server.url, key, running)["cancelled"] is False  # already final
    for job in (queued, running):
        result = transport.result(server.url, key, job)
        assert result.status == "ERROR" and result.error.type == "Cancelled"
        assert list(transport.events(server.url, key, job, timeout=HANG))[-1]["status"] == "CANCELLED"
    _wait_final(server.url, key, after)
    assert saved(transport.result(server.url, key, after))["echo"] == "after"


def test_sixteen_concurrent_clients_get_exactly_their_own_results(server):
    clients, per_client = 16, 10
    keys = [server.create_key(f"client-{c}") for c in range(clients)]
    results: dict[str, object] = {}
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        try:
            for r in range(per_client):
                marker = f"client {c} request {r}"
                _, values, printed = _run(server.url, keys[c], "print(marker)\n" + ECHO, marker)
                with lock:
                    assert marker not in results
                    results[marker] = (values.get("echo"), printed)
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG)
    assert not any(thread.is_alive() for thread in threads)
    assert not failures, failures[0]
    assert len(results) == clients * per_client
    for marker, (echo, printed) in results.items():
        assert echo == marker and printed == marker + "\n"


def test_the_server_survives_malformed_requests(server, key):
    headers = {"X-API-Key": key}
    for content in (b"", b"\xff" * 7, (10**9).to_bytes(8, "big") + b"{}", frame({"protocol": "x"}, b""),
                    frame({"protocol": PROTOCOL_VERSION, "kind": "job"}, b"")):
        response = httpx.post(server.url + "/v1/jobs", content=content, headers=headers, timeout=REQUEST)
        assert response.status_code in (400, 404), response.text
    for path in ("/v1/jobs/%00%ff", "/v1/jobs/x?log_offset=-5"):
        assert httpx.get(server.url + path, headers=headers, timeout=REQUEST).status_code == 404
    url = server.url.replace("http", "ws") + "/v1/jobs/x/events"
    with connect(url, legacy=True, open_timeout=REQUEST) as ws:
        ws.send("not json")
        assert json.loads(ws.recv(timeout=REQUEST))["code"] == 401
    assert httpx.get(server.url + "/v1/health", timeout=REQUEST).json()["status"] == "ok"
    assert _run(server.url, key, ECHO, "still fine")[1]["echo"] == "still fine"


# ---------------------------------------------------------------- durability


def _worker_pids(process_id: int) -> list[int]:
    return [child.pid for child in psutil.Process(process_id).children(recursive=True)]


def test_queued_jobs_survive_kill_9_and_their_owner_fetches_them(tmp_path, tiny_path):
    state = str(tmp_path / "state")
    args = ["--torch-threads", "1", "--max-batch", "1"]  # the queue must wait
    # The blocker runs until the server is killed; the second server stops its rerun at 2 s.
    first = start_server({"gpt2": tiny_path}, state_dir=state, args=[*args, "--max-seconds", str(HANG)])
    try:
        key = first.create_key("dana")
        blocker = transport.submit(first.url, key, _job(FOREVER), timeout=REQUEST)
        _wait_status(first.url, key, blocker, "RUNNING")
        queued = [transport.submit(first.url, key, _job(ECHO, f"q{i}"), timeout=REQUEST) for i in range(5)]
        assert transport.status(first.url, key, queued[-1])["position"] == 4
        workers = _worker_pids(first.process.pid)
        assert workers
    finally:
        first.kill()

    # The orphaned worker notices and exits instead of holding the models' memory.
    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(lambda: all(gone(pid) for pid in workers), "the old worker to exit after its server")
    with pytest.raises(RemoteError, match=r"no glassbox server at .*glassbox serve --model name=path"):
        transport.status(first.url, key, blocker)

    second = start_server({"gpt2": tiny_path}, state_dir=state, args=[*args, "--max-seconds", "2"])
    try:
        assert "1 interrupted and queued again" in second.output()
        for i, job in enumerate(queued):
            assert _wait_final(second.url, key, job)["status"] == "COMPLETED"
            assert saved(transport.result(second.url, key, job))["echo"] == f"q{i}"
        # The interrupted job ran again (first in line), and hit the time limit again.
        state_of_blocker = _wait_final(second.url, key, blocker)
        assert state_of_blocker["status"] == "ERROR" and state_of_blocker["attempts"] == 2
        assert state_of_blocker["started"] < transport.status(second.url, key, queued[0])["started"]
        with pytest.raises(RemoteError, match="not found"):
            transport.result(second.url, second.create_key("eve"), queued[0])
    finally:
        second.stop()
    assert second.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    assert "Traceback" not in second.output(), second.output()[-3000:]


def test_serve_refuses_to_start_without_models_or_with_a_bad_one(tmp_path):
    bare = subprocess.run([sys.executable, "-m", "glassbox.cli", "serve", "--state-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=HANG)
    assert bare.returncode == 2 and "--model NAME=PATH" in bare.stderr
    bad = subprocess.run([sys.executable, "-m", "glassbox.cli", "serve", "--state-dir", str(tmp_path),
                          "--model", "nope=" + os.path.join(str(tmp_path), "missing"), "--port", "0"],
                         capture_output=True, text=True, timeout=HANG)
    assert bad.returncode != 0 and "could not load its models" in bad.stderr and "missing" in bad.stderr
