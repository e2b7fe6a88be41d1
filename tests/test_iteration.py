"""Per-call iteration in a plain trace: tracer.iter / tracer.all, .next(), barrier, remote."""

from __future__ import annotations

import warnings

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


def test_iter_reads_every_call_then_ends_the_block_with_nnsights_warning(rec, inp):
    expected, final = by_hand(rec._module, inp)
    after = None
    with pytest.warns(UserWarning, match=r"iteration 3 of tracer.iter was never reached: "
                                         r"model.block.output ran only 3 time"):
        with torch.no_grad(), rec.trace(inp) as tracer:
            outs = glassbox.save([])
            for _ in tracer.iter[:]:
                outs.append(rec.block.output.clone())
            after = glassbox.save("ran")  # as nnsight: the lines after an open-ended loop do not run
    assert after is None
    assert len(outs) == 3
    for got, want in zip(outs, expected):
        assert torch.equal(got, want)
    assert torch.equal(tracer.result, final)  # the model ran to its end; the result is kept
    with torch.no_grad(), rec.trace(inp):  # and the model is clean for the next trace
        assert torch.equal(rec.output.save(), final)


def test_all_in_a_for_loop_is_the_open_ended_loop(rec, inp):
    expected, _ = by_hand(rec._module, inp)
    with pytest.warns(UserWarning, match="never reached"):
        with torch.no_grad(), rec.trace(inp) as tracer:
            outs = glassbox.save([])
            for _ in tracer.all():
                outs.append(rec.block.output.clone())
    assert len(outs) == 3 and all(torch.equal(a, b) for a, b in zip(outs, expected))


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


def test_bounded_loop_past_the_calls_warns_and_ends_the_block(rec, inp):
    done = False
    with pytest.warns(UserWarning, match="iteration 3 of tracer.iter was never reached"):
        with torch.no_grad(), rec.trace(inp) as tracer:
            n = glassbox.save([])
            for _ in tracer.iter[0:5]:
                n.append(rec.block.output.shape[0])
            done = glassbox.save(True)
    assert n == [2, 2, 2] and done is False


def test_bounded_loop_the_model_reaches_keeps_the_lines_after_it(rec, inp):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "never reached": the loop ends on its own
        with torch.no_grad(), rec.trace(inp) as tracer:
            n = glassbox.save([])
            for _ in tracer.iter[0:3]:
                n.append(rec.block.output.shape[0])
            out = rec.output.save()
    assert n == [2, 2, 2] and torch.equal(out, by_hand(rec._module, inp)[1])


def test_a_loop_ending_an_invoke_leaves_the_other_invokes_whole(rec):
    torch.manual_seed(6)
    a, b = torch.randn(1, 6), torch.randn(1, 6)
    with pytest.warns(UserWarning, match="never reached"):
        with torch.no_grad(), rec.trace() as tracer:
            with tracer.invoke(a):
                seen = glassbox.save([])
                for _ in tracer.iter[:]:
                    seen.append(rec.block.output.clone())
                skipped = glassbox.save("ran")  # noqa: F841 (never runs: the loop ended the invoke)
            with tracer.invoke(b):
                out_b = rec.output.save()
    assert len(seen) == 3 and "skipped" not in dir()
    assert torch.allclose(out_b, by_hand(rec._module, b)[1], atol=1e-6)


def test_all_applies_at_every_call(rec, inp):
    _, expected = by_hand(rec._module, inp, lambda call, out: out * 2)
    out = None
    with torch.no_grad(), rec.trace(inp) as tracer:
        with tracer.all():
            rec.block.output[:] *= 2
        out = rec.output.save()  # as nnsight: after `with tracer.all():` the block has ended
    assert out is None
    assert torch.allclose(tracer.result, expected)


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
            ra = glassbox.save([])
            for _ in tracer.iter[:]:
                ra.append(rec.block.output.clone())
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
    h = gpt2_lm.transformer.h
    results = []
    for remote in (False, "local"):
        with gpt2_lm.trace(remote=remote) as tracer:
            with tracer.invoke("The cat sat"):
                calls = glassbox.save([])
                for _ in tracer.iter[:]:
                    calls.append(h[1].output)
                    h[2].output[:] *= 0
                never = glassbox.save("ran")  # the open loop ended this invoke: never runs
            with tracer.invoke():  # nnsight's way to read on after an open loop: another invoke
                logits = gpt2_lm.lm_head.output.save()
        with gpt2_lm.trace("The cat sat", remote=remote) as edited:
            with edited.all():
                h[2].output[:] *= 0
                every = gpt2_lm.lm_head.output.save()
        assert "never" not in locals()
        results.append((calls, logits, every))
    (local_calls, local_logits, local_all), (remote_calls, remote_logits, remote_all) = results
    assert len(local_calls) == len(remote_calls) == 1  # each layer runs once per forward
    assert torch.equal(local_calls[0], remote_calls[0]) and torch.equal(local_logits, remote_logits)
    assert torch.equal(local_all, remote_all) and torch.equal(local_all, local_logits)
