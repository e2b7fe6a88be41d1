"""A state-space model: a tiny Mamba (the slow, pure-PyTorch path on CPU) through LanguageModel."""

from __future__ import annotations

import pytest
import torch
from tests.models.seed_workflows import WORKFLOWS, Case
from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

from glassbox import LanguageModel, TransformersModel
from glassbox.offline import gpt2_tokenizer_path

LONG, SHORT = "Hello there, my old friend", "Hi"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gpt2_tokenizer_path())


@pytest.fixture(scope="module")
def mamba(tokenizer):
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=len(tokenizer), hidden_size=16, state_size=4, num_hidden_layers=2,
                         expand=2, conv_kernel=3, time_step_rank=4, pad_token_id=tokenizer.eos_token_id)
    return MambaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=[LanguageModel, TransformersModel], ids=lambda cls: cls.__name__)
def case(request, mamba, tokenizer):
    model = request.param(mamba, tokenizer=tokenizer)
    # Mamba's hidden_states[i] is the output of layer i (no embedding entry)
    return Case(model, mamba, "backbone.layers.0", ((LONG,), {}), dict(tokenizer(LONG, return_tensors="pt")),
                ((SHORT,), {}), hidden_states=lambda out: out.hidden_states[0])


@pytest.mark.parametrize("check", WORKFLOWS, ids=lambda check: check.__name__)
def test_seed_workflows(case, check):
    check(case)


def test_mixer_internals_and_steered_generation(mamba, tokenizer):
    model = LanguageModel(mamba, tokenizer=tokenizer)
    assert TransformersModel(mamba, tokenizer=tokenizer).task == "causal-lm"
    with model.trace(LONG):
        projected = model.backbone.layers[1].mixer.in_proj.output.save()   # [batch, seq, 2 * inner]
        model.backbone.layers[1].mixer.x_proj.output[:] = 0                 # no input-dependent dt, B, C
        logits = model.output.save()
    assert projected.shape == (1, len(tokenizer(LONG)["input_ids"]), 64)
    with torch.no_grad():
        x_proj = mamba.backbone.layers[1].mixer.x_proj
        handle = x_proj.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        try:
            torch.testing.assert_close(logits.logits, mamba(**tokenizer(LONG, return_tensors="pt")).logits)
        finally:
            handle.remove()

    with model.generate(SHORT, max_new_tokens=4, do_sample=False) as tracer:
        with tracer.all():
            model.backbone.layers[0].output[:, -1] *= 3.0
    steered = tracer.result  # as nnsight: `with tracer.all():` ends the block; the result is kept
    def triple_last(module, inputs, output):
        output[:, -1] *= 3.0

    handle = mamba.backbone.layers[0].register_forward_hook(triple_last)
    try:
        expected = mamba.generate(**tokenizer(SHORT, return_tensors="pt"), max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    assert torch.equal(steered, expected) and steered.shape == (1, 5)


def test_folder_loads_lazily(tmp_path, mamba, tokenizer):
    mamba.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = LanguageModel(tmp_path)
    assert model._module.device.type == "meta" and len(model.backbone.layers) == 2
    with model.trace() as tracer:
        with tracer.invoke(LONG):
            pass
        with tracer.invoke(SHORT):
            last = model.output[:, -1].save()          # left-padded: its own last token
    expected = mamba(**tokenizer(SHORT, return_tensors="pt")).logits[:, -1]
    torch.testing.assert_close(last, expected)
