"""Trace semantics on vLLM: steps per request, sampled tokens, stop, errors, gradients, a clean engine."""

from __future__ import annotations

import pytest
import torch

import glassbox
from glassbox import OutOfOrderError, TraceStateError


def _leftovers(vmodel) -> list[str]:
    """Everything a trace could leave behind on the engine: wrappers, hooks, requests."""
    found = []
    runner, model = vmodel.engine.runner, vmodel.engine.model
    found += [f"runner.{n}" for n in ("_model_forward", "_sample") if n in vars(runner)]
    found += ["model.compute_logits"] if "compute_logits" in vars(model) else []
    for name, module in model.named_modules():
        if "forward" in vars(module):
            found.append(f"{name}.forward")
        if module._forward_hooks or module._forward_pre_hooks:
            found.append(f"{name} hooks")
    for envoy in (vmodel.logits, vmodel.samples):
        if "forward" in vars(envoy._module):
            found.append(f"{envoy._display}.forward")
    if vmodel.llm.llm_engine.has_unfinished_requests():
        found.append("unfinished requests")
    if vmodel.active is not None:
        found.append("an open trace")
    return found


def test_steps_are_counted_per_request(vmodel):
    with vmodel.trace(temperature=0.0) as tracer:
        with tracer.invoke("The cat", max_tokens=2):
            short = []
            for step in tracer.iter[:]:  # a loop statement: a comprehension would end unassigned
                short.append(step)
        with tracer.invoke("The dog sat on the", max_tokens=5):
            long = []
            for step in tracer.iter[:]:
                long.append((step, vmodel.model.layers[3].output[0].shape[0]))
    assert short == [0, 1]
    # step 0 is the prefill (all 5 prompt tokens), then one row per generated token
    assert long == [(0, 5), (1, 1), (2, 1), (3, 1), (4, 1)]
    assert [len(c.token_ids) for c in tracer.result] == [2, 5]


def test_samples_are_the_generated_tokens_and_editable(vmodel):
    with vmodel.trace("The capital of France is", temperature=0.0, max_tokens=3) as tracer:
        sampled = []
        for _ in tracer.iter[:]:
            sampled.append(vmodel.samples.output.clone().save())
    assert [int(t) for t in sampled] == tracer.result[0].token_ids

    forced = vmodel.tokenizer(" London")["input_ids"][0]
    with vmodel.trace("The capital of France is", temperature=0.0, max_tokens=3) as tracer:
        vmodel.samples.output[:] = forced  # step 0's token
    assert tracer.result[0].token_ids[0] == forced
    assert tracer.result[0].text.startswith(" London")


def test_values_flow_between_invokes(vmodel):
    prompt = "The Colosseum is in the city of"
    with vmodel.trace(temperature=0.0, max_tokens=1) as tracer:
        with tracer.invoke(prompt):
            source = vmodel.model.layers[8].output[0][-1].clone()
        with tracer.invoke("The capital of France is"):
            vmodel.model.layers[8].output[0][-1] = source  # patch the last position's hidden part
            patched = vmodel.model.layers[8].output[0][-1].save()
    torch.testing.assert_close(patched, source)


def test_tracer_all_runs_at_every_step(vmodel):
    with vmodel.trace("Once upon a time", temperature=0.0, max_tokens=4) as tracer:
        rows = []
        with tracer.all():
            rows.append(vmodel.model.layers[2].output[0].shape[0])
    assert rows == [len(vmodel.tokenizer("Once upon a time")["input_ids"]), 1, 1, 1]


def test_stop_ends_the_trace_and_leaves_the_engine_clean(vmodel):
    with vmodel.trace("The capital of France is", temperature=0.0, max_tokens=5) as tracer:
        hidden = vmodel.model.layers[2].output[0].save()
        tracer.stop()
    assert hidden.shape[0] == 5
    assert _leftovers(vmodel) == []
    with vmodel.trace("The capital of France is", temperature=0.0, max_tokens=2) as tracer:
        pass
    assert len(tracer.result[0].token_ids) == 2


def test_an_error_in_a_body_surfaces_and_leaves_the_engine_clean(vmodel):
    with pytest.raises(ZeroDivisionError):
        with vmodel.trace(temperature=0.0, max_tokens=3) as tracer:
            with tracer.invoke("The cat"):
                for step in tracer.iter[:]:
                    if step == 1:
                        _ = 1 / 0
            with tracer.invoke("The dog"):
                pass
    assert _leftovers(vmodel) == []
    with pytest.raises(OutOfOrderError):
        with vmodel.trace("The cat", temperature=0.0):
            vmodel.model.layers[5].output
            vmodel.model.layers[2].output
    assert _leftovers(vmodel) == []


def test_gradients_raise_and_point_to_language_model(vmodel):
    with pytest.raises(TraceStateError, match="LanguageModel"):
        with vmodel.trace("The cat", temperature=0.0):
            loss = vmodel.logits.output.sum()
            with loss.backward():
                pass
    with pytest.raises(TraceStateError, match="LanguageModel"):
        with vmodel.trace("The cat", temperature=0.0):
            vmodel.logits.output.sum().backward()
    assert _leftovers(vmodel) == []


def test_engine_and_process_are_clean_after_a_trace(vmodel):
    torch.set_num_threads(1)
    set_num_threads = torch.set_num_threads
    rng = torch.get_rng_state()
    with vmodel.trace(temperature=0.8, top_p=0.9, max_tokens=3) as tracer:  # sampling, not greedy
        with tracer.invoke("The cat"):
            for _ in tracer.iter[:]:
                vmodel.model.layers[4].output[0][-1] += 1.0
                vmodel.logits.output.save()
        with tracer.invoke("The dog", seed=7):
            vmodel.model.layers[4].mlp.output.save()
    assert _leftovers(vmodel) == []
    assert torch.get_num_threads() == 1
    assert torch.set_num_threads is set_num_threads  # vLLM's CPU worker replaces it; put back
    assert torch.equal(torch.get_rng_state(), rng)
    # the same sampled request with the same seed samples the same tokens (its own generator)
    with vmodel.trace("The dog", temperature=0.8, top_p=0.9, max_tokens=3, seed=7) as again:
        pass
    assert again.result[0].token_ids == tracer.result[1].token_ids


def test_glassbox_exports_vllm_lazily(vmodel):
    from glassbox.vllm import VLLM

    assert glassbox.VLLM is VLLM
    assert isinstance(vmodel, glassbox.NNsight)
    assert "qkv_proj" in repr(vmodel.model.layers[0].self_attn)
