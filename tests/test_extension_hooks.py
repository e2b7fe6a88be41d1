"""nnsight 0.8's subclass hooks for custom models work unchanged on glassbox's NNsight.

A subclass overriding ``_batch_size(*inputs, **kwargs)`` and ``_batch(invokes, fn)`` (the forms of
nnsight/intervention/envoy.py) has them called when invokes are batched, each invoke sees its own
rows, and ``model.interleave(fn, *args)`` runs a function on one input with the edits applied.
Every test but the last two on plain NNsight/SizeOnly also passes on nnsight 0.8.1 itself (its base
``_batch`` refuses two invokes and its base ``_batch_size`` counts 1 per input; glassbox's
concatenates and counts a tensor's leading dimension).
"""

from __future__ import annotations

import pytest
import torch

import glassbox
from glassbox.models.base import NNsight


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer1 = torch.nn.Linear(4, 3)
        self.layer2 = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(torch.relu(self.layer1(x)))


class ListModel(NNsight):
    """Invokes give Python lists of 4 numbers per row; the model stacks them into a tensor."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__(module)
        self.__dict__["calls"] = []

    def _batch_size(self, *inputs, **kwargs):
        if not inputs:  # trace() with no input: nnsight asks, to pick invoke mode
            return 0
        self.calls.append(("_batch_size", len(inputs[0])))
        return len(inputs[0])

    def _batch(self, invokes, fn):
        self.calls.append(("_batch", len(invokes), fn))
        rows = [row for inputs, _ in invokes for row in inputs[0]]
        return (torch.tensor(rows, dtype=torch.float32),), {}


class Inheriting(ListModel):
    """A further subclass that defers to its parent's nnsight-form ``_batch``."""

    def _batch(self, invokes, fn):
        self.calls.append(("Inheriting._batch",))
        return super()._batch(invokes, fn)


class SizeOnly(NNsight):
    """Only ``_batch_size``: glassbox's default concatenation, rows counted by the override."""

    def _batch_size(self, *inputs, **kwargs):
        if not inputs:
            return 0
        self.__dict__.setdefault("sizes", []).append(inputs[0].shape[0])
        return inputs[0].shape[0]


A = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0]]
B = [[-2.0, 1.0, 0.0, 3.0]]


def _plain(rows):
    with torch.no_grad():
        return Net()(torch.tensor(rows, dtype=torch.float32))


@pytest.mark.parametrize("cls", [ListModel, Inheriting])
def test_two_invokes_batch_through_the_nnsight_hooks(cls):
    model = cls(Net())
    with model.trace() as tracer:
        with tracer.invoke(A):
            hidden_a = model.layer1.output.save()
            out_a = model.output.save()
        with tracer.invoke(B):
            out_b = model.output.save()
    torch.testing.assert_close(out_a, _plain(A))
    torch.testing.assert_close(out_b, _plain(B))
    assert hidden_a.shape == (2, 3)
    names = [c[0] for c in model.calls]
    assert ("_batch", 2, "__call__") in model.calls
    assert names.count("_batch_size") >= 2
    if cls is Inheriting:
        assert "Inheriting._batch" in names


def test_an_intervention_in_one_invoke_touches_only_its_rows():
    model = ListModel(Net())
    with model.trace() as tracer:
        with tracer.invoke(A):
            model.layer1.output[:] = 0
            out_a = model.output.save()
        with tracer.invoke(B):
            out_b = model.output.save()
    torch.testing.assert_close(out_a, Net().layer2(torch.zeros(2, 3)).detach())
    torch.testing.assert_close(out_b, _plain(B))


def test_a_direct_input_is_assembled_with_the_nnsight_batch():
    model = ListModel(Net())
    with model.trace(A):
        out = model.output.save()
    torch.testing.assert_close(out, _plain(A))
    assert ("_batch", 1, "__call__") in model.calls


def test_batch_size_alone_counts_the_rows():
    model = SizeOnly(Net())
    x, y = torch.randn(2, 4), torch.randn(3, 4)
    with model.trace() as tracer:
        with tracer.invoke(x):
            out_x = model.output.save()
        with tracer.invoke(y):
            out_y = model.output.save()
    with torch.no_grad():
        torch.testing.assert_close(out_x, Net()(x))
        torch.testing.assert_close(out_y, Net()(y))
    assert model.sizes == [2, 3]


def test_default_batch_size_and_nnsight_call_form_on_the_base():
    model = glassbox.NNsight(Net())
    x = torch.randn(3, 4)
    assert model._batch_size(x) == 3
    assert model._batch_size() == 0
    args, kwargs = model._batch([((x,), {}), ((x,), {})], "__call__")
    assert args[0].shape == (6, 4) and kwargs == {}


def test_interleave_runs_a_function_with_edits_applied():
    model = glassbox.NNsight(Net())
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(model.interleave("forward", x), Net()(x))
        torch.testing.assert_close(model.interleave(model._module, x), Net()(x))
    with model.edit(inplace=True):
        model.layer1.output[:] = 0
    zeroed = model.interleave("forward", x)
    torch.testing.assert_close(zeroed, Net().layer2(torch.zeros(2, 3)).detach())


def test_interleave_of_a_custom_model_uses_its_hooks():
    model = ListModel(Net())
    torch.testing.assert_close(model.interleave("__call__", A), _plain(A))
    assert ("_batch", 1, "__call__") in model.calls
