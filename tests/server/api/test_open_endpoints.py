"""What a caller without an API key may see of a real ``glassbox serve``: nothing of any tenant's
activity. Every route is either open or needs a key (a new route fails the census below until
it is sorted); the open ones answer exactly the same before, during and after another tenant's
jobs (one loads a cold model on demand, one runs for seconds), and the others refuse.

Decisions (README: Security): ``/v1/health`` says the server is up, its version and protocol;
``/v1/models`` lists the operator's catalog (name, load mode, pinned, replicas), not state, last
use or a loaded model's description; model files are those read when the server started; the
page at ``/`` is a form asking for a key; ``/openapi.json`` is the route list. A wrong key is
treated as none on the open routes (a load balancer's check must not fail on it).
"""

from __future__ import annotations

import contextlib
import json
import re
import textwrap

import httpx
import pytest
from websockets.sync.client import connect

from glassbox.cli import start_server
from glassbox.remote import transport
from glassbox.server.api.app import create_app
from glassbox.server.config import ServerConfig
from glassbox.server.store import JobStore
from job_requests import job_request
from waiting import HANG, REQUEST, wait_until

OPEN = {"/", "/openapi.json", "/v1/health", "/v1/models", "/v1/models/{name}/files"}
KEYED = {("GET", "/v1/dashboard"), ("GET", "/metrics"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs"),
         ("GET", "/v1/jobs/{job_id}"), ("GET", "/v1/jobs/{job_id}/result"),
         ("DELETE", "/v1/jobs/{job_id}/result"), ("DELETE", "/v1/jobs/{job_id}")}
EVENTS = "/v1/jobs/{job_id}/events"
RUN = "/v1/jobs/run"  # submit and follow on one websocket
LONG = "print('looping')\nn = 0\nfor i in range(30_000_000):\n    n = n + 1\necho = glassbox.save(marker)\n"
ECHO = "echo = glassbox.save(marker)\n"


def _job(source: str, model: str = "gpt2"):
    return job_request(source, model=model, values={"marker": "m"}, inputs=["The Eiffel Tower is in"],
                       model_refs={}, modules={"glassbox": "glassbox"}, returns=("echo",))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from glassbox.offline import tiny_gpt2_path

    root = tmp_path_factory.mktemp("open")
    catalog = root / "catalog.toml"
    catalog.write_text(textwrap.dedent(f"""
        [server]
        torch_threads = 1
        max_batch = 1

        [models.gpt2]
        path = "{tiny_gpt2_path()}"

        [models.cold]
        path = "{tiny_gpt2_path()}"
        load = "on_demand"
    """))
    running = start_server({}, state_dir=str(root / "state"), args=["--models-file", str(catalog),
                                                                    "--max-seconds", str(HANG)])
    try:
        yield running
    finally:
        running.stop()


def anonymous(server, headers: dict | None = None) -> dict[str, tuple[int, str]]:
    """Every open route's answer to a caller without a (valid) key, the page's nonce blanked."""
    seen = {}
    for path in ("/", "/openapi.json", "/v1/health", "/v1/models", "/v1/models/gpt2/files",
                 "/v1/models/cold/files"):
        response = httpx.get(server.url + path, headers=headers or {}, timeout=REQUEST)
        text = response.text
        nonce = re.search(r"'nonce-([^']+)'", response.headers.get("content-security-policy", ""))
        if nonce:
            text = text.replace(nonce.group(1), "NONCE")
        seen[path] = (response.status_code, text)
    return seen


def final(server, key: str, job: str) -> dict:
    def done() -> dict | None:
        state = transport.status(server.url, key, job)
        return state if state["status"] in transport.FINAL else None

    return wait_until(done, f"job {job} to finish")


def test_every_route_is_open_or_needs_a_key():
    app = create_app(ServerConfig(models={}), store=JobStore("sqlite://"))
    routes, todo = set(), list(app.routes)
    while todo:
        route = todo.pop()
        included = getattr(route, "original_router", None)  # an included router (FastAPI >= 0.165)
        if included is not None:
            todo.extend(included.routes)
            continue
        for method in (getattr(route, "methods", None) or {"WS"}) - {"HEAD"}:
            routes.add((method, route.path))
    assert routes == {("GET", path) for path in OPEN} | KEYED | {("WS", EVENTS), ("WS", RUN)}


def test_the_open_routes_show_no_tenants_activity_and_the_others_refuse(server):
    before = anonymous(server)
    assert anonymous(server, {"X-API-Key": "gbx_wrong"}) == before  # a wrong key is no key
    assert set(json.loads(before["/v1/health"][1])) == {"glassbox", "protocol", "status"}
    assert json.loads(before["/v1/models"][1])["models"] == [
        {"name": "gpt2", "load": "eager", "pinned": False, "replicas": 1},
        {"name": "cold", "load": "on_demand", "pinned": False, "replicas": 1}]
    assert before["/v1/models/gpt2/files"][0] == 200 and before["/"][0] == 200

    # Another tenant loads the cold model, then runs a long job.
    key = server.create_key("tenant")
    loaded = transport.submit(server.url, key, _job(ECHO, "cold"), timeout=REQUEST)
    assert final(server, key, loaded)["status"] == "COMPLETED"
    running = transport.submit(server.url, key, _job(LONG), timeout=REQUEST)

    def started() -> bool:
        state = transport.status(server.url, key, running)
        assert state["status"] not in transport.FINAL, state
        return state["status"] == "RUNNING"

    wait_until(started, f"job {running} to run", interval=0.02)

    assert anonymous(server) == before  # while it runs
    for method, path in sorted(KEYED):
        response = httpx.request(method, server.url + path.replace("{job_id}", running), timeout=REQUEST)
        assert response.status_code == 401, (method, path, response.text)
        assert "missing API key" in response.json()["detail"] and running not in response.text
    for path, first in ((EVENTS.replace("{job_id}", running), {"nothing": 1}), (RUN, {"nothing": 1}),
                        (RUN, {"api_key": "gbx_wrong"})):
        with connect(server.url.replace("http", "ws") + path, legacy=True, open_timeout=REQUEST) as ws:
            ws.send(json.dumps(first))
            if path == RUN:
                with contextlib.suppress(Exception):  # the request: never read, the key comes first
                    ws.send(_job(ECHO).frame())
            answer = json.loads(ws.recv(timeout=REQUEST))
            assert answer["code"] == 401 and set(answer) == {"error", "code"}, (path, answer)

    assert final(server, key, running)["status"] == "COMPLETED"
    assert anonymous(server) == before  # and after
    # A key holder sees what the activity changed (so the comparisons above compared something).
    seen = {m["name"]: m for m in transport.models(server.url, key)}
    assert seen["cold"]["state"] == "ready" and seen["cold"]["last_used"] and seen["cold"]["class"]
    health = httpx.get(server.url + "/v1/health", headers={"X-API-Key": key}, timeout=REQUEST).json()
    assert health["worker"] == "ready" and "replicas" in health
