"""The seed user's guide, workflow by workflow, on real models.

Adaptations (see README "Coming from nnsight / transformers 4"): module paths
follow each model's layout, and transformers 5 decoder layers return a bare
tensor, so the seed's ``layer.output[0]`` is written ``layer.output`` here.
"""

from __future__ import annotations

import pytest
import torch
from tests.conftest import layers_of

from glassbox import LanguageModel
from glassbox.offline import tiny_gpt2_path


@pytest.fixture(scope="module")
def gpt2_eager_probs() -> LanguageModel:
    return LanguageModel(tiny_gpt2_path(), attn_implementation="glassbox")


@pytest.mark.parametrize("fixture", ["smollm2", "gpt2_lm"])
def test_workflow_1_activation_analysis(fixture, request):
    model = request.getfixturevalue(fixture)
    layers = layers_of(model)
    with model.trace("The capital of France is"):
        layer_outputs = []
        for i in range(len(layers)):
            layer_outputs.append(layers[i].output.save())
        logits = model.output.save()
    norms = [out.norm().item() for out in layer_outputs]
    assert len(norms) == len(layers) and all(n > 0 for n in norms)
    probs = torch.softmax(logits[0, -1], dim=-1)
    top = probs.topk(5)
    words = [model.tokenizer.decode(t) for t in top.indices]
    assert len(words) == 5 and top.values[0] >= top.values[-1]
    if fixture == "smollm2":
        assert words[0] == " Paris"


def test_workflow_1_attention_patterns(gpt2_eager_probs):
    model = gpt2_eager_probs
    with model.trace("The capital of France is"):
        patterns = [model.transformer.h[i].attn.attn_probs.output.save() for i in range(4)]
    for attn in patterns:
        assert attn.shape == (1, 4, 5, 5)  # batch, heads, query, key
        assert torch.allclose(attn.sum(-1), torch.ones(1, 4, 5), atol=1e-5)


def _prob(model, logits, word):
    token = model.tokenizer.encode(word)[0]
    return torch.softmax(logits[0, -1], dim=-1)[token].item()


def test_workflow_2_activation_patching_moves_rome_toward_paris(smollm2):
    model = smollm2
    clean_prompt, corrupted_prompt = "The Eiffel Tower is in", "The Colosseum is in"
    with model.trace(clean_prompt):
        clean_hidden = model.model.layers[24].output.save()
    with model.trace(corrupted_prompt):
        corrupted_logits = model.output.save()
    with model.trace(corrupted_prompt):
        # the prompts differ in length: patch the last position, aligned from the end
        model.model.layers[24].output[:, -1, :] = clean_hidden[:, -1, :]
        patched_logits = model.output.save()
    before, after = _prob(model, corrupted_logits, " Paris"), _prob(model, patched_logits, " Paris")
    assert _prob(model, corrupted_logits, " Rome") > 0.5
    assert after > before + 0.2
    assert _prob(model, patched_logits, " Rome") < _prob(model, corrupted_logits, " Rome")


def test_workflow_2_layer_by_position_sweep(smollm2):
    model = smollm2
    clean_prompt, corrupted_prompt = "The Eiffel Tower is in", "The Colosseum is in"
    layers = [0, 10, 20, 29]
    with model.trace(clean_prompt):
        clean_cache = {i: model.model.layers[i].output.save() for i in layers}
        clean_logits = model.output.save()
    seq_len = len(model.tokenizer(corrupted_prompt)["input_ids"])
    results = torch.zeros(len(layers), seq_len)
    for row, layer in enumerate(layers):
        for pos in range(1, seq_len + 1):
            with model.trace(corrupted_prompt):
                current = model.model.layers[layer].output
                current[:, -pos, :] = clean_cache[layer][:, -pos, :]
                logits = model.output.save()
            results[row, seq_len - pos] = _prob(model, logits, " Paris")
    # the last layer at the last position decides the answer: it reproduces the clean run
    assert abs(results[-1, -1].item() - _prob(model, clean_logits, " Paris")) < 1e-3
    assert results[-1, :-1].max() < 0.05  # other positions at the last layer change nothing
    assert results[0, -1] < results[-1, -1]


@pytest.mark.parametrize("fixture", ["smollm2", "gpt2_lm"])
def test_workflow_4_cross_prompt_sharing(fixture, request):
    model = request.getfixturevalue(fixture)
    layer = layers_of(model)[2]
    with model.trace() as tracer:
        with tracer.invoke("The cat sat on the"):
            cat_hidden = layer.output.save()
        with tracer.invoke("The dog ran over the"):
            layer.output[:] = cat_hidden
            dog_with_cat = model.output.save()
    with model.trace("The cat sat on the"):
        cat_alone = model.output.save()
    assert cat_hidden.shape[1] == dog_with_cat.shape[1]
    assert torch.allclose(dog_with_cat.logits, cat_alone.logits, atol=1e-4)


@pytest.mark.parametrize("fixture", ["smollm2", "gpt2_lm"])
def test_workflow_5_gradients(fixture, request):
    model = request.getfixturevalue(fixture)
    with model.trace("The quick brown fox"):
        hidden = layers_of(model)[1].output.save()
        hidden.retain_grad()
        logits = model.output
        target_token = model.tokenizer.encode(" jumps")[0]
        loss = -logits[0, -1, target_token]
        loss.backward()
    grad = hidden.grad
    assert grad.shape == hidden.shape and grad.norm().item() > 0
    model._module.zero_grad(set_to_none=True)


def test_forgetting_to_save_still_gives_the_value_locally(gpt2_lm):
    with gpt2_lm.trace("Hello"):
        hidden = gpt2_lm.transformer.h[1].output  # not saved
    assert hidden.shape == (1, 1, 64)  # locally every variable is real; remote needs .save()
