"""run_job / after_job in process: the server's execution of one job, without HTTP."""

from __future__ import annotations

import pytest
import torch

from glassbox import LanguageModel
from glassbox.offline import tiny_gpt2_path
from glassbox.remote.protocol import decode_values, encode_values, make_envelope
from glassbox.server.jobs.execute import run_job
from glassbox.server.jobs.served import after_job


@pytest.fixture(scope="module")
def models():
    return {"tiny": LanguageModel(tiny_gpt2_path(), dispatch=True)}


def _job(source: str, values: dict | None = None, model: str = "tiny", first_line: int = 10):
    desc, blob = encode_values({"vars": values or {}, "inputs": ["Hello world"], "call": {}})
    envelope = make_envelope("job", {
        "model": model, "method": "trace", "source": source, "filename": "user.py",
        "first_line": first_line, "tracer_name": "tracer", "model_refs": {"model": ""},
        "modules": {"torch": "torch"}, "values": desc, "writes": ["h", "u"], "returns": ["h", "u"],
    })
    return envelope, blob


def _run(models, source, limits=None, **kw):
    printed: list[str] = []
    reply, blob = run_job(models, *_job(source, **kw), log=printed.append, limits=limits or {})
    values = decode_values(reply["values"], blob)["saved"] if reply["status"] == "COMPLETED" else None
    return reply, values, printed


def test_saved_values_come_back_and_unsaved_ones_are_named(models):
    reply, values, printed = _run(models, "h = model.transformer.h[1].output.save()\n"
                                          "u = model.transformer.h[2].output\nprint('hi')\n")
    model = models["tiny"]
    with model.trace("Hello world"):
        local = model.transformer.h[1].output.save()
    assert torch.equal(values["h"], local) and reply["unsaved"] == ["u"] and printed == ["hi\n"]


def test_errors_name_type_line_and_code(models):
    reply, _, _ = _run(models, "h = model.transformer.h[1].output.save()\nx = 1 / 0\n", first_line=20)
    error = reply["error"]
    assert (error["type"], error["lineno"], error["line"]) == ("ZeroDivisionError", 21, "x = 1 / 0")


def test_unknown_model_and_result_limit(models):
    reply, _, _ = _run(models, "h = 1\n", model="nope")
    assert reply["error"]["type"] == "LookupError" and "tiny" in reply["error"]["message"]
    reply, _, _ = _run(models, "h = model.output.logits.save()\n", limits={"max_result_bytes": 1000})
    assert reply["error"]["type"] == "MemoryError" and "result limit" in reply["error"]["message"]


def test_after_job_restores_a_weight_changed_behind_the_sandbox(models):
    model = models["tiny"]
    _run(models, "h = model.transformer.h[0].output.save()\n")  # the guard's snapshot exists
    weight = model.transformer.h[0].mlp.c_fc.weight
    reference = weight.detach().clone()
    with torch.no_grad():
        weight.data.zero_()  # what a missed write path would do; _version does not move
    assert after_job(models) == {"tiny": ["transformer.h.0.mlp.c_fc.weight"]}
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, reference)
    assert after_job(models) == {}
