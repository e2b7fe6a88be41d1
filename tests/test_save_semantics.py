"""Save semantics: ``.save()`` on what a researcher builds inside a trace (lists, dicts, sets,
tuples, as nnsight 0.8 allows), ``glassbox.save`` for any value, and a clear error outside a
trace. On the offline tiny GPT-2 with its real tokenizer."""

from __future__ import annotations

import pytest
import torch

import glassbox
from glassbox import LanguageModel, TraceStateError
from glassbox.offline import tiny_gpt2_path


@pytest.fixture(scope="module")
def model():
    return LanguageModel(tiny_gpt2_path())


def test_containers_built_inside_a_trace_save_like_tensors(model):
    with model.trace("The Eiffel Tower is in"):
        per_layer = [].save()
        norms = {}.save()
        seen = set().save()
        for i, block in enumerate(model.transformer.h):
            per_layer.append(block.output[:, -1])
            norms[i] = block.output.norm().item()
            seen.add(tuple(block.output.shape))
        pair = (per_layer[0], per_layer[-1]).save()
        top = model.output.logits[0, -1].max(-1).save()  # a torch.return_types tuple
    assert len(per_layer) == len(model.transformer.h) == len(norms)
    tokens = len(model.tokenizer("The Eiffel Tower is in")["input_ids"])
    assert seen == {(1, tokens, model.config.n_embd)} and pair[0] is per_layer[0]
    assert top.values.ndim == 0 and 0 <= top.indices.item() < model.config.vocab_size


def test_glassbox_save_keeps_working_on_any_value(model):
    with model.trace("Hello world"):
        stats = glassbox.save({"norm": model.transformer.h[0].output.norm().item()})
        count = glassbox.save(3)
    assert stats["norm"] > 0 and count == 3


def test_save_outside_a_trace_says_what_to_do(model):
    for attempt in (lambda: [1, 2].save(), lambda: {"a": 1}.save(), lambda: glassbox.save(torch.ones(1))):
        with pytest.raises(TraceStateError, match=r"belong inside `with model\.trace"):
            attempt()


def test_torch_behaves_as_torch_outside_a_trace(model):
    with model.trace("Hello"):
        h = model.transformer.h[0].output.save()
    with pytest.raises(TraceStateError, match="belong inside"):
        h.save()  # mounted at the first trace; outside one it says what to do
    w = torch.ones(3, requires_grad=True)
    (w * 2).sum().backward()  # Tensor.backward outside a trace is torch's own
    assert torch.equal(w.grad, torch.full((3,), 2.0))


def test_saving_between_the_traces_of_a_session(model):
    with model.session():
        with model.trace("Hello"):
            h = model.transformer.h[0].output.save()
        doubled = glassbox.save(h * 2)
        summary = {"h": h}.save()
    assert torch.equal(doubled, h * 2) and summary["h"] is h
    with pytest.raises(TraceStateError):
        [].save()  # the session is over


def test_save_in_an_invoke_body(model):
    with model.trace() as tracer:
        with tracer.invoke("The cat sat"):
            cat = [model.transformer.h[1].output].save()
        with tracer.invoke("A dog ran far"):
            dog = {"h": model.transformer.h[1].output}.save()
    assert cat[0].shape[0] == 1 and dog["h"].shape[0] == 1
