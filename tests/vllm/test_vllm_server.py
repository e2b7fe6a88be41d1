"""A real server with a vLLM model (catalog ``engine = "vllm"``) beside a Hugging Face one.

One ``glassbox serve --models-file`` process serves, laid out as in production where the main
virtualenv exists (the server and its HF worker on the main venv's Python, which has no vLLM; the
vLLM worker on this venv's, named by ``vllm_python``):
    smollm2-vllm   SmolLM2 float32 on vLLM: its own worker process, jobs run in it (isolation none)
    tiny           a tiny Llama on transformers, in the usual worker (process isolation)
Remote vLLM traces equal local ones; two tenants' generation jobs submitted together run as one
vLLM trace (continuous batching) and each equals its run alone; the HF model is served as before.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import torch

from glassbox import CONFIG, LanguageModel
from glassbox.cli import RunningServer, start_server
from glassbox.vllm import VLLM, Completion
from waiting import HANG, REQUEST

PROMPT = "The Eiffel Tower is in"


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2):
    from glassbox.offline import tiny_llama_path

    root = tmp_path_factory.mktemp("vllm-catalog")
    catalog = root / "catalog.toml"
    # A batch window long enough that two jobs submitted one after the other always meet, waited
    # even after a job that came alone.
    catalog.write_text(textwrap.dedent(f"""
        [server]
        torch_threads = 1
        batch_window_ms = 1500
        batch_wait_always = true
        vllm_python = "{sys.executable}"

        [models.smollm2-vllm]
        path = "{smollm2}"
        engine = "vllm"
        dtype = "float32"
        max_model_len = 256

        [models.tiny]
        path = "{tiny_llama_path()}"
    """))
    running = _serve(catalog, root / "state")
    old = CONFIG.HOST, CONFIG.API_KEY
    CONFIG.HOST, CONFIG.API_KEY = running.url, running.create_key("vllm")
    try:
        yield running
    finally:
        CONFIG.HOST, CONFIG.API_KEY = old
        running.stop()


def _serve(catalog: Path, state: Path) -> RunningServer:
    """``glassbox serve`` on the main virtualenv's Python if there is one (else this one's)."""
    main = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"
    python = str(main) if main.exists() else sys.executable
    # both workers load their models before it answers (start_server waits for that, however long)
    return start_server({}, state_dir=str(state), args=["--models-file", str(catalog)], python=python)


def _steered(model, prompt: str, **sampling):
    """Greedy generation with an edit at every step and a value saved at each."""
    with model.trace(prompt, **sampling) as tracer:
        hidden = []
        for _step in tracer.iter[:]:
            model.model.layers[3].output[0][-1] *= 0.9
            hidden.append(model.model.layers[5].output[0][-1].clone().save())
    return tracer.result, hidden


def workers(server) -> dict[str, dict]:
    health = httpx.get(server.url + "/v1/health", headers={"Authorization": f"Bearer {CONFIG.API_KEY}"},
                       timeout=REQUEST).json()
    return {"vllm" if r["label"].startswith("vLLM") else "hf": r for r in health["replicas"]}


def test_the_vllm_model_has_its_own_worker_and_the_hf_one_is_untouched(server):
    listed = {m["name"]: m for m in httpx.get(server.url + "/v1/models", timeout=REQUEST, headers={
        "Authorization": f"Bearer {CONFIG.API_KEY}"}).json()["models"]}
    assert listed["smollm2-vllm"]["state"] == listed["tiny"]["state"] == "ready"
    assert {name: w["models"] for name, w in workers(server).items()} == {
        "hf": ["tiny"], "vllm": ["smollm2-vllm"]}
    tiny = LanguageModel("tiny")
    with tiny.trace(PROMPT, remote=True):
        logits = tiny.lm_head.output.save()
    from glassbox.offline import tiny_llama_path

    local = LanguageModel(str(tiny_llama_path()), dispatch=True)
    with local.trace(PROMPT):
        expected = local.lm_head.output.save()
    torch.testing.assert_close(logits, expected.detach(), rtol=1e-4, atol=1e-4)


def test_remote_equals_local(server, vmodel):
    remote = VLLM("smollm2-vllm")
    got_result, got_hidden = _steered(remote, PROMPT, temperature=0.0, max_tokens=4, remote=True)
    want_result, want_hidden = _steered(vmodel, PROMPT, temperature=0.0, max_tokens=4)
    assert isinstance(got_result[0], Completion)
    assert got_result[0].text == want_result[0].text and got_result[0].token_ids == want_result[0].token_ids
    assert len(got_hidden) == len(want_hidden) == 4
    for got, want in zip(got_hidden, want_hidden):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_two_tenants_generation_runs_batched_and_each_equals_alone(server):
    remote = VLLM("smollm2-vllm")
    requests = [("The cat sat on the", dict(temperature=0.0, max_tokens=5)),
                ("Paris is the capital of", dict(temperature=0.8, seed=7, max_tokens=3))]
    alone = [_steered(remote, prompt, remote=True, **sampling) for prompt, sampling in requests]

    other = CONFIG.API_KEY, server.create_key("another tenant")
    jobs = []
    for (prompt, sampling), key in zip(requests, other):
        CONFIG.API_KEY = key
        with remote.trace(prompt, remote=True, blocking=False, **sampling) as tracer:
            hidden = []
            for _step in tracer.iter[:]:
                remote.model.layers[3].output[0][-1] *= 0.9
                hidden.append(remote.model.layers[5].output[0][-1].clone().save())
        jobs.append(tracer.job)
    CONFIG.API_KEY = other[0]
    for job, (want_result, want_hidden) in zip(jobs, alone):
        values = job.result(timeout=HANG)
        assert [c["token_ids"] for c in values["result"]] == [c.token_ids for c in want_result]
        assert len(values["hidden"]) == len(want_hidden)
        for got, want in zip(values["hidden"], want_hidden):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    vllm_worker = workers(server)["vllm"]
    assert (vllm_worker["batches"], vllm_worker["batched_jobs"]) == (1, 2)  # the two ran as one trace
