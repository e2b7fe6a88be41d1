"""tracing.run_together: independent bodies in ONE forward pass, each on a copy of its own rows.

This is the seam a server's co-tenant batches stand on, tested here on its own: whatever one
body does with what it is handed, it cannot read or change another body's rows.
"""

from __future__ import annotations

import pytest
import torch

from glassbox import LanguageModel, NNsight
from glassbox.batching import SharedWrite, copy_back
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




class _Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return self.inner(x) * scale


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Scaled()

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return self.block(x, scale)


def test_a_body_cannot_change_what_the_batch_shares() -> None:
    """A value every row shares (here a scale given to every invoke; in a language model a flag or
    a cache) is not any one body's to change: a body that replaces it, or adds a keyword, would
    change the other requests' values. The pass refuses it (SharedWrite): a server then runs each
    request alone. Its own rows it may change."""
    torch.manual_seed(0)
    net = NNsight(_Net())
    inputs = [torch.randn(2, 3), torch.randn(2, 3)]

    def bodies(first: str) -> list[Body]:
        sources = [first, "out = net.output\n"]
        return [Body(compile(source, f"<b{i}>", "exec"), {"net": net, "torch": torch},
                     net._prepare((x, 2.0), {}), f"b{i}")
                for i, (source, x) in enumerate(zip(sources, inputs))]

    for attack in ("args, kwargs = net.block.inputs\nnet.block.inputs = ((args[0], 0.0), kwargs)\n",
                   "args, kwargs = net.block.inputs\nnet.block.inputs = (args, {'flag': True})\n"):
        with pytest.raises(SharedWrite, match="shares between its requests"):
            run_together(net, bodies(attack))
    own = bodies("args, kwargs = net.block.inputs\nnet.block.inputs = ((args[0] * 0, 2.0), kwargs)\n")
    run_together(net, own)  # its own rows replaced, the shared scale handed back as it was
    assert torch.allclose(own[1].namespace["out"], net._module(inputs[1], 2.0))


def test_copy_back_never_writes_a_shared_tensor() -> None:
    """In-place edits go back into the body's rows; a tensor the batch shares (not narrowed: the
    view IS the batch's) is never written, and an edit of it is refused."""
    batch, shared = torch.zeros(4, 3), torch.ones(5)
    full = (batch, shared)
    view = (batch[2:4], shared)  # what narrow gives rows 2..4
    copy = (torch.full((2, 3), 7.0), torch.ones(5))
    copy_back(view, copy, full)
    assert torch.equal(batch[2:], torch.full((2, 3), 7.0)) and not batch[:2].any()
    with pytest.raises(SharedWrite):
        copy_back(view, (copy[0], torch.zeros(5)), full)
    assert torch.equal(shared, torch.ones(5))
