"""peft= adapters: LoRA modules injected in place, so they are ordinary modules of the envoy tree."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from tests.models.seed_workflows import WORKFLOWS, Case
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from glassbox import LanguageModel, TraceStateError, TransformersModel
from glassbox.offline import gpt2_tokenizer_path, tiny_llama_path

LONG, SHORT = "The capital of France is", "Hi"
LORA = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: not the identity
# PeftModel's constructor reads transformers' deprecated is_gradient_checkpointing (peft 0.21 on
# transformers 5.24); it is peft's call, not ours, and only the reference models here use PeftModel
PEFT_MODEL_WARNING = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gpt2_tokenizer_path())


def _llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def adapted(tokenizer):
    """A LanguageModel with a fresh LoRA adapter, and a copy of the module from before it."""
    module = _llama(tokenizer)
    base = copy.deepcopy(module)
    torch.manual_seed(1)
    return LanguageModel(module, tokenizer=tokenizer, peft=LoraConfig(**LORA)), base


@pytest.fixture(scope="module")
def case(adapted, tokenizer):
    model, _ = adapted
    return Case(model, model._module, "model.layers.0.self_attn.q_proj.lora_A.default", ((LONG,), {}),
                dict(tokenizer(LONG, return_tensors="pt")), ((SHORT,), {}))


@pytest.mark.parametrize("check", WORKFLOWS, ids=lambda check: check.__name__)
def test_seed_workflows_on_a_lora_module(case, check):
    check(case)


def test_lora_modules_are_in_the_tree_and_editable(adapted, tokenizer):
    model, base = adapted
    q_proj = model.model.layers[0].self_attn.q_proj
    assert "lora_A" in q_proj._by_name and "base_layer" in q_proj._by_name
    with model.trace(LONG):
        x = q_proj.base_layer.input.save()
        down = q_proj.lora_A.default.output.save()
        adapted_logits = model.output.logits.save()
    torch.testing.assert_close(down, x @ q_proj.lora_A.default._module.weight.T)
    with model.trace(LONG):
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
                proj.lora_B.default.output[:] = 0           # switch the adapter off by hand
        without = model.output.logits.save()
    expected = base(**tokenizer(LONG, return_tensors="pt")).logits
    torch.testing.assert_close(without, expected)
    assert not torch.allclose(adapted_logits, expected)
    with pytest.raises(TraceStateError, match="peft= adapter"):   # a server would run the base model
        with model.trace(LONG, remote="local"):
            pass


@pytest.mark.filterwarnings(PEFT_MODEL_WARNING)
def test_saved_adapter_folder_on_a_lazy_model_equals_peft(tmp_path):
    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path())
    reference = get_peft_model(base, LoraConfig(**LORA)).eval()
    reference.save_pretrained(tmp_path)
    model = TransformersModel(tiny_llama_path(), peft=tmp_path)
    assert model._module.device.type == "meta"
    assert "lora_A" in model.model.layers[1].self_attn.v_proj._by_name    # before any weights load
    with model.trace() as tracer:
        with tracer.invoke(LONG):
            long_lora = model.model.layers[1].self_attn.v_proj.lora_B.default.output.save()
            long_logits = model.output.logits.save()
        with tracer.invoke(SHORT):
            short_logits = model.output.logits.save()
    tokenizer = model.tokenizer
    for logits, text in ((long_logits, LONG), (short_logits, SHORT)):
        ids = tokenizer(text, return_tensors="pt")
        torch.testing.assert_close(logits[:, -ids["input_ids"].shape[1]:], reference(**ids).logits)
    assert long_lora.abs().sum() > 0


@pytest.mark.filterwarnings(PEFT_MODEL_WARNING)
def test_adapters_that_cannot_work_are_refused(tmp_path):
    torch.manual_seed(3)
    # trained on the bare LlamaModel: its weight names lack the causal LM's "model." prefix
    get_peft_model(AutoModel.from_pretrained(tiny_llama_path()), LoraConfig(**LORA)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not fit this model"):
        LanguageModel(tiny_llama_path(), peft=tmp_path, dispatch=True)
    with pytest.raises(ValueError, match="cannot be traced module by module"):
        LanguageModel(tiny_llama_path(), peft=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
