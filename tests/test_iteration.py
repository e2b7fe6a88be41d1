"""Per-call iteration in a plain trace: tracer.iter / tracer.all, .next(), barrier, remote."""

from __future__ import annotations

import pytest
import torch

import glassbox
from glassbox.errors import OutOfOrderError, TraceStateError


@pytest.fixture
def inp() -> torch.Tensor:
    torch.manual_seed(4)
    return torch.randn(2, 6)


def by_hand(module: torch.nn.Module, x: torch.Tensor, edit=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each call's block output and the model output, with ``edit(call, out)`` applied."""
    outs = []
    with torch.no_grad():
        h = module.embed(x)
        for call in range(module.steps):
            out = module.block(h)
            if edit is not None:
                out = edit(call, out)
            outs.append(out)
            h = h + out
        return outs, module.head(h)


def test_iter_reads_every_call(rec, inp):
    expected, final = by_hand(rec._module, inp)
    with torch.no_grad(), rec.trace(inp) as tracer:
        outs = glassbox.save([])
        for _ in tracer.iter[:]:
            outs.append(rec.block.output.clone())
        after = tracer.result.save()  # code after an open-ended loop runs
        with pytest.raises(OutOfOrderError, match=r"open-ended tracer\.iter"):
            rec.head.output  # ... but the loop ran the model to its end: the message says so
    assert len(outs) == 3
    for got, want in zip(outs, expected):
        assert torch.equal(got, want)
    assert torch.equal(after, final)


def test_iter_edits_one_call_only(rec, inp):
    _, expected = by_hand(rec._module, inp, lambda call, out: out * 0 if call == 1 else out)
    with torch.no_grad(), rec.trace(inp) as tracer:
        for _ in tracer.iter[1]:
            rec.block.output[:] = 0
        out = rec.output.save()
    assert torch.equal(out, expected)


def test_iter_selected_list_and_input(rec, inp):
    expected, _ = by_hand(rec._module, inp)
    with torch.no_grad(), rec.trace(inp) as tracer:
        seen = glassbox.save({})
        for i in tracer.iter[[0, 2]]:
            seen[i] = (rec.block.input.clone(), rec.block.output.clone())
    assert sorted(seen) == [0, 2]
    assert torch.equal(seen[2][1], expected[2])
    # the input of call 3 is the residual after two calls
    h = rec._module.embed(inp) + expected[0] + expected[1]
    assert torch.allclose(seen[2][0], h)


def test_bounded_loop_past_the_calls_warns_and_code_after_runs(rec, inp):
    with torch.no_grad(), rec.trace(inp) as tracer:
        n = glassbox.save([])
        with pytest.warns(UserWarning, match="ran only 3 time"):
            for _ in tracer.iter[0:5]:
                n.append(rec.block.output.shape[0])
        done = glassbox.save(True)
    assert n == [2, 2, 2] and done


def test_all_applies_at_every_call(rec, inp):
    _, expected = by_hand(rec._module, inp, lambda call, out: out * 2)
    with torch.no_grad(), rec.trace(inp) as tracer:
        with tracer.all():
            rec.block.output[:] *= 2
        out = rec.output.save()
    assert torch.allclose(out, expected)


def test_iter_order_within_an_iteration_is_checked(rec, inp):
    with pytest.raises(OutOfOrderError, match="iteration 0"):
        with rec.trace(inp) as tracer:
            for _ in tracer.iter[:]:
                rec.block.output
                rec.block.input
    # the failed trace left the model clean
    assert "forward" not in rec._module.block.__dict__
    with torch.no_grad(), rec.trace(inp):
        out = rec.output.save()
    assert torch.equal(out, by_hand(rec._module, inp)[1])


def test_iter_in_invokes_equals_each_alone(rec):
    torch.manual_seed(5)
    a, b = torch.randn(1, 6), torch.randn(1, 6)
    with torch.no_grad(), rec.trace() as tracer:
        with tracer.invoke(a):
            ra = [rec.block.output.clone() for _ in tracer.iter[:]]
        with tracer.invoke(b):
            for _ in tracer.iter[2]:
                rec.block.output[:] = 0
            rb = rec.output.save()
    alone_a, _ = by_hand(rec._module, a)
    _, alone_b = by_hand(rec._module, b, lambda call, out: out * 0 if call == 2 else out)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ra, alone_a)) and len(ra) == 3
    assert torch.allclose(rb, alone_b, atol=1e-6)


def test_without_iter_accesses_mean_the_next_call(rec, inp):
    expected, _ = by_hand(rec._module, inp)
    with torch.no_grad(), rec.trace(inp):
        first = rec.block.output.clone().save()
        second = rec.block.next().output.clone().save()
    assert torch.equal(first, expected[0]) and torch.equal(second, expected[1])


def test_all_outside_the_body_start_is_refused(rec, inp):
    with pytest.raises(TraceStateError, match=r"tracer\.all"):
        with rec.trace(inp) as tracer:
            rec.embed.output
            with tracer.all():
                rec.block.output[:] = 0


def test_nnsight_barrier_form_shares_a_value_between_invokes(rec):
    torch.manual_seed(7)
    a, b = torch.randn(1, 6), torch.randn(1, 6)
    with torch.no_grad(), rec.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(a):
            emb = rec.embed.output
            barrier()
        with tracer.invoke(b):
            barrier()
            rec.embed.output = emb
            out_b = rec.output.save()
    with torch.no_grad():
        want = rec._module(a)
    assert torch.allclose(out_b, want, atol=1e-6)


def test_iteration_in_a_remote_block_means_the_same(gpt2_lm, monkeypatch):
    monkeypatch.setattr(glassbox.CONFIG, "HOST", "http://127.0.0.1:9")  # remote="local": no network
    results = []
    for remote in (False, "local"):
        with gpt2_lm.trace("The cat sat", remote=remote) as tracer:
            with tracer.all():
                gpt2_lm.transformer.h[2].output[:] *= 0
            calls = glassbox.save([])
            for _ in tracer.iter[:]:
                calls.append(gpt2_lm.transformer.h[1].output)
            logits = tracer.result.logits.save()
        results.append((calls, logits))
    (local_calls, local_logits), (remote_calls, remote_logits) = results
    assert len(local_calls) == len(remote_calls) == 1  # each layer runs once per forward
    assert torch.equal(local_calls[0], remote_calls[0]) and torch.equal(local_logits, remote_logits)
