"""Reading, writing, saving, invokes and order rules inside a trace."""

from __future__ import annotations

import pytest
import torch

import glassbox
from glassbox import MissedModuleError, OutOfOrderError, TraceStateError


def _manual(mlp, x, upto):
    for layer in list(mlp)[:upto]:
        x = layer(x)
    return x


def test_read_edit_replace(net, mlp, x):
    with net.trace(x):
        a = net[0].output.save()
        net[1].output[:] = 0
        doubled_in = net[2].input * 2
        net[2].input = doubled_in
        out = net.output.save()
    assert torch.allclose(a, mlp[0](x))
    # after zeroing relu's output, layer 2 sees zeros*2: its output is its bias
    expected = _manual_rest(mlp, mlp[2].bias.expand(2, -1), start=3)
    assert torch.allclose(out, expected)
    assert torch.allclose(net._module(x), _manual(mlp, x, len(mlp)))


def _manual_rest(mlp, h, start):
    for layer in list(mlp)[start:]:
        h = layer(h)
    return h


def test_saved_value_is_a_real_tensor(net, x):
    with net.trace(x):
        h = net[0].output.save()
    assert type(h) is torch.Tensor and h.shape == (2, 8)
    with pytest.raises(TraceStateError, match="belong inside"):
        h.save()  # outside a trace, .save() says where it belongs


def test_assign_output_replaces_downstream(net, mlp, x):
    replacement = torch.ones(2, 8)
    with net.trace(x):
        net[3].output = replacement
        out = net.output.save()
    assert torch.allclose(out, _manual_rest(mlp, replacement, start=4))


def test_reading_twice_gives_the_same_call(net, x):
    with net.trace(x):
        first = net[0].output
        first[:] = 1
        again = net[0].output.save()
    assert again is first and torch.equal(again, torch.ones(2, 8))


def test_inputs_args_and_kwargs(gpt2, x):
    ids = torch.tensor([[1, 2, 3, 4]])
    with gpt2.trace(ids):
        args, kwargs = gpt2.transformer.h[1].inputs
        hidden_in = gpt2.transformer.h[1].input.save()
    with gpt2.trace(ids):
        prev_out = gpt2.transformer.h[0].output.save()
    assert torch.allclose(hidden_in, prev_out)
    assert isinstance(args, tuple) and isinstance(kwargs, dict)
    assert args[0] is hidden_in  # .input is the first positional argument of .inputs


def test_glassbox_save_on_any_value(net, x):
    with net.trace(x):
        stats = glassbox.save({"norm": net[0].output.norm().item()})
    assert stats["norm"] > 0


def test_patch_across_traces(net, mlp, x):
    with net.trace(x[:1]):
        clean = net[4].output.save()
    with net.trace(x[1:]):
        net[4].output[:] = clean
        patched = net.output.save()
    with net.trace(x[:1]):
        reference = net.output.save()
    assert torch.allclose(patched, reference)


def test_tuple_outputs_can_be_saved(gpt2):
    ids = torch.tensor([[5, 6, 7]])
    with gpt2.trace(ids):
        attn_out = gpt2.transformer.h[0].attn.output.save()
    assert isinstance(attn_out, tuple) and attn_out[0].shape == (1, 3, 32)


def test_extra_trace_kwargs_reach_forward(branchy):
    x = torch.randn(2, 6)
    with branchy.trace(x, use_unused=True):
        used = branchy.unused.output.save()
    assert used.shape == (2, 6)


# ---------------------------------------------------------------- invokes


class CountingModule(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_invokes_share_one_batched_forward(mlp, x):
    counting = CountingModule(mlp)
    model = glassbox.NNsight(counting)
    with model.trace() as tracer:
        with tracer.invoke(x[:1]):
            a = model.inner[0].output.save()
        with tracer.invoke(x[1:]):
            b = model.inner[0].output.save()
        with tracer.invoke():
            both = model.inner[0].output.save()
    assert counting.calls == 1
    assert a.shape == (1, 8) and b.shape == (1, 8) and both.shape == (2, 8)
    assert torch.allclose(torch.cat([a, b]), both)


def test_batched_equals_separate_traces(net, x):
    prompts = [x[:1], x[1:], x[:1] * 3]
    alone = []
    for p in prompts:
        with net.trace(p):
            alone.append((net[2].output.save(), net.output.save()))
    batched = []
    with net.trace() as tracer:
        for p in prompts:
            with tracer.invoke(p):
                batched.append((net[2].output.save(), net.output.save()))
    for (h1, o1), (h2, o2) in zip(alone, batched):
        assert torch.allclose(h1, h2, atol=1e-6) and torch.allclose(o1, o2, atol=1e-6)


def test_value_flows_from_one_invoke_to_the_next(net, x):
    with net.trace() as tracer:
        with tracer.invoke(x[:1]):
            cat_hidden = net[2].output.save()
        with tracer.invoke(x[1:]):
            net[2].output[:] = cat_hidden
            dog_with_cat = net.output.save()
    with net.trace(x[:1]):
        cat_out = net.output.save()
    assert torch.allclose(dog_with_cat, cat_out, atol=1e-6)


def test_edit_in_one_invoke_leaves_other_rows_alone(net, x):
    with net.trace() as tracer:
        with tracer.invoke(x[:1]):
            net[1].output = torch.zeros(1, 8)
            zeroed = net.output.save()
        with tracer.invoke(x[1:]):
            untouched = net.output.save()
    with net.trace(x[1:]):
        alone = net.output.save()
    assert torch.allclose(untouched, alone, atol=1e-6)
    assert not torch.allclose(zeroed, untouched)


def test_invokes_inside_a_function_write_back_locals(net, x):
    def run():
        with net.trace() as tracer:
            with tracer.invoke(x):
                result = net.output.save()
        return result

    assert run().shape == (2, 3)


def test_trace_input_and_invoke_together_is_an_error(net, x):
    with pytest.raises(TraceStateError, match="already has an input"):
        with net.trace(x) as tracer:
            with tracer.invoke(x):
                pass


def test_trace_without_any_input_is_an_error(net):
    with pytest.raises(TraceStateError, match="no input"):
        with net.trace():
            pass


# ---------------------------------------------------------------- control


def test_stop_ends_the_forward(mlp, x):
    counting = CountingModule(mlp)
    model = glassbox.NNsight(counting)
    ran = []
    hook = mlp[6].register_forward_hook(lambda *a: ran.append(1))
    try:
        with model.trace(x) as tracer:
            early = model.inner[1].output.save()
            tracer.stop()
        assert early.shape == (2, 8) and ran == []
        after = []
        with model.trace(x) as tracer:  # as in nnsight, the block ends at the stop too
            tracer.stop()
            after.append(model.inner[3].output)
        assert after == []
        with model.trace() as tracer:
            with tracer.invoke(x):
                first = model.inner[1].output.save()
                tracer.stop()
                after.append("invoke")
        assert first.shape == (2, 8) and after == [] and ran == []
    finally:
        hook.remove()


def test_skip_uses_the_given_value(net, mlp, x):
    with net.trace(x):
        h = net[1].output.save()
        net[2].skip(h)
        skipped_out = net[2].output.save()
        out = net.output.save()
    assert torch.equal(skipped_out, h)
    assert torch.allclose(out, _manual_rest(mlp, h, start=3))
    assert "forward" not in mlp[2].__dict__


def test_ad_hoc_module_call_inside_trace(net, mlp, x):
    with net.trace(x):
        h = net[0].output
        lens = net[-1](torch.relu(h)).save()  # not intercepted, not counted
        out = net.output.save()
    assert lens.shape == (2, 3) and out.shape == (2, 3)


def test_next_call_of_a_reused_module():
    shared = torch.nn.Linear(3, 3)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = shared

        def forward(self, x):
            return self.shared(self.shared(x))

    model = glassbox.NNsight(Twice())
    x = torch.randn(1, 3)
    with model.trace(x):
        first = model.shared.output.save()
        second = model.shared.next().output.save()
    assert torch.allclose(first, shared(x)) and torch.allclose(second, shared(shared(x)))


# ---------------------------------------------------------------- order rules


def test_out_of_order_access_raises_at_user_line(net, x):
    with pytest.raises(OutOfOrderError) as info:
        with net.trace(x):
            net[4].output
            net[0].output  # the model already passed this
    message = str(info.value)
    assert "model[0].output" in message and "model[4].output" in message
    frames = [f.name for f in __import__("traceback").extract_tb(info.tb)]
    assert "test_out_of_order_access_raises_at_user_line" in frames


def test_module_that_never_runs_is_reported(branchy):
    with pytest.raises(MissedModuleError, match="never ran"):
        with branchy.trace(torch.randn(1, 6)):
            branchy.unused.output


def test_out_of_order_in_an_invoke_names_the_invoke(net, x):
    with pytest.raises(OutOfOrderError, match="invoke 0"):
        with net.trace() as tracer:
            with tracer.invoke(x):
                net[4].output
                net[0].output


def test_child_then_parent_is_in_order(gpt2):
    ids = torch.tensor([[1, 2, 3]])
    with gpt2.trace(ids):
        mlp_out = gpt2.transformer.h[1].mlp.output.save()
        block_out = gpt2.transformer.h[1].output.save()
        logits = gpt2.output.save()
    assert mlp_out.shape == block_out.shape == (1, 3, 32)
    assert logits.logits.shape == (1, 3, 100)


def test_loop_variable_rebound_by_the_caller_wins_over_an_earlier_invokes_write(net, x):
    layers = [net[0], net[2], net[4]]
    outs = {}
    with net.trace() as tracer:
        for j, layer in enumerate(layers):
            with tracer.invoke(x[:1]):
                if j == 0:
                    for layer in layers:  # noqa: B007 - rebinds `layer` inside invoke 0
                        pass
                outs[j] = layer.output.save()
    with net.trace(x[:1]):
        expected = [net[0].output.save(), net[2].output.save(), net[4].output.save()]
    # run one after another, invoke 0 ends with layer = layers[-1], and the caller's loop then
    # rebinds `layer` to layers[1] and layers[2] for invokes 1 and 2
    assert torch.allclose(outs[0], expected[2]) and torch.allclose(outs[1], expected[1])
    assert torch.allclose(outs[2], expected[2])
