"""``GET /v1/models/{name}/files`` and ``transport.model_files``: a client gets the config and
tokenizer files of a served model (enough to build its module tree and tokenizer without
weights), never any other file, without a key.

The folder logic runs in-process (``read_model_files``, the app through ``TestClient`` without
its lifespan, so no worker starts); the whole path runs against a real ``glassbox serve``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from glassbox import RemoteError
from glassbox.cli import start_server
from glassbox.offline import smollm2_path, tiny_gpt2_path
from glassbox.remote import transport
from glassbox.server.api import models_routes as app_module
from glassbox.server.api.app import create_app
from glassbox.server.api.models_routes import MODEL_FILES, read_model_files
from glassbox.server.config import ServerConfig
from waiting import REQUEST

EXTRAS = ("model.safetensors", "pytorch_model.bin", "glassbox-prepared.json", "secret.txt", "README.md",
          "added_tokens.json", "config.json.bak")


def _folder(root: Path, names=MODEL_FILES, extras=EXTRAS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_text(f"text of {name} é\n", encoding="utf-8")
    for name in extras:
        (root / name).write_bytes(b"must never be served")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "config.json").write_text("nested")
    return root


def _disk(folder: Path) -> dict[str, str]:
    return {name: (folder / name).read_text(encoding="utf-8") for name in MODEL_FILES
            if (folder / name).is_file()}


# ---------------------------------------------------------------- the folder


def test_exactly_the_listed_files_are_read(tmp_path):
    folder = _folder(tmp_path / "m")
    files = read_model_files(str(folder))
    assert sorted(files) == sorted(MODEL_FILES)
    assert files["merges.txt"] == "text of merges.txt é\n"


def test_missing_binary_special_and_oversized_files_are_left_out(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "m", names=("config.json", "vocab.json", "tokenizer.json"), extras=())
    (folder / "vocab.json").write_bytes(b"\xff\xfe not utf-8")
    os.mkfifo(folder / "merges.txt")  # reading it would block forever
    (folder / "tokenizer_config.json").mkdir()
    monkeypatch.setattr(app_module, "_MAX_MODEL_FILE_BYTES", 100)
    (folder / "tokenizer.json").write_text("x" * 101)
    assert read_model_files(str(folder)) == {"config.json": "text of config.json é\n"}


def test_a_hub_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = _folder(repo / "snapshots" / commit, names=("config.json", "tokenizer.json"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert read_model_files("someone/tiny") == _disk(snapshot)
    assert read_model_files("someone/not-cached") == {}
    assert read_model_files("not a valid / repo id") == {}


# ---------------------------------------------------------------- the endpoint, in-process


@pytest.fixture
def client(tmp_path):
    folder = _folder(tmp_path / "tiny")
    empty = tmp_path / "empty"
    empty.mkdir()
    config = ServerConfig(models={"tiny": str(folder), "bare": str(empty)}, state_dir=str(tmp_path / "state"))
    app = create_app(config, say=lambda text: None)
    test_client = TestClient(app)  # not entered: no lifespan, so no worker and no models loaded
    try:
        yield test_client, folder
    finally:
        test_client.close()
        app.state.store.close()


def test_endpoint_answers_the_files_without_a_key(client):
    test_client, folder = client
    response = test_client.get("/v1/models/tiny/files")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.json() == {"files": _disk(folder)}


def test_endpoint_refuses_unknown_models_naming_the_served_ones(client):
    test_client, _ = client
    for name in ("nope", "tiny.", "TINY", "tiny%00"):
        response = test_client.get(f"/v1/models/{name}/files")
        assert response.status_code == 404, name
        served = "this server serves: bare, tiny"
        assert response.json()["detail"].endswith(f"is not served here; {served}"), name


@pytest.mark.parametrize("path", [
    "/v1/models/tiny/files/model.safetensors", "/v1/models/tiny/files/../secret.txt",
    "/v1/models/tiny/model.safetensors", "/v1/models/tiny%2F..%2F..%2Fetc/files",
    "/v1/models/..%2Ftiny/files", "/v1/models/tiny/files?name=secret.txt",
])
def test_no_path_reaches_any_other_file(client, path):
    test_client, _ = client
    response = test_client.get(path)
    assert b"must never be served" not in response.content and b"nested" not in response.content
    if response.status_code == 200:  # the query string is ignored: still only the listed files
        assert set(response.json()["files"]) == set(MODEL_FILES)


def test_a_served_model_without_local_files_gets_a_404_that_says_so(client):
    test_client, _ = client
    response = test_client.get("/v1/models/bare/files")
    assert response.status_code == 404
    assert "none of its config or tokenizer files" in response.json()["detail"]


def test_the_answer_is_read_once(client, monkeypatch):
    test_client, _ = client
    first = test_client.get("/v1/models/tiny/files").json()
    calls = []
    monkeypatch.setattr(app_module, "read_model_files", lambda path: calls.append(path) or {})
    assert test_client.get("/v1/models/tiny/files").json() == first and calls == []


def test_transport_explains_a_server_without_the_endpoint(monkeypatch):
    def route(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "Not Found"})

    monkeypatch.setattr(transport, "_client", httpx.Client(transport=httpx.MockTransport(route)))
    try:
        with pytest.raises(RemoteError, match=r"does not hand out model files.*upgrade the server"):
            transport.model_files("http://glassbox.test", "gpt2")
    finally:
        transport._client.close()


def test_transport_refuses_a_malformed_answer(monkeypatch):
    def route(request: httpx.Request) -> httpx.Response:
        assert request.url.raw_path == b"/v1/models/a%2Fb/files"  # the name cannot add path segments
        return httpx.Response(200, json={"files": {"config.json": 3}})

    monkeypatch.setattr(transport, "_client", httpx.Client(transport=httpx.MockTransport(route)))
    try:
        with pytest.raises(RemoteError, match="malformed file list"):
            transport.model_files("http://glassbox.test", "a/b")
    finally:
        transport._client.close()


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_server({"gpt2": str(tiny_gpt2_path()), "smol": str(smollm2_path())},
                           state_dir=str(tmp_path_factory.mktemp("files")), args=["--torch-threads", "1"])
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize(("name", "folder"), [("gpt2", tiny_gpt2_path), ("smol", smollm2_path)])
def test_real_server_hands_out_what_the_folder_has(server, name, folder):
    files = transport.model_files(server.url, name)
    assert files == _disk(folder())
    assert "config.json" in files and "model.safetensors" not in files


@pytest.mark.parametrize(("name", "folder"), [("gpt2", tiny_gpt2_path), ("smol", smollm2_path)])
def test_files_suffice_for_module_tree_and_tokenizer_without_weights(server, tmp_path, name, folder):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = tmp_path / name
    local.mkdir()
    for filename, text in transport.model_files(server.url, name).items():
        (local / filename).write_text(text, encoding="utf-8")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(local))
    real = AutoModelForCausalLM.from_pretrained(folder())
    assert [(n, p.shape) for n, p in skeleton.named_parameters()] == \
        [(n, p.shape) for n, p in real.named_parameters()]
    text = "The Eiffel Tower is in Paris"
    assert AutoTokenizer.from_pretrained(local)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(folder())(text)["input_ids"]


def test_real_server_refuses_an_unknown_model_naming_the_served_ones(server):
    served = r"model 'gpt3' is not served here; this server serves: gpt2, smol"
    with pytest.raises(RemoteError, match=served) as info:
        transport.model_files(server.url, "gpt3")
    assert info.value.status_code == 404


def test_real_server_needs_no_key_and_answers_plain_json(server):
    response = httpx.get(f"{server.url}/v1/models/gpt2/files", timeout=REQUEST)
    assert response.status_code == 200
    assert json.loads(response.content)["files"] == _disk(tiny_gpt2_path())
