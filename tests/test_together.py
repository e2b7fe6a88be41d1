"""tracing.run_together: independent bodies in ONE forward pass, each on a copy of its own rows.

This is the seam a server's co-tenant batches stand on, tested here on its own: whatever one
body does with what it is handed, it cannot read or change another body's rows.
"""

from __future__ import annotations

import torch

from glassbox import LanguageModel, NNsight
from glassbox.offline import tiny_llama_path
from glassbox.tracing import Body, collect_saved, run_together


def _mlp() -> NNsight:
    torch.manual_seed(0)
    return NNsight(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))


def _body(net: NNsight, source: str, x: torch.Tensor, label: str) -> Body:
    code = compile(source, f"<{label}>", "exec")
    return Body(code, {"net": net, "torch": torch}, net._prepare((x,), {}), label)


def test_a_body_is_handed_a_copy_that_reaches_no_other_rows() -> None:
    net = _mlp()
    x = torch.randn(2, 4)
    spy = _body(net, (
        "h = net[0].output\n"
        "try:\n"
        "    reached = torch.as_strided(h, (2, 8), (8, 1))[1].clone()\n"  # the next row, if h were a view
        "except RuntimeError:\n"
        "    reached = None\n"
        "storage_elements = h.untyped_storage().nbytes() // h.element_size()\n"
        "base_is_none = h._base is None\n"
    ), x[:1], "spy")
    victim = _body(net, "h = net[0].output.clone()\n", x[1:], "victim")
    run_together(net, [spy, victim])
    assert spy.namespace["reached"] is None  # torch refuses: the copy's storage holds one row
    assert spy.namespace["storage_elements"] == 8  # one row of 8: nothing of the other request
    assert spy.namespace["base_is_none"]
    assert torch.allclose(victim.namespace["h"], net._module[0](x[1:]), atol=1e-6)


def test_in_place_edits_reach_the_model_for_that_body_only() -> None:
    net = _mlp()
    x = torch.randn(2, 4)
    alone = net._module(x[1:])
    zeroer = _body(net, "net[0].output[:] = 0\nout = net.output\n", x[:1], "zeroer")
    other = _body(net, "out = net.output\n", x[1:], "other")
    run_together(net, [zeroer, other])
    assert torch.allclose(zeroer.namespace["out"], net[2].bias.expand(1, 2))  # its edit took effect
    assert torch.allclose(other.namespace["out"], alone)  # the neighbour's rows are untouched


def test_a_saved_value_is_the_bodys_own_and_later_batch_changes_do_not_reach_it() -> None:
    net = _mlp()
    x = torch.randn(2, 4)
    first = _body(net, "h = net[0].output\n", x[:1], "first")
    second = _body(net, "net[0].output[:] = 7\n", x[1:], "second")
    with collect_saved():
        run_together(net, [first, second])
    assert torch.allclose(first.namespace["h"], net._module[0](x[:1]), atol=1e-6)


def test_opaque_objects_such_as_a_shared_cache_are_not_handed_out() -> None:
    model = LanguageModel(tiny_llama_path(), dispatch=True)
    prompts = ["The cat sat", "Hello there my friend"]
    bodies = []
    for i, prompt in enumerate(prompts):
        code = compile("kwargs = model.model.layers[0].inputs[1]\nout = model.output\n", f"<b{i}>", "exec")
        bodies.append(Body(code, {"model": model}, model._prepare((prompt,), {}), f"b{i}"))
    run_together(model, bodies, pad_to=11)  # a length no other dimension of the model has
    for body, prompt in zip(bodies, prompts):
        kwargs = body.namespace["kwargs"]
        assert kwargs.get("past_key_values") is None  # a cache object holds every row: not handed out
        with model.trace(prompt):
            alone = model.output.save()
        out = body.namespace["out"]
        assert out.logits.shape == alone.logits.shape
        assert torch.allclose(out.logits, alone.logits, atol=1e-4)
