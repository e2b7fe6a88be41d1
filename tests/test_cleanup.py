"""After any error the model is clean: nothing installed, next trace works."""

from __future__ import annotations

import pytest
import torch

import glassbox
from glassbox import OutOfOrderError


def _assert_clean(net, mlp, x, reference):
    for module in mlp.modules():
        assert "forward" not in module.__dict__
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert net.active is None
    assert torch.Tensor.backward is glassbox.backward.patched_backward  # mounted; torch's own outside
    assert torch.equal(mlp(x), reference)
    with net.trace(x):
        out = net.output.save()
    assert torch.equal(out, reference)


class Boom(Exception):
    pass


def test_user_exception(net, mlp, x):
    reference = mlp(x)
    with pytest.raises(Boom):
        with net.trace(x):
            net[2].output[:] = 5
            raise Boom()
    _assert_clean(net, mlp, x, reference)


def test_model_exception_points_at_model_and_user_line(net, mlp, x):
    reference = mlp(x)
    with pytest.raises(RuntimeError, match="mat1 and mat2") as info:
        with net.trace(x):
            net[2].output = torch.zeros(2, 5)  # wrong width: layer 3 fails
            net.output
    frames = [f.name for f in __import__("traceback").extract_tb(info.tb)]
    assert "test_model_exception_points_at_model_and_user_line" in frames
    _assert_clean(net, mlp, x, reference)


def test_order_error(net, mlp, x):
    reference = mlp(x)
    with pytest.raises(OutOfOrderError):
        with net.trace(x):
            net[5].output
            net[1].output
    _assert_clean(net, mlp, x, reference)


def test_base_exception(net, mlp, x):
    reference = mlp(x)
    with pytest.raises(KeyboardInterrupt):
        with net.trace(x):
            net[3].output
            raise KeyboardInterrupt
    _assert_clean(net, mlp, x, reference)


def test_invoke_body_exception(net, mlp, x):
    reference = mlp(x)
    with pytest.raises(ZeroDivisionError) as info:
        with net.trace() as tracer:
            with tracer.invoke(x[:1]):
                net[1].output
            with tracer.invoke(x[1:]):
                net[3].output
                1 / 0
    last = __import__("traceback").extract_tb(info.tb)[-1]
    assert last.line.strip() == "1 / 0"
    _assert_clean(net, mlp, x, reference)


def test_error_inside_a_running_model_with_waiting_invokes(mlp, x):
    class Fragile(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = mlp

        def forward(self, x):
            self.inner[:3](x)
            raise ValueError("model failed")

    model = glassbox.NNsight(Fragile())
    with pytest.raises(ValueError, match="model failed"):
        with model.trace() as tracer:
            with tracer.invoke(x[:1]):
                model.inner[1].output
                model.inner[5].output
            with tracer.invoke(x[1:]):
                model.inner[6].output
    for module in mlp.modules():
        assert "forward" not in module.__dict__


def test_nested_trace_of_same_model_is_refused(net, mlp, x):
    reference = mlp(x)
    with pytest.raises(glassbox.TraceStateError, match="already being traced"):
        with net.trace(x):
            with net.trace(x):
                pass
    _assert_clean(net, mlp, x, reference)


def test_outside_a_trace_the_model_is_untouched(net, mlp, x):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    reference = mlp(x)
    with net.trace(x):
        net[1].output[:] = 0
    assert torch.equal(mlp(x), reference)
    for k, v in mlp.state_dict().items():
        assert torch.equal(v, before[k])
