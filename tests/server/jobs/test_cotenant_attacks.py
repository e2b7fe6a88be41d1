"""Hostile requests inside a co-tenant batch: what one request does to the shared pass.

Each attack shares ONE forward pass (``run_batch``, the real sandbox, the real tiny GPT-2 with its
weights sealed read-only as a server serves them) with two ordinary requests. Afterwards the
neighbours' values equal their lone runs, and the attacker learned nothing of their prompts.
"""

from __future__ import annotations

import pytest
import torch
from test_cotenant import PADDED, _batch, _result, _submit, alone, forward_passes, request, saved

from glassbox import LanguageModel
from glassbox.offline import tiny_gpt2_path
from glassbox.server.config import ServerConfig
from glassbox.server.jobs.sealed import is_sealed, seal
from glassbox.server.store import JobStore
from glassbox.server.workers.feeder import Feeder
from waiting import HANG

VICTIM = "logits = model.output.logits.save()\n"


@pytest.fixture(scope="module")
def sealed_gpt2():
    model = LanguageModel(tiny_gpt2_path(), dispatch=True)
    seal(model._module)
    assert all(is_sealed(p) for p in model._module.parameters())
    return {"m": model}


def _attack(models, source: str, *, rows: int = 2):
    items = [request(source, PADDED[0])] + [request(VICTIM, prompt) for prompt in PADDED[1:1 + rows]]
    with forward_passes(models) as passes:
        results, _ = _batch(models, items)
    for item, result in zip(items[1:], results[1:]):
        got, expected = saved(result)["logits"], saved(alone(models, item))["logits"]
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-4  # the neighbour computed as if alone
    return results[0], passes


def test_as_strided_on_a_value_reaches_only_the_requests_own_copy(sealed_gpt2):
    result, _ = _attack(sealed_gpt2, (
        "h = model.transformer.h[1].output\n"
        "whole = torch.as_strided(h, (3,) + tuple(h.shape[1:]), (h.numel(),) + tuple(h.stride()[1:]))\n"
        "whole.mul_(0)\n"
        "logits = model.output.logits.save()\n"))
    # torch itself refuses to stride past the copy's storage; the pass still served the others
    assert result.status == "ERROR"
    assert "out of bounds" in result.error.message or "storage" in result.error.message


def test_a_request_cannot_read_another_requests_prompt(sealed_gpt2):
    result, passes = _attack(sealed_gpt2, (
        "ids = model.transformer.wte.input\n"
        "n = glassbox.save(tuple(ids.shape))\n"
        "h = glassbox.save(ids.tolist())\n"))
    assert passes == [3]  # it really shared the pass
    values = saved(result)
    mine = sealed_gpt2["m"].tokenizer(PADDED[0])["input_ids"]
    assert values["n"] == (1, len(mine)) and values["h"] == [mine]


def test_in_place_edits_change_only_the_requests_own_rows(sealed_gpt2):
    result, passes = _attack(sealed_gpt2, (
        "model.transformer.wte.input[:] = 0\n"
        "model.transformer.h[1].output[:] = 0\n"
        "logits = model.output.logits.save()\n"))
    assert passes == [3]
    assert saved(result)["logits"].shape[0] == 1


@pytest.mark.parametrize("source", [
    # modules the user builds around a served weight, written from C code
    "bn = torch.nn.BatchNorm1d(64)\nbn.running_mean = model.transformer.h[0].ln_1.weight\n"
    "bn(model.transformer.h[0].output[0])\n",
    "r = torch.nn.ReLU()\nr.inplace = True\nr(model.transformer.h[0].ln_1.weight)\n",
    "e = torch.nn.Embedding(10, 64, _weight=model.transformer.wte.weight)\n",
    "model.transformer.h[0].ln_1.weight.mul_(0)\n",
])
def test_writes_to_the_weights_through_objects_the_user_built_are_refused(sealed_gpt2, source):
    weight = sealed_gpt2["m"]._module.transformer.h[0].ln_1.weight.detach().clone()
    result, _ = _attack(sealed_gpt2, source + "logits = model.output.logits.save()\n")
    assert result.status == "ERROR", "the write went through"
    assert torch.equal(sealed_gpt2["m"]._module.transformer.h[0].ln_1.weight, weight)


def test_fresh_allocations_do_not_hold_the_batchs_activations(sealed_gpt2):
    result, _ = _attack(sealed_gpt2, (
        "h = model.transformer.h[3].output\n"
        "fresh = torch.empty(1_000_000)\n"
        "n = glassbox.save(int((fresh != 0).sum()))\n"))
    assert saved(result)["n"] == 0


# ---------------------------------------------------------------- past the sandbox, in a real worker


@pytest.fixture
def feeder(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    config = ServerConfig(models={"m": str(tiny_gpt2_path())}, max_seconds=HANG, torch_threads=1,
                          batch_window_ms=200.0, batch_wait_always=True, crash_retries=0)
    worker = Feeder(config, store)
    try:
        worker.start()
        yield worker
    finally:
        worker.stop()
        store.close()


def test_a_write_the_sandbox_misses_kills_only_the_batchs_process_and_the_neighbours_rerun(feeder,
                                                                                             sealed_gpt2):
    # Embedding(max_norm=...) renormalises its weight in place from C code: the sandbox does not see
    # it; the read-only weights do. The batch's process dies, and each request runs again alone.
    attack = ("e = torch.nn.Embedding(10, 64, max_norm=0.001)\ne.weight = model.transformer.wte.weight\n"
              "e(torch.tensor([1, 2]))\nlogits = model.output.logits.save()\n")
    items = [request(attack, PADDED[0])] + [request(VICTIM, prompt) for prompt in PADDED[1:]]
    jobs = [_submit(feeder, attack, PADDED[0])] + [_submit(feeder, VICTIM, prompt) for prompt in PADDED[1:]]
    feeder.wake()
    results = [_result(feeder, job)[0] for job in jobs]
    assert feeder.batches >= 1  # they did share a pass first
    error = results[0].error
    assert error.type == "WorkerCrashed" and "read-only" in error.message
    assert error.lineno == 12  # the user's line, from the dying process's own traceback
    for item, result in zip(items[1:], results[1:]):
        expected = saved(alone(sealed_gpt2, item))["logits"]
        assert (saved(result)["logits"] - expected).abs().max() <= 1e-4
    assert feeder.restarts == 0  # the worker and its loaded model stayed


def test_batch_scope_key_lets_only_one_keys_jobs_share_a_pass(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    config = ServerConfig(models={"m": str(tiny_gpt2_path())}, torch_threads=1, batch_window_ms=200.0,
                          batch_wait_always=True, batch_scope="key")
    worker = Feeder(config, store)
    try:
        worker.start()
        jobs = [_submit(worker, VICTIM, prompt, owner)
                for owner, prompt in (("alice", PADDED[0]), ("bob", PADDED[1]), ("alice", PADDED[2]))]
        worker.wake()
        for job in jobs:
            assert _result(worker, job)[0].status == "COMPLETED"
        assert worker.batches == 1 and worker.batched_jobs == 2  # alice's two together, bob alone
    finally:
        worker.stop()
        store.close()
