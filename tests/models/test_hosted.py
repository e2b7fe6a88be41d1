"""``LanguageModel(name)``: no network I/O of glassbox's own unless only the server can resolve the
name, a line on stderr when it asks, and errors raised, never swallowed (models/hosted.py).

A folder or a hub id in the local Hugging Face cache never reaches the server, even one that serves
the same name; any other name is asked of the server at ``CONFIG.HOST`` (a real one, started here),
and what it answers decides: served (a server-only handle), not served / no server (the hub, and an
error naming both answers when that fails too), broken (raised).
"""

from __future__ import annotations

import shutil
import socket
import time

import pytest

from glassbox import CONFIG, LanguageModel, TraceStateError
from glassbox.cli import start_server
from glassbox.errors import RemoteError
from glassbox.offline import tiny_gpt2_path
from glassbox.remote import transport

ASKING = "asking the glassbox server"


def _hub_cache(root, repo: str):
    """A Hugging Face cache holding ``repo`` (the tiny GPT-2's config and tokenizer, no weights)."""
    commit = "0" * 40
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in tiny_gpt2_path().iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):
            shutil.copy(path, snapshot / path.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return root


@pytest.fixture
def no_requests(monkeypatch):
    def refuse(host, name):
        raise AssertionError(f"asked the server at {host} for {name!r}")

    monkeypatch.setattr(transport, "model_files", refuse)


def test_a_folder_is_loaded_without_asking_anyone(no_requests, capsys):
    model = LanguageModel(tiny_gpt2_path())
    assert model.__dict__["_server_only"] is False and model.tokenizer is not None
    assert ASKING not in capsys.readouterr().err


def test_a_hub_id_in_the_local_cache_is_loaded_without_asking_anyone(no_requests, tmp_path, capsys):
    hub = _hub_cache(tmp_path, "someone/tiny")
    model = LanguageModel("someone/tiny", cache_dir=str(hub), local_files_only=True)
    assert model.__dict__["_server_only"] is False
    assert model.config.n_layer == 4 and model.tokenizer is not None
    assert model._remote_name() == "someone/tiny"
    assert ASKING not in capsys.readouterr().err


def test_no_server_and_no_hub_is_a_clear_error_with_both_answers(monkeypatch, capsys):
    with socket.socket() as sock:  # a port nobody listens on: refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(CONFIG, "HOST", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(OSError, match="could not load a model config for 'no-such-model'") as info:
        LanguageModel("no-such-model", local_files_only=True)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert f"no glassbox server at http://127.0.0.1:{port}" in message  # what the server said
    assert "as a hub id" in message and "glassbox.CONFIG.HOST" in message  # what else, what to do
    err = capsys.readouterr().err
    assert f"'no-such-model' is no folder here and not in the local Hugging Face cache: {ASKING} " \
           f"at http://127.0.0.1:{port}" in err


def test_a_server_that_fails_otherwise_is_raised_not_routed_around(monkeypatch):
    def broken(host, name):
        raise RemoteError("the glassbox server at http://x answered 500: database is locked", 500)

    monkeypatch.setattr(transport, "model_files", broken)
    with pytest.raises(RemoteError, match=r"failed to hand out 'no-such-model': .*database is locked"):
        LanguageModel("no-such-model", local_files_only=True)


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = start_server({"tiny": str(tiny_gpt2_path())}, state_dir=str(tmp_path_factory.mktemp("hosted")),
                           args=["--torch-threads", "1"])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def served(server, monkeypatch):
    monkeypatch.setattr(CONFIG, "HOST", server.url)
    return server


def test_a_name_only_the_server_knows_becomes_a_server_only_handle_and_says_so(served, capsys):
    model = LanguageModel("tiny")
    err = capsys.readouterr().err
    assert f"'tiny' is no folder here and not in the local Hugging Face cache: {ASKING} at " \
           f"{served.url}" in err
    assert f"'tiny' is served by {served.url}: its weights stay there, trace it with remote=True" in err
    assert model.__dict__["_server_only"] is True and model._remote_name() == "tiny"
    local = LanguageModel(tiny_gpt2_path())
    assert [name for name, _ in model.named_modules()] == [name for name, _ in local.named_modules()]
    assert model.tokenizer("Paris")["input_ids"] == local.tokenizer("Paris")["input_ids"]
    with pytest.raises(TraceStateError, match="weights are not on this machine: trace it with remote=True"):
        with model.trace("Paris"):
            pass


def test_a_name_the_server_serves_but_the_local_cache_has_stays_local(served, tmp_path, capsys):
    hub = _hub_cache(tmp_path, "tiny")
    model = LanguageModel("tiny", cache_dir=str(hub), local_files_only=True)
    assert model.__dict__["_server_only"] is False  # not silently remote-only
    assert ASKING not in capsys.readouterr().err


def test_a_name_the_server_does_not_serve_is_an_error_naming_what_it_serves(served):
    with pytest.raises(OSError, match="could not load a model config for 'gpt3'") as info:
        LanguageModel("gpt3", local_files_only=True)
    assert "model 'gpt3' is not served here; this server serves: tiny" in str(info.value)
