"""The envoy tree mirrors the module tree and forwards everything else."""

from __future__ import annotations

import pytest
import torch

import glassbox
from glassbox import TraceStateError


def test_tree_mirrors_submodules(net, mlp):
    assert net._module is mlp and net._model is mlp
    assert net[0]._module is mlp[0]
    assert [e._module for e in net] == list(mlp)
    assert len(net) == len(mlp)
    assert net[-1]._module is mlp[-1]
    assert [e._module for e in net[1:3]] == list(mlp)[1:3]
    assert repr(net) == repr(mlp)


def test_attribute_access_and_fallthrough(gpt2, gpt2_module):
    block = gpt2.transformer.h[2]
    assert block._module is gpt2_module.transformer.h[2]
    assert block._display == "model.transformer.h[2]"
    assert gpt2.config is gpt2_module.config  # non-module attribute falls through
    assert gpt2.transformer.h[0].attn.c_attn.weight is gpt2_module.transformer.h[0].attn.c_attn.weight
    with pytest.raises(AttributeError, match="submodules are"):
        gpt2.transformer.nonexistent


def test_module_methods_return_wrapper(net, mlp):
    assert net.eval() is net and not mlp.training
    assert net.train() is net and mlp.training
    assert net.to(torch.float64) is net
    assert mlp[0].weight.dtype == torch.float64


def test_calling_envoy_runs_module(net, mlp, x):
    assert torch.equal(net(x), mlp(x))


def test_values_outside_trace_raise(net):
    with pytest.raises(TraceStateError, match="only available inside"):
        net[0].output


def test_wrapping_a_non_module_is_a_clear_error():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        glassbox.NNsight("gpt2")


def test_reserved_child_names_are_reachable_by_key():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.output = torch.nn.Linear(2, 2)  # like BERT's BertLayer.output

        def forward(self, x):
            return self.output(x)

    with pytest.warns(UserWarning, match=r"submodule named 'output'.*'\.E_output' there"):
        model = glassbox.NNsight(Block())  # as nnsight 0.8: the submodule moves to E_output
    x = torch.randn(1, 2)
    assert model["output"]._module is model._module.output
    assert model.E_output is model["output"]
    with model.trace(x):
        inner = model["output"].output.save()
        outer = model.output.save()
    assert torch.equal(inner, outer)
