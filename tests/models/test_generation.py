"""model.generate(...): per-step interventions on a real model."""

from __future__ import annotations

import pytest
import torch

from glassbox import TraceStateError

PROMPT = "The capital of France is"


def _hf_greedy(model, prompt, n):
    enc = model.tokenizer(prompt, return_tensors="pt")
    return model._module.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=model._pad_id())


def test_greedy_generation_matches_hugging_face(smollm2):
    with smollm2.generate(PROMPT, max_new_tokens=8, do_sample=False) as tracer:
        pass
    assert torch.equal(tracer.result, _hf_greedy(smollm2, PROMPT, 8))


def test_saving_a_layer_every_step(smollm2):
    with smollm2.generate(PROMPT, max_new_tokens=20, do_sample=False) as tracer:
        states = []
        for _step in tracer.iter[:]:
            states.append(smollm2.model.layers[5].output.save())
        after_loop = "ran"  # as nnsight: code after an open-ended loop does not run
    prompt_len = len(smollm2.tokenizer(PROMPT)["input_ids"])
    assert len(states) == 20 and "after_loop" not in locals()
    assert states[0].shape[1] == prompt_len and all(s.shape[1] == 1 for s in states[1:])
    assert tracer.result.shape[1] == prompt_len + 20


def test_steering_every_step_changes_the_tokens(smollm2):
    with smollm2.generate(PROMPT, max_new_tokens=6, do_sample=False) as tracer:
        for _step in tracer.iter[:]:
            smollm2.model.layers[8].output[:, -1] *= -4
    assert not torch.equal(tracer.result, _hf_greedy(smollm2, PROMPT, 6))


def test_selected_steps_only(smollm2):
    with smollm2.generate(PROMPT, max_new_tokens=5, do_sample=False) as tracer:
        picked = {}
        for step in tracer.iter[[1, 3]]:
            picked[step] = smollm2.lm_head.output.save()
    assert sorted(picked) == [1, 3] and all(v.shape[1] == 1 for v in picked.values())
    with smollm2.generate(PROMPT, max_new_tokens=5, do_sample=False) as tracer:
        logits = [smollm2.output.logits[:, -1].save() for _ in tracer.iter[2:4]]
    chosen = [int(v.argmax()) for v in logits]
    prompt_len = len(smollm2.tokenizer(PROMPT)["input_ids"])
    assert chosen == tracer.result[0, prompt_len + 2 : prompt_len + 4].tolist()


def test_all_applies_a_block_at_every_step(smollm2):
    with smollm2.generate(PROMPT, max_new_tokens=4, do_sample=False) as tracer:
        seen = []
        with tracer.all():
            seen.append(smollm2.model.layers[3].output[:, -1].save())
    assert len(seen) == 4
    with smollm2.generate(PROMPT, max_new_tokens=4, do_sample=False) as tracer:
        with tracer.all():
            smollm2.model.layers[8].output[:, -1] *= -4
    with smollm2.generate(PROMPT, max_new_tokens=4, do_sample=False) as steered:
        for _ in steered.iter[:]:
            smollm2.model.layers[8].output[:, -1] *= -4
    assert torch.equal(tracer.result, steered.result)


def test_batched_generation_with_invokes(smollm2):
    prompts = ["The capital of France is", "Rome is the capital of"]
    with smollm2.generate(max_new_tokens=5, do_sample=False) as tracer:
        for prompt in prompts:
            with tracer.invoke(prompt):
                pass
    for row, prompt in zip(tracer.result, prompts):
        alone = _hf_greedy(smollm2, prompt, 5)[0]
        assert row[-5:].tolist() == alone[-5:].tolist()


def test_generate_inside_a_trace_shows_the_supported_form(smollm2):
    with pytest.raises(TraceStateError, match=r"with model\.generate"):
        with smollm2.trace() as tracer:
            with tracer.invoke("What is 2+2?"):
                smollm2.model.layers[2].output[:, -1] *= 1.5
                smollm2.generate(max_new_tokens=5)


def test_a_range_past_the_last_step_warns_and_ends(gpt2_lm):
    with gpt2_lm.generate("Hello", max_new_tokens=2, do_sample=False) as tracer:
        seen = []
        with pytest.warns(UserWarning, match="generation ended after 2"):
            for step in tracer.iter[0:5]:
                seen.append(step)
    assert seen == [0, 1] and tracer.result.shape[1] == 3
