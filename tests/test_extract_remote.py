"""extract(remote=True): a real server computes each batch (reductions included) under its
sandbox and the client writes the shards.

One ``glassbox serve`` subprocess holds the tiny GPT-2 and SmolLM2 under their folder names, with
this process's torch threads (so remote values equal local ones bit for bit) and a small result
limit (128 KiB), which each batch's result must fit: the limit applies per chunk.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.test_extract import NESTED, check_hooked

from glassbox import CONFIG, LanguageModel, extract
from glassbox.cli import start_server
from glassbox.offline import smollm2_path, tiny_gpt2_path

TEXTS = [
    "The Eiffel Tower is in Paris.",
    "Hi",
    "",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.",
    "Interpretability research reads activations.",
    "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen.",
]
RESULT_LIMIT = 128 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = {p.name: str(p) for p in (smollm2_path(), tiny_gpt2_path())}
    args = ["--torch-threads", str(torch.get_num_threads()), "--max-result-bytes", str(RESULT_LIMIT)]
    running = start_server(models, state_dir=str(tmp_path_factory.mktemp("extract-server")), args=args)
    key = running.create_key("extract")
    before = CONFIG.HOST, CONFIG.API_KEY
    CONFIG.HOST, CONFIG.API_KEY = running.url, key
    try:
        yield running, key
    finally:
        CONFIG.HOST, CONFIG.API_KEY = before
        running.stop()


@pytest.fixture(scope="module")
def gpt2() -> LanguageModel:
    return LanguageModel(tiny_gpt2_path())


@pytest.fixture(scope="module")
def smollm2() -> LanguageModel:
    return LanguageModel(smollm2_path())


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def every_other_token(ids):  # a callable: it runs on the client, so it works remotely too
    return list(range(0, len(ids), 2))


@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_remote_rows_equal_local_rows_bit_for_bit(request, server, tmp_path, name):
    model = request.getfixturevalue(name)
    layers = model.transformer.h if name == "gpt2" else model.model.layers
    settings = {"modules": [layers[1], layers[3]], "batch_tokens": 16, "max_length": 8,
                "positions": every_other_token if name == "gpt2" else "all"}
    local = extract(model, TEXTS, out=tmp_path / "local", **settings)
    remote = extract(model, TEXTS, out=tmp_path / "remote", remote=True, **settings)
    assert len(remote) == len(local) > 0 and len(remote.index["shards"]) >= 3  # a job per batch
    assert folder_bytes(tmp_path / "remote") == folder_bytes(tmp_path / "local")


@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_nested_modules_remotely_equal_local_and_forward_hooks(request, server, tmp_path, name):
    """The client orders a block and its own submodules by when the forward returns from each
    (children first) and the server reads them in that order: the shards equal local ones bit for
    bit, and each row a plain forward hook's capture."""
    model = request.getfixturevalue(name)
    given, run = NESTED[name]
    # 8 tokens a batch: four of SmolLM2's modules in float32 fit the server's 128 KiB per result
    settings = {"modules": [model.get(path) for path in given], "batch_tokens": 8, "max_length": 8}
    remote = extract(model, TEXTS, out=tmp_path / "remote", remote=True, **settings)
    local = extract(model, TEXTS, out=tmp_path / "local", **settings)
    assert remote.names == local.names == run and len(remote.index["shards"]) >= 3
    assert folder_bytes(tmp_path / "remote") == folder_bytes(tmp_path / "local")
    check_hooked(model, remote, TEXTS, run, 8, tol=1e-5 if name == "gpt2" else 1e-4)


def test_reductions_run_on_the_server_within_its_per_chunk_limit(server, smollm2, tmp_path):
    """All positions of SmolLM2's layer 10 in batches of 256 tokens are ~300 KB per batch: over the
    server's 128 KiB result limit, so the job fails saying so. Keeping only the last position,
    projected onto 8 vectors, in bfloat16, is computed there: 16 bytes a document come back."""
    texts = [text * 4 for text in TEXTS if text]
    with pytest.raises(MemoryError, match=r"(?s)result limit.*lower batch_tokens"):
        extract(smollm2, texts, modules=[smollm2.model.layers[10]], out=tmp_path / "full", remote=True,
                batch_tokens=256, max_length=64)
    torch.manual_seed(0)
    vectors = torch.randn(576, 8)
    reduced = {"modules": [smollm2.model.layers[10]], "batch_tokens": 256, "max_length": 64,
               "positions": "last", "project": vectors, "dtype": "bfloat16"}
    remote = extract(smollm2, texts, out=tmp_path / "remote", remote=True, **reduced)
    column = remote.torch("model.layers.10")
    assert column.shape == (len(texts), 8) and column.dtype == torch.bfloat16
    shard = remote.index["shards"][0]
    assert os.path.getsize(tmp_path / "remote" / shard["file"]) < 1024
    extract(smollm2, texts, out=tmp_path / "local", **reduced)
    assert folder_bytes(tmp_path / "remote") == folder_bytes(tmp_path / "local")
    for pool in ("mean", "max"):
        pooled = extract(smollm2, texts, out=tmp_path / pool, remote=True, pool=pool, topk=3,
                         **{**reduced, "positions": "all"})
        here = extract(smollm2, texts, out=tmp_path / (pool + "-local"), pool=pool, topk=3,
                       **{**reduced, "positions": "all"})
        assert pooled.names == ["model.layers.10", "model.layers.10:indices"]
        assert folder_bytes(tmp_path / pool) == folder_bytes(tmp_path / (pool + "-local"))
        assert len(here) == len(texts)


CLIENT = """
import sys
from glassbox import LanguageModel, extract
from glassbox.offline import tiny_gpt2_path
model = LanguageModel(tiny_gpt2_path())
extract(model, sys.argv[1], out=sys.argv[2], modules=["transformer.h.1", "transformer.h.2"],
        batch_tokens=128, max_length=32, remote=True)
"""


def test_a_killed_client_resumes_from_the_index(server, gpt2, tmp_path):
    _, key = server
    rng = random.Random(7)
    words = "the river model layer token paris rome light stone water green north south".split()
    source = tmp_path / "corpus.txt"
    source.write_text("".join(" ".join(rng.choice(words) for _ in range(30)) + "\n" for _ in range(120)))
    settings = {"modules": ["transformer.h.1", "transformer.h.2"], "batch_tokens": 128, "max_length": 32}
    extract(gpt2, source, out=tmp_path / "whole", **settings)  # uninterrupted, and local
    total = len(json.loads((tmp_path / "whole" / "index.json").read_text())["shards"])
    kill_after = random.Random(99).randrange(2, total - 2)

    out = tmp_path / "remote"
    env = {**os.environ, "GLASSBOX_HOST": CONFIG.HOST, "GLASSBOX_API_KEY": key, "GLASSBOX_STATUS": "0"}
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(source), str(out)], env=env,
                              stdout=subprocess.DEVNULL)
    while client.poll() is None:
        try:
            if len(json.loads((out / "index.json").read_text())["shards"]) >= kill_after:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.005)
    os.kill(client.pid, signal.SIGKILL)  # with jobs in flight on the server
    client.wait()
    assert not json.loads((out / "index.json").read_text())["complete"]
    extract(gpt2, source, out=out, remote=True, **settings)
    assert folder_bytes(out) == folder_bytes(tmp_path / "whole")


def test_each_fetched_chunk_is_deleted_from_the_server(server, gpt2, tmp_path):
    """A long extraction holds only the chunks in flight against the key's stored-bytes quota:
    each one is dropped from the server (DELETE /v1/jobs/{id}/result) once it is on disk."""
    from glassbox.remote.client import JobHandle
    from glassbox.server.config import ServerConfig
    from glassbox.server.store import JobStore

    running, key = server
    store = JobStore(ServerConfig(state_dir=running.state_dir).database_url())
    try:
        owner = store.authenticate(key)
        before = {job.id for job in store.jobs_of(owner.id)}  # other tests' jobs share this key
        ds = extract(gpt2, TEXTS, modules=[gpt2.transformer.h[1]], out=tmp_path / "acts", batch_tokens=16,
                     max_length=8, remote=True)
        jobs = [job for job in store.jobs_of(owner.id) if job.id not in before and job.status == "COMPLETED"]
        sizes = store.result_sizes([job.id for job in jobs])
    finally:
        store.close()
    assert len(jobs) >= len(ds.index["shards"]) >= 3
    assert max(sizes.values()) < 1024  # each result replaced by a short note (a chunk here is ~2 KB+)
    with pytest.raises(Exception, match="was deleted by its owner"):
        JobHandle(jobs[-1].id).result()
