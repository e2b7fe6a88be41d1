"""WS /v1/jobs/run, what ``remote=True`` submits and follows its jobs on, against the real server:
several jobs on one connection, refusals that keep it open, a key checked again for every job,
a client that reconnects to a restarted server, and requests too large for it sent as a POST."""

from __future__ import annotations

import json
import os

import pytest
import torch
from websockets.sync.client import connect

from glassbox import RemoteError
from glassbox.cli import start_server
from glassbox.remote import transport
from glassbox.remote.framing import frame
from glassbox.remote.job import FINAL, JobResult
from glassbox.server.config import ServerConfig
from glassbox.server.store import JobStore
from job_requests import job_request, saved
from waiting import HANG, REQUEST

ECHO = "echo = glassbox.save(marker)\nh = glassbox_model.transformer.h[1].output.save()\n"


def _job(marker: str = "m", model: str = "gpt2", **values):
    return job_request(ECHO, model=model, values={"marker": marker, **values},
                       inputs=["The Eiffel Tower is in"], model_refs={}, modules={"glassbox": "glassbox"},
                       returns=("echo", "h"), filename="<remote block>")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from glassbox.offline import tiny_gpt2_path

    state = tmp_path_factory.mktemp("run")
    running = start_server({"gpt2": str(tiny_gpt2_path())}, state_dir=str(state),
                           args=["--max-seconds", str(HANG), "--torch-threads", "1"])
    try:
        yield running
    finally:
        running.stop()


def _revoke(server, name: str) -> None:
    store = JobStore(ServerConfig(state_dir=server.state_dir, db_url=server.db_url).database_url())
    try:
        assert store.revoke_key(name)
    finally:
        store.close()


def _url(server) -> str:
    return server.url.replace("http://", "ws://") + "/v1/jobs/run"


def _follow(ws, accepted: dict) -> tuple[list[dict], bytes]:
    """One job's events on the run websocket (the first: the answer to its submit), then its
    result's bytes."""
    events = [accepted]
    while events[-1].get("status") not in FINAL:
        events.append(json.loads(ws.recv(timeout=HANG)))
    return events, ws.recv(timeout=REQUEST)


def test_several_jobs_run_one_after_another_on_one_connection(server):
    key = server.create_key("several")
    with connect(_url(server), open_timeout=REQUEST) as ws:
        ws.send(json.dumps({"api_key": key}))
        for marker in ("first", "second", "third"):
            ws.send(_job(marker).frame())
            accepted = json.loads(ws.recv(timeout=REQUEST))  # the first event, with the job's id
            assert accepted["id"] and accepted["model"] == "gpt2" and accepted["status"] in (
                "QUEUED", "RUNNING", "COMPLETED"), accepted
            events, data = _follow(ws, accepted)
            assert events[-1]["status"] == "COMPLETED", events
            # the same bytes GET /result answers, and the values the job saved
            assert data == transport.result(server.url, key, accepted["id"]).frame()
            assert saved(JobResult.read(data))["echo"] == marker


def test_a_refused_request_keeps_the_connection_and_a_revoked_key_ends_it(server):
    key = server.create_key("refused")
    with connect(_url(server), open_timeout=REQUEST) as ws:
        ws.send(json.dumps({"api_key": key}))
        ws.send(_job(model="llama").frame())
        refused = json.loads(ws.recv(timeout=REQUEST))
        assert refused["code"] == 404 and "not served here" in refused["error"], refused
        ws.send(b"not a glassbox request")
        assert json.loads(ws.recv(timeout=REQUEST))["code"] == 400
        ws.send(frame({"glassbox": 1, "kind": "request"}, b"x" * 100))  # valid framing, no request
        assert json.loads(ws.recv(timeout=REQUEST))["code"] == 400
        ws.send(_job("after").frame())  # the connection still serves
        events, data = _follow(ws, json.loads(ws.recv(timeout=REQUEST)))
        assert events[-1]["status"] == "COMPLETED" and saved(JobResult.read(data))["echo"] == "after"
        _revoke(server, "refused")
        ws.send(_job("revoked").frame())
        answer = json.loads(ws.recv(timeout=REQUEST))
        assert answer["code"] == 401, answer


def test_the_client_reuses_its_connection_and_reconnects_to_a_restarted_server(tmp_path):
    from glassbox.offline import tiny_gpt2_path

    args = ["--max-seconds", str(HANG), "--torch-threads", "1"]
    running = start_server({"gpt2": str(tiny_gpt2_path())}, state_dir=str(tmp_path), args=args)
    try:
        key = running.create_key("client")
        for marker in ("one", "two"):
            kept: dict = {}
            events = list(transport.run(running.url, key, _job(marker), keep_result=kept, timeout=HANG))
            assert "id" in events[0] and events[-1]["status"] == "COMPLETED"
            assert saved(kept["result"])["echo"] == marker
        port = int(running.url.rsplit(":", 1)[1])
        running.stop()  # the client's idle connection dies with it
        running = start_server({"gpt2": str(tiny_gpt2_path())}, state_dir=str(tmp_path), port=port, args=args)
        kept = {}
        events = list(transport.run(running.url, key, _job("three"), keep_result=kept, timeout=HANG))
        assert events[-1]["status"] == "COMPLETED" and saved(kept["result"])["echo"] == "three"
        with pytest.raises(RemoteError, match="not served here") as refused:
            list(transport.run(running.url, key, _job(model="llama"), keep_result={}, timeout=HANG))
        assert refused.value.status_code == 404
    finally:
        running.stop()


def test_a_request_too_large_for_a_websocket_message_is_posted(server):
    key = server.create_key("large")
    big = torch.arange(3 * 2**20, dtype=torch.float32)  # 12 MiB: over what the run websocket carries
    with pytest.raises(transport.RunUnavailable):
        next(transport.run(server.url, key, _job(big=big), keep_result={}, timeout=HANG))
    job = transport.submit(server.url, key, _job("posted", big=big), timeout=REQUEST)
    kept: dict = {}
    assert list(transport.events(server.url, key, job, keep_result=kept))[-1]["status"] == "COMPLETED"
    assert saved(kept["result"])["echo"] == "posted"


def test_a_forked_child_uses_a_connection_of_its_own(server):
    key = server.create_key("forked")

    def one(marker: str) -> str:
        kept: dict = {}
        list(transport.run(server.url, key, _job(marker), keep_result=kept, timeout=HANG))
        return saved(kept["result"])["echo"]

    assert one("parent") == "parent"  # its connection now waits for the next job
    pid = os.fork()
    if pid == 0:  # the child: had it written on the parent's connection, both would read garbage
        code = 1
        try:
            code = 0 if one("child") == "child" else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert one("parent again") == "parent again"
