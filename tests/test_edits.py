"""model.edit(): blocks stored on a wrapper and replayed at every later trace (real models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.doc_blocks import run_python_blocks

import glassbox
from glassbox import LanguageModel, OutOfOrderError, TraceStateError
from glassbox.offline import smollm2_path


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randint(0, 100, (2, 7))


def _hooked(module: torch.nn.Module, hooks: list, ids: torch.Tensor) -> torch.Tensor:
    """The plain module's logits with ``hooks`` [(submodule, fn)] as forward hooks."""
    handles = [sub.register_forward_hook(fn) for sub, fn in hooks]
    try:
        with torch.no_grad():
            return module(ids).logits
    finally:
        for handle in handles:
            handle.remove()


def _zero_first(mod, inputs, output):
    output[0].zero_()


def _no_wrappers(module: torch.nn.Module) -> bool:
    return all("forward" not in m.__dict__ for m in module.modules())


def test_edit_makes_an_edited_copy_and_leaves_the_model_alone(gpt2, gpt2_module, ids):
    with gpt2.edit() as edited:
        gpt2.transformer.h[0].attn.output[0][:] = 0  # the body is stored, not run
    assert isinstance(edited, glassbox.NNsight) and edited is not gpt2
    assert edited._module is gpt2._module  # the same module: weights shared, not copied
    with edited.trace(ids):
        out_edited = edited.output.save()
    with gpt2.trace(ids):
        out = gpt2.output.save()
    expected = _hooked(gpt2_module, [(gpt2_module.transformer.h[0].attn, _zero_first)], ids)
    assert torch.allclose(out_edited.logits, expected, atol=1e-6)
    assert torch.equal(out.logits, _hooked(gpt2_module, [], ids))
    assert not torch.allclose(out.logits, expected)
    assert _no_wrappers(gpt2_module)


def test_nnsight_tuple_binding_and_the_copy_in_the_body(gpt2, gpt2_module, ids):
    with gpt2.edit() as (tracer, edited):
        edited.transformer.h[0].attn.output[0][:] = 0
    assert isinstance(tracer, glassbox.editing.EditTracer)
    expected = _hooked(gpt2_module, [(gpt2_module.transformer.h[0].attn, _zero_first)], ids)
    assert torch.allclose(edited.trace(ids, trace=False).logits, expected, atol=1e-6)  # trace=False too
    with edited.trace(ids):
        again = edited.output.save()
    assert torch.allclose(again.logits, expected, atol=1e-6)


def test_inplace_edit_and_clear_edits_restore_exactly(gpt2, gpt2_module, ids):
    with gpt2.trace(ids):
        before = gpt2.output.save()
    with gpt2.edit(inplace=True) as tracer:
        gpt2.transformer.h[1].mlp.output *= 2
    assert isinstance(tracer, glassbox.editing.EditTracer)
    with gpt2.trace(ids):
        edited = gpt2.output.save()

    def double(mod, inputs, output):
        return output * 2

    expected = _hooked(gpt2_module, [(gpt2_module.transformer.h[1].mlp, double)], ids)
    assert torch.allclose(edited.logits, expected, atol=1e-6)
    gpt2.clear_edits()
    with gpt2.trace(ids):
        after = gpt2.output.save()
    assert torch.equal(after.logits, before.logits)


def test_edit_runs_before_the_users_body_at_the_same_module(gpt2, gpt2_module, ids):
    with gpt2.edit() as edited:
        gpt2.transformer.h[1].mlp.output *= 2
    with edited.trace(ids):
        seen = edited.transformer.h[1].mlp.output.clone().save()  # already doubled by the edit
        edited.transformer.h[1].mlp.output += 1
        out = edited.output.save()
    raw = {}

    def record(mod, inputs, output):
        raw["mlp"] = output.clone()
        return output * 2 + 1

    expected = _hooked(gpt2_module, [(gpt2_module.transformer.h[1].mlp, record)], ids)
    assert torch.allclose(seen, raw["mlp"] * 2, atol=1e-6)
    assert torch.allclose(out.logits, expected, atol=1e-6)


def test_edits_stack_in_order_and_copies_keep_their_own(gpt2, gpt2_module, ids):
    scale = 3.0
    with gpt2.edit() as edited:
        gpt2.transformer.h[2].mlp.output *= scale
    scale = 100.0  # the edit keeps the value its block read when it was made
    with edited.edit(inplace=True):
        edited.transformer.h[2].mlp.output += 1
    with edited.edit() as twice:
        edited.transformer.h[0].attn.output[0][:] = 0
    with edited.trace(ids):
        out = edited.output.save()
    with twice.trace(ids):
        out_twice = twice.output.save()
    mlp = gpt2_module.transformer.h[2].mlp
    expected = _hooked(gpt2_module, [(mlp, lambda m, i, o: o * 3 + 1)], ids)
    assert torch.allclose(out.logits, expected, atol=1e-6)
    hooks = [(gpt2_module.transformer.h[0].attn, _zero_first), (mlp, lambda m, i, o: o * 3 + 1)]
    assert torch.allclose(out_twice.logits, _hooked(gpt2_module, hooks, ids), atol=1e-6)
    edited.clear_edits()
    with edited.trace(ids):
        clean = edited.output.save()
    assert torch.equal(clean.logits, _hooked(gpt2_module, [], ids)) and scale == 100.0


def test_edit_applies_to_every_row_of_batched_invokes(gpt2, gpt2_module, ids):
    with gpt2.edit() as edited:
        gpt2.transformer.h[0].attn.output[0][:] = 0
    with edited.trace() as tracer:
        with tracer.invoke(ids[:1]):
            first = edited.output.save()
        with tracer.invoke(ids[1:]):
            second = edited.output.save()
    expected = _hooked(gpt2_module, [(gpt2_module.transformer.h[0].attn, _zero_first)], ids)
    assert torch.allclose(torch.cat([first.logits, second.logits]), expected, atol=1e-6)


def test_edit_with_tracer_iter_applies_at_every_generation_step(gpt2_lm):
    prompt, n = "Hello, my name is", 4
    with gpt2_lm.edit() as (tracer, edited):
        for _step in tracer.iter[:]:
            edited.transformer.h[1].mlp.output *= 0.25
    with edited.generate(prompt, max_new_tokens=n, do_sample=False) as gen:
        logits = glassbox.save([])
        for _step in gen.iter[:]:
            logits.append(edited.lm_head.output[:, -1])
    # the same edit as a plain forward hook around Hugging Face generate
    module = gpt2_lm._module
    seen = []
    handles = [
        module.transformer.h[1].mlp.register_forward_hook(lambda m, i, o: o * 0.25),
        module.lm_head.register_forward_hook(lambda m, i, o: seen.append(o[:, -1].clone())),
    ]
    try:
        enc = gpt2_lm.tokenizer(prompt, return_tensors="pt")
        expected = module.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=gpt2_lm._pad_id())
    finally:
        for handle in handles:
            handle.remove()
    assert len(logits) == len(seen) == n
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(logits, seen))
    assert torch.equal(gen.result, expected)
    assert torch.equal(edited.generate(prompt, max_new_tokens=n, do_sample=False), expected)  # no with
    with gpt2_lm.generate(prompt, max_new_tokens=n, do_sample=False) as plain:
        first = gpt2_lm.lm_head.output[:, -1].save()
    assert not torch.allclose(first, seen[0])  # the original wrapper has no edit
    assert plain.result.shape == expected.shape


def test_edit_of_a_lazy_language_model_loads_weights_once_for_both():
    from glassbox.offline import tiny_gpt2_path

    lm = glassbox.LanguageModel(tiny_gpt2_path())
    assert lm.device.type == "meta"
    with lm.edit() as edited:
        lm.transformer.h[0].mlp.output[:] = 0
    with edited.trace("Hello"):
        out = edited.output.save()
    assert lm.device.type == "cpu" and edited._module is lm._module  # one load, shared
    assert edited.transformer.h[0].mlp._module is lm._module.transformer.h[0].mlp
    with lm.trace("Hello"):
        plain = lm.output.save()
    assert not torch.allclose(out.logits, plain.logits)


def test_a_failing_edit_names_itself_and_leaves_the_model_clean(gpt2, gpt2_module, ids):
    with gpt2.edit() as edited:
        edited.transformer.h[2].output
        edited.transformer.h[0].output  # out of order: fails at every trace, not now
    line = test_a_failing_edit_names_itself_and_leaves_the_model_clean.__code__.co_firstlineno + 2
    with pytest.raises(OutOfOrderError) as caught:
        with edited.trace(ids):
            edited.output.save()
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert f"at line {line + 1} in edit 0" in notes and f"test_edits.py:{line};" in notes
    assert "clear_edits" in notes
    assert _no_wrappers(gpt2_module) and edited.active is None
    with gpt2.trace(ids):
        out = gpt2.output.save()
    assert torch.equal(out.logits, _hooked(gpt2_module, [], ids))
    edited.clear_edits()
    with edited.trace(ids):
        again = edited.output.save()
    assert torch.equal(again.logits, out.logits)


def test_names_set_in_an_edit_are_not_written_back(gpt2, ids):
    with gpt2.edit() as edited:
        inside = gpt2.transformer.h[0].output
    with edited.trace(ids):
        pass
    assert "inside" not in locals()


def test_bad_uses_are_refused_clearly(gpt2, gpt2_lm, ids):
    with pytest.raises(TraceStateError, match="needs the source"):
        exec("with model.edit() as e:\n    model.transformer.h[0].output[:] = 0\n", {"model": gpt2})
    with gpt2.trace(ids):
        with pytest.raises(TraceStateError, match="outside any trace"):
            with gpt2.edit():
                pass
    with pytest.raises(TraceStateError, match="unpacks 3"):
        with gpt2.edit() as (_a, _b, _c):
            gpt2.transformer.h[0].output[:] = 0
    after = "runs"  # a refused edit leaves nothing armed: the next line runs
    assert after == "runs"
    with gpt2_lm.edit() as edited:
        edited.transformer.h[0].mlp.output[:] = 0
    with pytest.raises(TraceStateError, match="locally only"):
        with edited.trace("Hello", remote="local"):
            pass
    with pytest.raises(TraceStateError, match="locally only"):
        with edited.session(remote="local"):
            pass


def test_docs_examples_run(gpt2, gpt2_module, ids):
    """docs/edits-and-scan.md's python blocks, in order (``model`` the tiny GPT-2, ``x`` its ids)."""
    docs = Path(__file__).resolve().parent.parent / "docs" / "edits-and-scan.md"
    given = {"model": gpt2, "x": ids, "LanguageModel": LanguageModel, "smollm2_path": smollm2_path}
    namespace = run_python_blocks(docs, given, least=2)
    with torch.no_grad():
        hooks = [(gpt2_module.transformer.h[0].attn, _zero_first)]
        assert torch.allclose(namespace["out_e"].logits, _hooked(gpt2_module, hooks, ids))
        assert torch.allclose(namespace["out"].logits, gpt2_module(ids).logits)
    assert namespace["dim"] == 49152 and namespace["hidden"].device.type == "meta"
