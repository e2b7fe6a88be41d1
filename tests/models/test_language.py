"""LanguageModel on real Hugging Face models (offline)."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import layers_of
from transformers import AutoModelForCausalLM

import glassbox
from glassbox import LanguageModel, MissedModuleError
from glassbox.offline import minilm_path, tiny_gpt2_path


def test_lazy_loading_builds_on_meta_then_loads():
    model = LanguageModel(tiny_gpt2_path())
    assert model._module.device.type == "meta"
    assert "GPT2Block" in repr(model) and len(model.transformer.h) == 4
    with model.trace("Hello world"):
        hidden = model.transformer.h[0].output.save()
    assert model._module.device.type == "cpu"
    assert model.transformer.h[0]._module.attn.c_attn.weight.device.type == "cpu"
    assert hidden.shape == (1, 2, 64)


def test_dispatch_loads_immediately():
    model = LanguageModel(tiny_gpt2_path(), dispatch=True)
    assert model._module.device.type == "cpu"


def test_missing_model_says_what_was_tried(tmp_path):
    with pytest.raises(OSError, match="could not load a model config"):
        LanguageModel(str(tmp_path / "nope"))


@pytest.mark.parametrize("fixture", ["smollm2", "gpt2_lm"])
def test_every_input_form_gives_the_same_logits(fixture, request):
    model = request.getfixturevalue(fixture)
    text = "The capital of France is"
    ids = model.tokenizer(text)["input_ids"]
    encoding = model.tokenizer(text, return_tensors="pt")
    forms = [text, [text], ids, torch.tensor(ids), torch.tensor([ids]), encoding, dict(encoding)]
    results = []
    for form in forms:
        with model.trace(form):
            results.append(model.output.logits.save())
    for result in results[1:]:
        assert torch.allclose(result, results[0], atol=1e-5)


@pytest.mark.parametrize("fixture", ["smollm2", "gpt2_lm"])
def test_padded_invokes_equal_prompts_alone(fixture, request):
    model = request.getfixturevalue(fixture)
    prompts = ["The Eiffel Tower is in the city of", "Rome is", "A quick brown fox"]
    layers = layers_of(model)
    alone = []
    for prompt in prompts:
        with model.trace(prompt):
            alone.append(([layer.output.save() for layer in layers], model.output.logits.save()))
    batched = []
    with model.trace() as tracer:
        for prompt in prompts:
            with tracer.invoke(prompt):
                batched.append(([layer.output.save() for layer in layers], model.output.logits.save()))
    for (hs_alone, logits_alone), (hs_batch, logits_batch) in zip(alone, batched):
        n = logits_alone.shape[1]
        assert logits_batch.shape[0] == 1
        assert torch.allclose(logits_batch[:, -n:], logits_alone, atol=1e-4)
        for h_alone, h_batch in zip(hs_alone, hs_batch):
            # late SmolLM2 layers reach |h| ~ 1e2 and CPU kernels differ by batch shape:
            # compare relative to the tensor's scale
            error = (h_batch[:, -n:] - h_alone).abs().max() / h_alone.abs().max()
            assert error < 1e-5, float(error)


def test_output_works_as_logits_and_as_model_output(smollm2):
    with smollm2.trace("The capital of France is"):
        out = smollm2.output.save()
    assert torch.equal(out[0, -1], out.logits[0, -1])
    assert out.shape == out.logits.shape
    assert torch.equal(torch.softmax(out[:, -1], -1), torch.softmax(out.logits[:, -1], -1))
    assert torch.equal(out["logits"], out.logits) and torch.equal(out[0], out.logits)


def test_paris_and_the_logit_lens(smollm2):
    paris = smollm2.tokenizer.encode(" Paris")[0]
    with smollm2.trace("The capital of France is"):
        hiddens = [layer.output[:, -1].save() for layer in smollm2.model.layers]
        logits = smollm2.output.save()
    assert int(logits[0, -1].argmax()) == paris
    lens = []
    for h in hiddens:
        probs = torch.softmax(smollm2.lm_head(smollm2.model.norm(h)), -1)
        lens.append(probs[0, paris].item())
    assert max(lens[-5:]) > 0.5 > max(lens[:10])


def test_encoder_model_and_reserved_child_names():
    model = LanguageModel(minilm_path())
    with model.trace("glassbox reads models"):
        first_block = model.encoder.layer[0].output.save()  # BertLayer's output (activation)
        dense_out = model.encoder.layer[1]["output"].dense.output.save()  # the child named "output"
        hidden = model.output.save()
    assert first_block.shape[-1] == 384 and dense_out.shape[-1] == 384
    assert hidden.last_hidden_state.shape == hidden.shape
    assert torch.allclose(hidden[:, 0], hidden.last_hidden_state[:, 0])


def test_seed_dead_attention_path_names_the_working_one(gpt2_lm):
    with pytest.raises(MissedModuleError, match="attn_probs"):
        with gpt2_lm.trace("Hello world"):
            gpt2_lm.transformer.h[0].attn.attn_dropout.input


@pytest.mark.parametrize("path", ["tiny_gpt2", "tiny_llama"])
def test_glassbox_attention_equals_eager_and_exposes_probabilities(path):
    from glassbox import offline

    source = getattr(offline, f"{path}_path")()
    eager = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager").eval()
    model = LanguageModel(source, attn_implementation="glassbox")
    ids = torch.tensor([[464, 3290, 318, 257, 1332, 13]])
    layers = layers_of(model)
    attn = layers[1].attn if path == "tiny_gpt2" else layers[1].self_attn
    with model.trace(ids):
        probs = attn.attn_probs.output.save()
        logits = model.output.logits.save()
    assert torch.allclose(logits, eager(ids).logits, atol=1e-5)
    assert probs.shape[-2:] == (6, 6)
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
    assert torch.count_nonzero(probs[..., 0, 1:]) == 0  # causal
    with model.trace(ids):
        attn.attn_probs.output[:] = 0
        attn.attn_probs.output[..., 0] = 1  # everyone attends to the first token
        edited = model.output.logits.save()
    assert not torch.allclose(edited, logits, atol=1e-3)
    assert glassbox.LanguageModel is LanguageModel


def test_device_map_and_dtype_are_passed_to_hugging_face():
    model = LanguageModel(tiny_gpt2_path(), device_map="auto", dtype=torch.bfloat16)
    with model.trace("Hello world"):
        hidden = model.transformer.h[0].output.save()
    assert hidden.dtype == torch.bfloat16
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
