"""model.scan(...): shapes from a forward on fake tensors, without weights or compute."""

from __future__ import annotations

import pytest
import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor

import glassbox

PROMPT = "The capital of France is"


def _first(value):
    return value if isinstance(value, torch.Tensor) else value[0]


@pytest.fixture(scope="module")
def lazy_smollm2() -> glassbox.LanguageModel:
    """SmolLM2 built on the meta device and never loaded (scan must keep it so)."""
    from glassbox.offline import smollm2_path

    return glassbox.LanguageModel(smollm2_path())


def _weights_on_meta(model: glassbox.LanguageModel) -> bool:
    return all(p.device.type == "meta" for p in model._module.parameters())


def _shapes(model):
    layers = model.model.layers
    return {
        "embed": model.model.embed_tokens.output.shape,
        "attn": _first(layers[0].self_attn.output).shape,
        "mlp": layers[3].mlp.output.shape,
        "layer": _first(layers[5].output).shape,
        "norm": model.model.norm.output.shape,
        "lm_head": model.lm_head.output.shape,
    }


def test_scan_shapes_equal_a_real_run_and_no_weights_load(lazy_smollm2, smollm2):
    assert _weights_on_meta(lazy_smollm2)
    with lazy_smollm2.scan(PROMPT):
        scanned = _shapes(lazy_smollm2)
        fake = lazy_smollm2.lm_head.output
        assert isinstance(fake, FakeTensor)  # a fake value, valid in the block
        dtype = lazy_smollm2.lm_head.output.dtype
    assert _weights_on_meta(lazy_smollm2) and lazy_smollm2.device.type == "meta"
    assert detect_fake_mode() is None  # the fake mode ends with the block
    with smollm2.trace(PROMPT):
        real = _shapes(smollm2)
        real_dtype = smollm2.lm_head.output.dtype
    assert scanned == real and dtype == real_dtype
    assert scanned["lm_head"] == (1, len(smollm2.tokenizer(PROMPT)["input_ids"]), 49152)


def test_saved_fakes_become_meta_tensors_after_the_block(lazy_smollm2):
    with lazy_smollm2.scan(PROMPT) as tracer:
        hidden = lazy_smollm2.model.layers[2].output.save()
        both = [lazy_smollm2.model.norm.output, {"head": lazy_smollm2.lm_head.output}]
        logits = lazy_smollm2.output.logits.save()
    for value in (_first(hidden), logits, both[0], both[1]["head"], tracer.result.logits):
        assert value.device.type == "meta" and not isinstance(value, FakeTensor)
    assert logits.shape[-1] == 49152 and both[0].shape[-1] == 576
    with pytest.raises((NotImplementedError, RuntimeError), match="meta"):
        float(logits.sum())  # no data: fails here, not far from where it came from
    assert _weights_on_meta(lazy_smollm2)


def test_scan_with_invokes_sees_each_prompts_rows(lazy_smollm2):
    short, long = "Hi", "A much longer prompt than the first one"
    with lazy_smollm2.scan() as tracer:
        with tracer.invoke(short):
            first = lazy_smollm2.lm_head.output.shape
        with tracer.invoke(long):
            second = lazy_smollm2.lm_head.output.shape
        with tracer.invoke():
            everything = lazy_smollm2.lm_head.output.shape
    width = len(lazy_smollm2.tokenizer(long)["input_ids"])
    assert first == (1, width, 49152) and second == (1, width, 49152)  # left-padded to one width
    assert everything == (2, width, 49152)
    assert _weights_on_meta(lazy_smollm2)


def test_scan_of_a_plain_module_with_real_weights(gpt2, gpt2_module):
    ids = torch.randint(0, 100, (3, 5))
    before = gpt2_module.lm_head.weight.clone()
    with gpt2.scan(ids):
        attn = gpt2.transformer.h[1].attn.output[0].shape
        gpt2.transformer.h[1].mlp.output[:] = 0  # edits run on fakes too, touching nothing real
        head = gpt2.lm_head.output.save()
    with gpt2.trace(ids):
        real_attn = gpt2.transformer.h[1].attn.output[0].shape
        real = gpt2.output.save()
    assert attn == real_attn and head.shape == real.logits.shape == (3, 5, 100)
    assert torch.equal(gpt2_module.lm_head.weight, before)
    assert torch.allclose(real.logits, gpt2_module(ids).logits)  # normal traces are real again


def test_scan_applies_edits_and_errors_leave_no_fake_mode(gpt2):
    ids = torch.randint(0, 100, (2, 4))
    with gpt2.edit() as edited:
        edited.transformer.h[0].mlp.output = edited.transformer.h[0].mlp.output[:, :1]
    with edited.scan(ids):
        cut = edited.transformer.h[0].mlp.output.shape
    assert cut == (2, 1, 32)
    with pytest.raises(ZeroDivisionError):
        with gpt2.scan(ids):
            gpt2.transformer.h[0].output
            1 / 0
    assert detect_fake_mode() is None
    with pytest.raises(glassbox.TraceStateError, match="with block"):
        gpt2.scan(ids)._run_now()
