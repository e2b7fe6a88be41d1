"""glassbox on vLLM gives Hugging Face's values, and a request's values do not depend on its neighbours."""

from __future__ import annotations

import torch

from glassbox.vllm import residual_stream

PROMPTS = ["The capital of France is", "The Colosseum is in the city of"]


def test_greedy_text_equals_hugging_face(vmodel, hf):
    with vmodel.trace(temperature=0.0, max_tokens=6) as tracer:
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                pass
    for prompt, completion in zip(PROMPTS, tracer.result):
        with hf.generate(prompt, max_new_tokens=6, do_sample=False) as gen:
            pass
        prompt_len = len(hf.tokenizer(prompt)["input_ids"])
        assert completion.token_ids == gen.result[0, prompt_len:].tolist()
        assert completion.text == hf.tokenizer.decode(completion.token_ids)
    assert "Paris" in tracer.result[0].text and "Rome" in tracer.result[1].text


def test_residual_stream_and_logits_equal_hugging_face(vmodel, hf):
    layers = range(len(vmodel.model.layers))
    with vmodel.trace(PROMPTS[0], temperature=0.0):
        streams = [residual_stream(vmodel.model.layers[i].output).save() for i in layers]
        logits = vmodel.logits.output.save()
    with hf.trace(PROMPTS[0]):
        expected = [hf.model.layers[i].output[0].save() for i in layers]
        hf_logits = hf.lm_head.output[0, -1].save()
    for i in layers:
        assert streams[i].shape == expected[i].shape  # [tokens, hidden]: no batch dimension
        torch.testing.assert_close(streams[i], expected[i], atol=2e-3, rtol=1e-3, msg=f"layer {i}")
    torch.testing.assert_close(logits[0], hf_logits, atol=2e-3, rtol=1e-3)


def test_alone_equals_batched_with_others(vmodel):
    def observe(values):  # fills values: an open loop ends the block, so nothing after it runs
        for _ in tracer.iter[:]:
            values["streams"].append(residual_stream(vmodel.model.layers[12].output).save())
            values["logits"].append(vmodel.logits.output.save())

    alone = {"streams": [], "logits": []}
    batched = {"streams": [], "logits": []}
    with vmodel.trace(PROMPTS[1], temperature=0.0, max_tokens=4) as tracer:
        observe(alone)
    alone_result = tracer.result[0]
    # The same request between two others that are shorter and longer, and finish earlier and later.
    with vmodel.trace(temperature=0.0) as tracer:
        with tracer.invoke("Hello", max_tokens=2):
            pass
        with tracer.invoke(PROMPTS[1], max_tokens=4):
            observe(batched)
        with tracer.invoke("A long prompt about the history of the Roman Empire and its", max_tokens=6):
            pass
    assert tracer.result[1].token_ids == alone_result.token_ids
    assert [s.shape for s in batched["streams"]] == [s.shape for s in alone["streams"]]
    for a, b in zip(alone["streams"] + alone["logits"], batched["streams"] + batched["logits"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_an_edit_in_one_invoke_changes_only_that_request(vmodel):
    prompts = ["The cat sat on the", "My favourite food is"]
    with vmodel.trace(temperature=0.0, max_tokens=4) as tracer:
        for prompt in prompts:
            with tracer.invoke(prompt):
                pass
    alone = [c.token_ids for c in tracer.result]

    with vmodel.trace(temperature=0.0, max_tokens=4) as tracer:
        with tracer.invoke(prompts[0]):
            for _ in tracer.iter[:]:
                vmodel.model.layers[10].output[0][:] *= 0  # every step: this request's rows only
                edited = vmodel.model.layers[10].output[0].save()
        with tracer.invoke(prompts[1]):
            untouched = vmodel.model.layers[10].output[0].save()
    assert float(edited.abs().max()) == 0.0
    assert float(untouched.abs().max()) > 0.0
    assert tracer.result[0].token_ids != alone[0]
    assert tracer.result[1].token_ids == alone[1]
