"""Ported nnsight 0.8 code runs unchanged: tree navigation, the exceptions its ``except`` clauses
name, and the smaller spellings (cache keys, CONFIG sections, .save() on plain values, the
deprecated model.iter / model.all()). Issue 22, items 5, 7 and 8.

Each expectation is what nnsight 0.8.1 does with the same lines (checked side by side with
nnsight installed by bench/setup_peers.sh), on the offline tiny GPT-2 and the offline MiniLM,
a real BERT whose layers have a submodule called ``output``.
"""

from __future__ import annotations

import traceback
import warnings

import pytest
import torch

import glassbox
from glassbox import CONFIG, Envoy, LanguageModel, NNsight, OutOfOrderError
from glassbox.offline import minilm_path, tiny_gpt2_path

PROMPT = "The Eiffel Tower is in"


@pytest.fixture(scope="module")
def gpt2() -> LanguageModel:
    return LanguageModel(tiny_gpt2_path())


# ---------------------------------------------------------------- item 5: navigation


def test_modules_and_named_modules_list_children_first_by_path(gpt2):
    named = gpt2.named_modules()
    torch_names = [name for name, _ in gpt2._module.named_modules()]
    assert sorted(name for name, _ in named) == sorted(f"model.{n}" if n else "model" for n in torch_names)
    assert named[-1] == ("model", gpt2)  # each module after everything below it: the root last
    assert named[:2] == [("model.transformer.wte", gpt2.transformer.wte),
                         ("model.transformer.wpe", gpt2.transformer.wpe)]
    where = {name: i for i, (name, _) in enumerate(named)}
    assert all(where[name.rpartition(".")[0]] > i for name, i in where.items() if "." in name)
    assert gpt2.modules(names=True) == named and gpt2.modules() == [envoy for _, envoy in named]
    for name, envoy in named:
        assert envoy.path == name and gpt2.get(name) is envoy  # get takes what named_modules gives
    mlps = gpt2.transformer.named_modules(lambda envoy: type(envoy._module).__name__ == "GPT2MLP")
    assert [name for name, _ in mlps] == [f"model.transformer.h.{i}.mlp" for i in range(4)]


def test_path_parent_root_and_get_of_a_weight(gpt2):
    attn = gpt2.transformer.h[0].attn
    assert (gpt2.path, attn.path) == ("model", "model.transformer.h.0.attn")
    assert attn.parent is gpt2.transformer.h[0] and gpt2.parent is None
    assert attn.root is gpt2 and gpt2.root is gpt2
    weight = gpt2.get("transformer.h.0.attn.c_attn.weight")
    assert weight is gpt2._module.transformer.h[0].attn.c_attn.weight
    assert gpt2.get("transformer.h.0.attn.num_heads") == 4  # a plain value of the module
    with pytest.raises(AttributeError, match="no submodule 'forward'"):
        gpt2.get("transformer.h.0.attn.forward")  # methods are not reached (remote code uses get)
    with gpt2.trace(PROMPT):
        by_path = gpt2.get(f"{attn.path}.output")[0].save()  # nnsight's names work in get too
        by_attribute = gpt2.transformer.h[1].attn.output[0].save()
    assert by_path.shape == by_attribute.shape


def test_a_submodule_named_output_is_E_output_with_nnsights_warning():
    with pytest.warns(UserWarning) as caught:
        bert = NNsight(__import__("transformers").AutoModel.from_pretrained(minilm_path()).eval())
    assert [str(w.message) for w in caught] == [  # one warning for the 12 (2 per layer)
        "Modules 'model.encoder.layer.0.attention', 'model.encoder.layer.0', "
        "'model.encoder.layer.1.attention', ... (12) have a submodule named 'output', which glassbox "
        "already serves on every module. The submodule is '.E_output' there; '.output' stays the "
        "envoy's output."]
    layer = bert.encoder.layer[0]
    assert layer.E_output is layer["output"] and layer.E_output.path == "model.encoder.layer.0.output"
    ids = torch.tensor([[101, 1037, 4937, 102]])
    with bert.trace(ids):
        inner = layer.E_output.output.save()  # BertOutput: runs last in the layer
        outer = layer.output.save()  # the layer's own output
        via_get = bert.get("encoder.layer.1.output").save()  # as nnsight: the value, not the submodule
    outer = outer[0] if isinstance(outer, tuple) else outer
    assert torch.equal(inner, outer) and isinstance(via_get, (torch.Tensor, tuple))


def test_an_envoy_of_a_module_is_a_traceable_root():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    root = Envoy(net)  # nnsight's Envoy(module), like NNsight(module)
    assert isinstance(root, Envoy) and root.path == "model" and root[0].parent is root
    x = torch.randn(2, 4)
    with root.trace(x):
        hidden = root[0].output.save()
    assert torch.equal(hidden, net[0](x))


# ---------------------------------------------------------------- item 7: exceptions


def test_nnsights_except_clauses_catch_the_same_situations(gpt2):
    with gpt2.trace(PROMPT):
        pass  # the first trace mounts Tensor.save
    with pytest.raises(ValueError, match="belong inside"):
        torch.ones(2).save()  # nnsight: ValueError
    with pytest.raises(ValueError, match="only available inside"):
        gpt2.transformer.h[0].output
    with pytest.raises(ValueError, match="before the trace reads"):
        with gpt2.trace(PROMPT) as tracer:
            gpt2.transformer.h[0].output.save()
            tracer.cache()  # nnsight: ValueError
    with pytest.raises(OutOfOrderError):
        with gpt2.trace(PROMPT):
            gpt2.transformer.h[2].output.save()
            gpt2.transformer.h[1].output.save()
    with pytest.raises(OutOfOrderError):  # a module the forward never ran: nnsight's OutOfOrderError too
        with gpt2.trace() as tracer:
            with tracer.invoke(PROMPT):
                gpt2.transformer.h[0].attn.attn_dropout.output.save()
    from glassbox.intervention.interleaver import OutOfOrderError as ported

    assert ported is OutOfOrderError  # nnsight's import path, with glassbox for nnsight


def _last_frame(error: BaseException) -> traceback.FrameSummary:
    return traceback.extract_tb(error.__traceback__)[-1]


def test_an_out_of_order_traceback_ends_at_the_users_line(gpt2, monkeypatch):
    with pytest.raises(OutOfOrderError) as inline:
        with gpt2.trace(PROMPT):
            gpt2.transformer.h[2].output.save()
            gpt2.transformer.h[1].output.save()  # the line asked for
    with pytest.raises(OutOfOrderError) as invoked:
        with gpt2.trace() as tracer:
            with tracer.invoke(PROMPT):
                gpt2.transformer.h[3].output.save()
                gpt2.transformer.h[0].output.save()  # the line asked for
    for error, line in ((inline, "h[1].output.save()"), (invoked, "h[0].output.save()")):
        last = _last_frame(error.value)
        assert last.filename == __file__ and line in last.line
    monkeypatch.setattr(CONFIG, "DEBUG", CONFIG.DEBUG)  # restored after the test
    CONFIG.APP.DEBUG = True  # nnsight's switch: keep the library's frames
    with pytest.raises(OutOfOrderError) as whole:
        with gpt2.trace(PROMPT):
            gpt2.transformer.h[2].output.save()
            gpt2.transformer.h[1].output.save()
    assert _last_frame(whole.value).filename.endswith("interleave.py")


# ---------------------------------------------------------------- item 8: the smaller ones


def test_cache_keys_is_a_list(gpt2):
    with gpt2.trace(PROMPT) as tracer:
        cache = tracer.cache(modules=[gpt2.transformer.h[0], "model.lm_head"])
    assert cache.keys() == ["model.transformer.h.0", "model.lm_head"]


def test_config_has_nnsights_sections(tmp_path, monkeypatch):
    monkeypatch.setattr(CONFIG, "HOST", CONFIG.HOST)
    monkeypatch.setattr(CONFIG, "API_KEY", CONFIG.API_KEY)
    monkeypatch.setattr(CONFIG, "STATUS", CONFIG.STATUS)
    CONFIG.API.HOST = "http://127.0.0.1:9"
    CONFIG.API.APIKEY = "gbk_test"
    CONFIG.APP.REMOTE_LOGGING = False
    assert (CONFIG.HOST, CONFIG.API_KEY, CONFIG.STATUS) == ("http://127.0.0.1:9", "gbk_test", False)
    CONFIG.APP.PYMOUNT = True  # accepted: nnsight code sets it
    with pytest.raises(AttributeError, match=r"CONFIG\.APP has no setting 'NOPE'"):
        CONFIG.APP.NOPE = 1
    monkeypatch.setenv("GLASSBOX_CONFIG", str(tmp_path / "config"))
    CONFIG.set_default_api_key("gbk_saved")
    assert CONFIG.API_KEY == "gbk_saved" and glassbox.config.Config().API_KEY == "gbk_saved"


def test_save_on_numbers_and_strings_keeps_them(gpt2):
    class Note:
        pass

    with gpt2.trace(PROMPT):
        hidden = gpt2.transformer.h[0].output
        width = hidden.shape[-1].save()  # an int
        label = "layer 0".save()
        note = glassbox.save(Note())  # an object of your own class: glassbox.save
    assert (width, label, type(note)) == (64, "layer 0", Note)


def test_deprecated_model_iter_and_all_still_work(gpt2):
    twice = torch.nn.Linear(4, 4)
    model = NNsight(torch.nn.Sequential(twice, torch.nn.ReLU(), twice))  # one module, two calls
    x = torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with model.trace(x):
            calls = [].save()
            for _ in model.iter[0:2]:
                calls.append(model[0].output)
        with model.trace(x):
            every = [].save()
            for _ in model.all():
                every.append(model[0].output)
    assert [str(w.message) for w in caught if w.category is DeprecationWarning] == [
        "model.iter is deprecated; use tracer.iter instead.",
        "model.all() is deprecated; use tracer.all() instead.",
    ]
    assert len(calls) == len(every) == 2 and torch.equal(calls[1], every[1])
