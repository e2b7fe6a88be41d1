"""Gradients: the seed's retain_grad form and `with loss.backward():`."""

from __future__ import annotations

import pytest
import torch

from glassbox import OutOfOrderError
from glassbox.backward import BackwardTracer


@pytest.fixture(autouse=True, params=["greenlet", "thread"])
def backward_mode(request, monkeypatch):
    """Every test both ways: the CPU's greenlet, and the thread CUDA needs (autograd calls hooks
    on device threads there), forced on the CPU."""
    monkeypatch.setattr(BackwardTracer, "always_threaded", request.param == "thread")
    return request.param


def _reference_grads(mlp, x):
    h1 = mlp[:2](x)
    h1.retain_grad()
    h3 = mlp[2:4](h1)
    h3.retain_grad()
    loss = mlp[4:](h3).sum()
    loss.backward()
    return h1.grad.clone(), h3.grad.clone()


def test_retain_grad_and_backward_inside_trace(net, mlp, x):
    ref1, _ = _reference_grads(mlp, x)
    mlp.zero_grad()
    with net.trace(x):
        hidden = net[1].output.save()
        hidden.retain_grad()
        loss = net.output.sum()
        loss.backward()
    assert torch.allclose(hidden.grad, ref1)


def test_with_backward_reads_gradients_in_reverse_order(net, mlp, x):
    ref1, ref3 = _reference_grads(mlp, x)
    with net.trace(x):
        h1 = net[1].output
        h3 = net[3].output
        loss = net.output.sum()
        with loss.backward():
            g3 = h3.grad.save()
            g1 = h1.grad.save()
    assert torch.allclose(g3, ref3) and torch.allclose(g1, ref1)


def test_with_backward_replaces_a_gradient(net, mlp, x):
    with net.trace(x):
        h1 = net[1].output
        h3 = net[3].output
        loss = net.output.sum()
        with loss.backward():
            h3.grad = torch.zeros_like(h3.grad)
            g1 = h1.grad.save()
    assert torch.count_nonzero(g1) == 0
    assert mlp[0].weight.grad is not None and torch.count_nonzero(mlp[0].weight.grad) == 0
    mlp.zero_grad()


def test_gradient_out_of_order(net, x):
    with pytest.raises(OutOfOrderError, match="reverse order"):
        with net.trace(x):
            h1 = net[1].output
            h3 = net[3].output
            loss = net.output.sum()
            with loss.backward():
                h1.grad
                h3.grad
    assert not isinstance(torch.Tensor.__dict__.get("grad"), property)


def test_plain_backward_outside_trace_is_torch(mlp, x):
    loss = mlp(x).sum()
    assert loss.backward() is None
    assert mlp[0].weight.grad is not None


def test_leaving_the_backward_block_early_ends_the_pass(net, x):
    import threading

    before = threading.active_count()
    with pytest.raises(ZeroDivisionError):
        with net.trace(x):
            h = net[1].output
            loss = net.output.sum()
            with loss.backward():
                _ = h.grad
                1 / 0
    assert threading.active_count() == before  # no backward thread left waiting
    with net.trace(x):
        out = net.output.save()
    assert out.shape[0] == x.shape[0]
