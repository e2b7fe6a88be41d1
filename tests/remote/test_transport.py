"""Framing and the client transport: exact frames, clear refusals, errors that say what to do,
and event streams that neither lose nor repeat printed output when the websocket fails.

HTTP answers come from ``httpx.MockTransport`` here; the real server is exercised in
tests/server/api/test_app.py.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from glassbox import RemoteError
from glassbox.cli import free_port
from glassbox.errors import GlassboxError
from glassbox.remote import transport
from glassbox.remote.framing import MAX_HEADER_BYTES, frame, unframe
from glassbox.remote.job import JobRequest, JobResult
from glassbox.remote.protocol import ProtocolError
from job_requests import job_request

HOST = "http://glassbox.test:8765"


# ---------------------------------------------------------------- framing


@pytest.mark.parametrize("blob", [b"", b"\x00", bytes(range(256)) * 10])
def test_frames_round_trip_exactly(blob):
    envelope = {"protocol": 1, "kind": "job", "source": "print('é')\n", "n": [1, 2.5, None, True]}
    data = frame(envelope, blob)
    assert int.from_bytes(data[:8], "big") == len(data) - 8 - len(blob)
    assert unframe(data) == (envelope, blob)
    assert unframe(bytearray(data)) == (envelope, blob) and unframe(memoryview(data)) == (envelope, blob)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "shorter than the 8-byte length prefix"),
    (b"\x00" * 7, "shorter than the 8-byte length prefix"),
    ((100).to_bytes(8, "big") + b"{}", "truncated glassbox message"),
    ((MAX_HEADER_BYTES + 1).to_bytes(8, "big"), "over the limit"),
    ((2).to_bytes(8, "big") + b"[]", "not an object"),
    ((3).to_bytes(8, "big") + b"{x}", "does not parse"),
    ((2).to_bytes(8, "big") + b"\xff\xfe", "does not parse"),
])
def test_malformed_frames_are_refused_clearly(data, message):
    with pytest.raises(ProtocolError, match=message):
        unframe(data)


def test_frame_refuses_what_is_not_plain_json_or_bytes():
    with pytest.raises(ProtocolError, match="not plain JSON"):
        frame({"x": float("nan")}, b"")
    with pytest.raises(ProtocolError, match="not plain JSON"):
        frame({"x": object()}, b"")
    with pytest.raises(ProtocolError, match="must be a dict"):
        frame([1], b"")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="must be bytes"):
        frame({}, "text")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="must be bytes"):
        unframe("text")  # type: ignore[arg-type]


def test_a_pickle_is_just_refused():
    import pickle

    with pytest.raises(ProtocolError):
        unframe(pickle.dumps({"a": 1}))


# ---------------------------------------------------------------- HTTP errors


@pytest.fixture
def server(monkeypatch):
    """Route the transport's HTTP client to a handler the test sets: server.handler = fn(request)."""

    class Fake:
        handler = None
        requests: list[httpx.Request] = []

    def route(request: httpx.Request) -> httpx.Response:
        Fake.requests.append(request)
        return Fake.handler(request)

    monkeypatch.setattr(transport, "_client", httpx.Client(transport=httpx.MockTransport(route)))
    yield Fake
    transport._client.close()


def _detail(code: int, text: str):
    return lambda request: httpx.Response(code, json={"detail": text})


def test_submit_sends_the_frame_with_the_key_and_returns_the_id(server):
    job = job_request("h = x.save()\n", values={"x": torch.ones(3)})  # a tensor: the frame has a blob
    server.handler = lambda request: httpx.Response(202, json={"id": "job-1", "status": "QUEUED"})
    assert transport.submit("glassbox.test:8765", "gbx_k", job, timeout=5) == "job-1"
    request = server.requests[-1]
    assert str(request.url) == "http://glassbox.test:8765/v1/jobs"  # the scheme defaults to http
    assert request.headers["authorization"] == "Bearer gbx_k"
    assert job.blob and unframe(request.content) == (job.envelope(), job.blob)
    assert JobRequest.read(request.content) == job


def test_a_missing_server_says_how_to_start_one():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RemoteError, match=r"no glassbox server at http://127\.0\.0\.1:\d+: start one with "
                                          r"`glassbox serve --model name=path`"):
        transport.models(url)
    with pytest.raises(RemoteError, match="no glassbox server"):
        list(transport.events(url, "k", "job-1", timeout=5))


def test_401_says_where_the_key_goes(server):
    server.handler = _detail(401, "API key rejected: it is unknown to this server or was revoked")
    with pytest.raises(RemoteError) as err:
        transport.status(HOST, "gbx_bad", "job-1")
    assert err.value.status_code == 401 and isinstance(err.value, GlassboxError)
    assert str(err.value).startswith(
        "API key rejected: set glassbox.CONFIG.API_KEY or GLASSBOX_API_KEY (create one with "
        "`glassbox keys create --name NAME`)"
    )


def test_404_for_a_job_says_so(server):
    server.handler = _detail(404, "no job 'job-9' for this API key")
    for call in (transport.status, transport.result, transport.cancel):
        with pytest.raises(RemoteError, match=r"job job-9 not found at http://glassbox\.test:8765") as err:
            call(HOST, "k", "job-9")
        assert err.value.status_code == 404


def test_server_explanations_are_shown_verbatim(server):
    cases = {
        400: "protocol mismatch: the client speaks glassbox protocol 2 ... upgrade the server",
        404: "model 'llama' is not served here; this server serves: gpt2, smollm2",
        409: "job j is not finished (status RUNNING)",
        429: "rate limit: this API key may submit 10 jobs per minute",
    }
    for code, text in cases.items():
        server.handler = _detail(code, text)
        with pytest.raises(RemoteError) as err:
            transport.submit(HOST, "k", job_request("h = 1\n"), timeout=5)
        assert str(err.value) == text and err.value.status_code == code


def test_413_names_the_limit(server):
    server.handler = _detail(413, "the request is 2,000 bytes, over this server's limit of 1,000 bytes "
                                  "(max_request_bytes)")
    with pytest.raises(RemoteError, match=r"^request too large: .*max_request_bytes"):
        transport.submit(HOST, "k", job_request("h = 1\n", values={"x": torch.zeros(500)}), timeout=5)


def test_500_and_non_glassbox_answers(server):
    server.handler = _detail(500, "internal server error (KeyError); the server goes on")
    with pytest.raises(RemoteError, match=r"server at http://glassbox.test:8765 failed \(500\): internal"):
        transport.models(HOST)
    server.handler = lambda request: httpx.Response(404, text="<html>nginx</html>")
    with pytest.raises(RemoteError, match="does not look like a glassbox server"):
        transport.models(HOST)
    server.handler = lambda request: httpx.Response(200, text="<html>hello</html>")
    with pytest.raises(RemoteError, match="unexpected answer"):
        transport.models(HOST)


def test_result_unframes_and_refuses_garbage(server):
    sent = JobResult.completed({"values": {}}, ["u"], b"tensors")
    server.handler = lambda request: httpx.Response(200, content=sent.frame())
    assert transport.result(HOST, "k", "job-1") == sent
    server.handler = lambda request: httpx.Response(200, content=b"\x00garbage")
    with pytest.raises(RemoteError, match="unreadable"):
        transport.result(HOST, "k", "job-1")


def test_no_host_is_a_clear_error():
    with pytest.raises(RemoteError, match="GLASSBOX_HOST"):
        transport.models("")


# ---------------------------------------------------------------- events


class _Socket:
    """Stands in for a websocket: plays ``messages``, then the connection breaks."""

    def __init__(self, messages: list[dict]) -> None:
        self.messages = [json.dumps(m) for m in messages]
        self.sent: list[str] = []

    def __enter__(self) -> _Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def send(self, text: str) -> None:
        self.sent.append(text)

    def recv(self, timeout: float | None = None) -> str:
        if self.messages:
            return self.messages.pop(0)
        from websockets.exceptions import ConnectionClosedError

        raise ConnectionClosedError(None, None)


def _polling_server(states: list[dict]):
    """Answer GET /v1/jobs/{id} from ``states`` in turn, honouring log_offset like the server."""
    full_logs = [state.pop("all_logs", "") for state in states]

    def handler(request: httpx.Request) -> httpx.Response:
        state, logs = (states.pop(0), full_logs.pop(0)) if len(states) > 1 else (states[0], full_logs[0])
        offset = int(request.url.params.get("log_offset", 0))
        return httpx.Response(200, json={**state, "logs": logs[offset:], "log_length": len(logs)})

    return handler


def test_a_broken_websocket_continues_by_polling_without_losing_or_repeating_output(server, monkeypatch):
    import websockets.sync.client

    socket = _Socket([
        {"status": "QUEUED", "position": 1},
        {"status": "RUNNING", "log": "one\n", "offset": 0},
        {"status": "RUNNING", "log": "two\n", "offset": 4},
    ])
    monkeypatch.setattr(websockets.sync.client, "connect", lambda *args, **kwargs: socket)
    server.handler = _polling_server([
        {"status": "RUNNING", "all_logs": "one\ntwo\nthree\n"},
        {"status": "COMPLETED", "all_logs": "one\ntwo\nthree\nfour\n"},
    ])
    events = list(transport.events(HOST, "gbx_k", "job-1", poll_seconds=0.05))
    assert "".join(e.get("log", "") for e in events) == "one\ntwo\nthree\nfour\n"
    assert events[0]["position"] == 1 and events[-1]["status"] == "COMPLETED"
    assert json.loads(socket.sent[0]) == {"api_key": "gbx_k"}  # the key goes in a message, not the URL
    assert all(request.url.params.get("log_offset") in ("8", "14") for request in server.requests)


def test_repeated_output_on_the_websocket_is_dropped(server, monkeypatch):
    import websockets.sync.client

    socket = _Socket([
        {"status": "RUNNING", "log": "abc", "offset": 0},
        {"status": "RUNNING", "log": "bcd", "offset": 1},  # overlaps: only "d" is new
        {"status": "RUNNING", "log": "cd", "offset": 2},   # nothing new
        {"status": "COMPLETED"},
    ])
    monkeypatch.setattr(websockets.sync.client, "connect", lambda *args, **kwargs: socket)
    events = list(transport.events(HOST, "k", "job-1"))
    assert "".join(e.get("log", "") for e in events) == "abcd"
    assert [e["status"] for e in events][-1] == "COMPLETED" and not server.requests


def test_polling_only_reports_changes_and_stops_at_the_final_state(server, monkeypatch):
    import websockets.sync.client

    def refuse(*args, **kwargs):
        raise OSError("no websockets through this proxy")

    monkeypatch.setattr(websockets.sync.client, "connect", refuse)
    server.handler = _polling_server([
        {"status": "QUEUED", "position": 2}, {"status": "QUEUED", "position": 2},
        {"status": "QUEUED", "position": 1}, {"status": "RUNNING", "all_logs": "hi\n"},
        {"status": "RUNNING", "all_logs": "hi\n"},
        {"status": "ERROR", "all_logs": "hi\n", "error": {"type": "ValueError", "message": "bad"}},
    ])
    events = list(transport.events(HOST, "k", "job-1", poll_seconds=0.05))
    assert [(e["status"], e.get("position"), e.get("log")) for e in events] == [
        ("QUEUED", 2, None), ("QUEUED", 1, None), ("RUNNING", None, "hi\n"), ("ERROR", None, None),
    ]
    assert events[-1]["error"]["type"] == "ValueError"


def test_events_time_out_with_a_clear_error(server, monkeypatch):
    import websockets.sync.client

    monkeypatch.setattr(websockets.sync.client, "connect",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no websocket")))
    server.handler = _polling_server([{"status": "RUNNING"}])
    with pytest.raises(RemoteError, match="did not finish in time"):
        list(transport.events(HOST, "k", "job-1", timeout=0.3, poll_seconds=0.05))
