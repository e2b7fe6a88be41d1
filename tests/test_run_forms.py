"""Results and run forms: ``tracer.result`` inside a block, ``model.generator``, and running
the model without a ``with`` block (``trace=False``, ``model.generate(...)``).

On SmolLM2-135M (real weights, offline): generation is greedy, so every form must give the
same ids.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import glassbox
from glassbox import LanguageModel
from glassbox.offline import smollm2_path
from waiting import HANG

PROMPT = "The capital of France is"
GREEDY = {"max_new_tokens": 3, "do_sample": False}


@pytest.fixture(scope="module")
def model():
    return LanguageModel(smollm2_path())


@pytest.fixture(scope="module")
def expected(model):
    with model.generate(PROMPT, **GREEDY) as tracer:
        pass
    return tracer.result


def test_tracer_result_inside_a_generate_block(model, expected):
    with model.generate(PROMPT, **GREEDY) as tracer:
        out = tracer.result.save()  # nnsight writes it this way: the block waits for the end
    assert torch.equal(out, expected)
    assert model.tokenizer.decode(out[0, -3:]).startswith(" Paris")


def test_tracer_result_after_a_per_step_loop(model, expected):
    with model.generate(**GREEDY) as tracer:
        with tracer.invoke(PROMPT):
            states = [].save()
            for _step in tracer.iter[:]:
                states.append(model.model.layers[-1].output[:, -1])
        with tracer.invoke():  # as in nnsight: read on after an open loop in another invoke
            out = tracer.result.save()
            ids = model.generator.output.save()
    assert len(states) == 3 and torch.equal(out, expected) and torch.equal(ids, expected)
    assert torch.equal(tracer.result, expected)


def test_streamer_output_is_each_steps_new_token(model, expected):
    with model.generate(PROMPT, **GREEDY) as tracer:
        tokens = [].save()
        for _step in tracer.iter[:]:
            tokens.append(model.generator.streamer.output)
    assert torch.equal(torch.stack(tokens, dim=1), expected[:, -3:])


def test_a_users_own_streamer_still_streams(model, expected):
    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value)

        def end(self):
            self.ended = True

    collect = Collect()
    with model.generate(PROMPT, streamer=collect, **GREEDY):
        pass
    assert collect.ended and len(collect.puts) == 4  # the prompt, then one per new token
    assert torch.equal(collect.puts[0], expected[:, :-3]) and torch.equal(collect.puts[-1], expected[0, -1:])


def test_edits_reach_the_result(model, expected):
    with model.generate(PROMPT, **GREEDY) as tracer:
        model.model.layers[10].output[:] *= 0
        out = tracer.result.save()
    assert not torch.equal(out, expected)


def test_tracer_result_inside_a_plain_trace_is_the_models_output(model):
    with model.trace(PROMPT) as tracer:
        logits = model.output.logits.save()
        result = tracer.result.save()
    assert torch.equal(result.logits, logits)
    assert torch.equal(tracer.result.logits, logits)


def test_trace_false_runs_the_model_and_returns_its_output(model):
    out = model.trace(PROMPT, trace=False)
    with model.trace(PROMPT):
        logits = model.output.logits.save()
    assert torch.equal(out.logits, logits)


def test_generate_without_with_returns_the_ids(model, expected):
    ids = model.generate(PROMPT, **GREEDY)
    assert isinstance(ids, torch.Tensor) and torch.equal(ids, expected)


def test_generate_without_with_works_without_source():
    """The with-or-not decision reads the bytecode, so python -c (no source) works too."""
    code = (
        "import torch, glassbox\n"
        "from glassbox.offline import smollm2_path\n"
        "m = glassbox.LanguageModel(smollm2_path())\n"
        "ids = m.generate('The capital of France is', max_new_tokens=2, do_sample=False)\n"
        "with m.generate('The capital of France is', max_new_tokens=2, do_sample=False) as t:\n"
        "    pass\n"
        "assert isinstance(ids, torch.Tensor) and torch.equal(ids, t.result)\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("ok")


def test_remote_run_forms_need_a_block(model):
    with pytest.raises(glassbox.TraceStateError, match="needs a with block"):
        model.trace(PROMPT, trace=False, remote=True)
