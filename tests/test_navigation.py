"""Tree navigation: rename= aliases, envoy.get, modules() / named_modules(), .device / .devices.

On the offline tiny GPT-2 (``transformer.h``) and tiny Llama (``model.layers``): one rename
mapping makes the same script read both.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

import glassbox
from glassbox import LanguageModel
from glassbox.offline import tiny_gpt2_path, tiny_llama_path

UNIFORM = {"transformer.h": "layers", "model.layers": "layers", "attn": "attention", "self_attn": "attention"}


@pytest.fixture(scope="module")
def gpt2():
    return LanguageModel(tiny_gpt2_path(), rename=UNIFORM)


@pytest.fixture(scope="module")
def llama():
    return LanguageModel(tiny_llama_path(), rename=UNIFORM)


def test_one_rename_reads_both_architectures(gpt2, llama):
    assert gpt2.layers is gpt2.transformer.h and llama.layers is llama.model.layers
    assert gpt2.layers[1].attention is gpt2.transformer.h[1].attn
    assert llama.layers[1].attention is llama.model.layers[1].self_attn
    for model, native in ((gpt2, lambda m: m.transformer.h[2]), (llama, lambda m: m.model.layers[2])):
        with model.trace("The Eiffel Tower is in"):
            via_alias = model.layers[2].output.save()
        with model.trace("The Eiffel Tower is in"):
            via_path = native(model).output.save()
        assert torch.equal(via_alias, via_path)


def test_aliases_leave_the_tree_alone(gpt2):
    plain = LanguageModel(tiny_gpt2_path())
    assert [name for name, _ in gpt2.named_modules()] == [name for name, _ in plain.named_modules()]
    assert len(gpt2.transformer) == len(plain.transformer)


def test_rename_refuses_ambiguous_or_hiding_aliases():
    net = torch.nn.Sequential(OrderedDict(first=torch.nn.Linear(2, 2), act=torch.nn.ReLU()))
    with pytest.raises(ValueError, match="would hide an alias or submodule"):
        glassbox.NNsight(net, rename={"first": "act"})
    with pytest.raises(ValueError, match=r"would hide the envoy attribute \.output"):
        glassbox.NNsight(net, rename={"first": "output"})
    with pytest.raises(ValueError, match=r"would hide the attribute \.training"):
        glassbox.NNsight(net, rename={"first": "training"})  # the module's own attribute
    with pytest.raises(ValueError, match="matches 2 submodules"):
        glassbox.NNsight(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)),
                         rename={torch.nn.Linear: "lin"})
    with pytest.raises(TypeError, match="rename= takes a dict"):
        glassbox.NNsight(net, rename=[("0", "first")])


def test_a_module_class_can_be_a_key():
    net = glassbox.NNsight(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()),
                           rename={torch.nn.ReLU: "act"})
    assert net.act is net[1]


def test_get_walks_names_indices_and_aliases(gpt2):
    assert gpt2.get("transformer.h.0.mlp") is gpt2.transformer.h[0].mlp
    assert gpt2.get("layers.3.attention") is gpt2.transformer.h[3].attn
    assert gpt2.get("") is gpt2
    with gpt2.trace("Hello world"):
        via_get = gpt2.get("layers.1.mlp.output").save()
        direct = gpt2.transformer.h[1].output.save()
    assert via_get.shape == direct.shape
    with pytest.raises(AttributeError, match="no submodule 'nope'"):
        gpt2.get("transformer.nope")
    with pytest.raises(AttributeError, match="no submodule '_module'"):
        gpt2.get("transformer._module")  # no private fields: remote code cannot walk out with it


def test_named_modules_as_nnsight_and_take_a_filter(gpt2):
    names = [name for name, _ in gpt2.named_modules()]
    assert set(names) == {f"model.{n}" if n else "model" for n, _ in gpt2._module.named_modules()}
    assert names[-1] == "model"  # nnsight 0.8's order: a module after its submodules
    for name, envoy in gpt2.named_modules():
        assert gpt2.get(name) is envoy
    mlps = gpt2.modules(lambda e: type(e._module).__name__ == "GPT2MLP")
    assert mlps == [block.mlp for block in gpt2.transformer.h]
    assert [n for n, _ in gpt2.transformer.named_modules(lambda e: e._name == "mlp")] == [
        f"model.transformer.h.{i}.mlp" for i in range(len(gpt2.transformer.h))
    ]


def test_device_and_devices():
    net = glassbox.NNsight(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    assert net.device == torch.device("cpu") and net.devices == {torch.device("cpu")}
    assert net[1].device is None and net[1].devices == set()
    lazy = LanguageModel(tiny_llama_path())
    assert lazy.device == torch.device("meta")  # before the first trace: the meta skeleton
    with lazy.trace("Hi"):
        pass
    assert lazy.device == torch.device("cpu") and lazy.model.layers[0].devices == {torch.device("cpu")}
