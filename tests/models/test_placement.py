"""``LanguageModel(..., device=...)``, nnsight 0.8's documented form (issue 22, item 2), and
``tokenizer_kwargs=``: accepted, placing the model / setting the tokenizer as nnsight does."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import glassbox
from glassbox import LanguageModel
from glassbox.offline import tiny_gpt2_path

TEXT = "The capital of France is"


def logits_of(model):
    with model.trace(TEXT):
        logits = model.lm_head.output.save()
    return logits


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), -1])
def test_device_puts_the_model_there(device):
    placed = LanguageModel(tiny_gpt2_path(), device=device)
    assert placed._module.device.type == "meta"  # still lazy
    logits = logits_of(placed)
    assert placed._module.device == torch.device("cpu") and logits.device.type == "cpu"
    assert torch.equal(logits, logits_of(LanguageModel(tiny_gpt2_path())))


def test_device_moves_a_built_module():
    module = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path())
    model = LanguageModel(module, tokenizer=LanguageModel(tiny_gpt2_path()).tokenizer, device="cpu")
    assert all(p.device.type == "cpu" for p in model._module.parameters())
    assert logits_of(model).shape == (1, 5, module.config.vocab_size)


def test_device_and_device_map_together_are_refused():
    with pytest.raises(ValueError, match="device= or device_map=, not both"):
        LanguageModel(tiny_gpt2_path(), device="cpu", device_map="cpu")


def test_an_unknown_device_is_torchs_error_at_once():
    with pytest.raises(RuntimeError, match="device"):
        LanguageModel(tiny_gpt2_path(), device="gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_torchs_error_not_a_type_error():
    model = LanguageModel(tiny_gpt2_path(), device="cuda:0")  # lazy: a remote-only user needs no GPU
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        model.dispatch()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_device_runs_there():
    model = LanguageModel(tiny_gpt2_path(), device="cuda:0")
    logits = logits_of(model)
    assert logits.device == torch.device("cuda", 0)
    assert torch.allclose(logits.cpu(), logits_of(LanguageModel(tiny_gpt2_path())), atol=1e-4)


def test_tokenizer_kwargs_set_the_tokenizer():
    model = LanguageModel(tiny_gpt2_path(), tokenizer_kwargs={"truncation_side": "left"})
    assert model.tokenizer.truncation_side == "left"
    with model.trace(TEXT, truncation=True, max_length=2):
        ids = model.inputs.save()[1]["input_ids"]
    assert ids.tolist() == [model.tokenizer(TEXT)["input_ids"][-2:]]


def test_nnsight_wrapper_takes_no_device_as_in_nnsight():
    # nnsight 0.8.1: NNsight(module, device=...) is a TypeError too; move the module yourself
    with pytest.raises(TypeError, match="device"):
        glassbox.NNsight(torch.nn.Linear(2, 2), device="cpu")
