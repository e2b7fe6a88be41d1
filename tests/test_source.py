"""``envoy.source``: the calls inside a forward, read and edited like module outputs (nnsight 0.8)."""

from __future__ import annotations

from pathlib import Path

import accelerate.hooks
import pytest
import torch
from tests.doc_blocks import run_python_blocks

import glassbox
from glassbox import CONFIG, NNsight
from glassbox.offline import smollm2_path

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def eager() -> glassbox.LanguageModel:
    """SmolLM2 with eager attention: its attention function materialises the scores."""
    return glassbox.LanguageModel(smollm2_path(), attn_implementation="eager")


class Base(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Custom(Base):
    """super(), a closure, a private (mangled) attribute and a call made twice in a loop."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 4)
        self.fc2 = torch.nn.Linear(4, 2)
        self.__scale = 3.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = 0.5
        shift = lambda t: t + k  # noqa: E731
        h = torch.relu(self.fc1(x))
        h = shift(super().forward(h)) * self.__scale
        for _ in range(2):
            h = torch.tanh(h)
        return self.fc2(h)


@pytest.fixture
def custom() -> tuple[NNsight, glassbox.Envoy, torch.Tensor]:
    torch.manual_seed(0)
    root = NNsight(torch.nn.Sequential(Custom()))
    return root, root[0], torch.randn(3, 4)


def _clean(module: torch.nn.Module) -> bool:
    return all("forward" not in m.__dict__ for m in module.modules())


# ---------------------------------------------------------------- listing


def test_listing_names_every_call_and_shows_no_paths(eager):
    attn = eager.model.layers[0].self_attn
    text = str(attn.source)
    for name in ("self_q_proj_0", "view_0", "transpose_0", "apply_rotary_pos_emb_0", "attention_interface_1",
                 "attn_output_reshape_0", "contiguous_0", "self_o_proj_0"):
        assert name in text
    line = next(row for row in text.splitlines() if "self_q_proj_0" in row)
    assert "self.q_proj(hidden_states)" in line and "LlamaAttention.forward" in text
    inner = str(attn.source.attention_interface_1.source)
    assert "torch_matmul_0" in inner and "nn_functional_softmax_0" in inner
    assert "eager_attention_forward" in inner
    for shown in (text, inner, repr(attn.source.self_o_proj_0)):
        assert "site-packages" not in shown and str(smollm2_path()) not in shown and ".py" not in shown
    assert "self_o_proj_0" in repr(attn.source.self_o_proj_0)
    assert "self.o_proj(attn_output)" in repr(attn.source.self_o_proj_0)
    with pytest.raises(AttributeError, match="self_q_proj_0, view_0"):
        attn.source.self_q_proj_9
    with pytest.raises(TypeError, match=r"submodule.*self_attn\.q_proj\.source"):
        attn.source.self_q_proj_0.source
    with pytest.raises(TypeError, match="cannot tell which"):
        attn.source.view_0.source
    with pytest.raises(TypeError, match="no forward of its own"):
        eager.model.layers.source


class Named(torch.nn.Module):
    """Every kind of assignment nnsight 0.8 names (and the ones it does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor = torch.zeros(1)) -> torch.Tensor:  # noqa: B008
        f = torch.relu
        h = f(self.fc(x))
        a, b = h, 1  # noqa: F841
        c, d = h.chunk(2, dim=0)
        e: float = 2.0
        h[0] = h[0] + a[0]
        self.last = h.sum()
        h = g = h * e  # noqa: F841
        for _ in range(2):
            h = torch.tanh(h)
        h += 1
        return torch.cat([c, d]) + h


def test_op_names_count_assignments_like_nnsight():
    """nnsight 0.8.1's rule: one counter per name shared by calls and assignments, in execution order."""
    net = NNsight(torch.nn.Sequential(Named()))[0]
    assert net.source._compiled().names == (  # checked against nnsight 0.8.1's Source.names
        "torch_zeros_0", "f_0", "self_fc_0", "f_1", "h_0", "a_0", "b_0", "h_chunk_0", "e_0", "h_1",
        "h_sum_0", "self_last_0", "range_0", "torch_tanh_0", "h_2", "torch_cat_0",
    )
    with pytest.raises(AttributeError, match="f_0, self_fc_0, f_1, h_0"):
        net.source.f_2
    with pytest.raises(TypeError, match="is an assignment"):
        net.source.h_0.source


def test_an_assignment_op_reads_and_replaces_the_bound_value(custom):
    root, net, x = custom
    module = net._module
    with root.trace(x):
        bound = net.source.h_0.input.save()  # h = torch.relu(self.fc1(x))
        net.source.h_0.output = net.source.h_0.output * 0
        out = root.output.save()
    assert torch.equal(bound, torch.relu(module.fc1(x)))
    h = torch.tanh(torch.tanh(torch.full((3, 4), 0.5 * 3.0)))
    torch.testing.assert_close(out, module.fc2(h), rtol=0, atol=0)
    assert _clean(root._module)


def test_gpt2_attention_call_is_attention_interface_1(gpt2):
    names = gpt2.transformer.h[0].attn.source._compiled().names
    assert names.index("attention_interface_0") < names.index("attention_interface_1")
    assert "is_cross_attention_0" in names and "attn_output_2" in names


def test_ops_are_not_part_of_the_model(eager):
    module = eager._module
    keys, names = list(module.state_dict()), [n for n, _ in module.named_modules()]
    attn = eager.model.layers[0].self_attn
    with eager.trace(PROMPT):
        attn.source.self_o_proj_0.output.save()
    assert list(module.state_dict()) == keys and [n for n, _ in module.named_modules()] == names
    assert all(e._module is not attn.source.self_o_proj_0._module for e in eager.modules())


# ---------------------------------------------------------------- values


def test_op_values_are_the_calls_values(eager):
    attn = eager.model.layers[0].self_attn
    with eager.trace(PROMPT) as tracer:
        source = attn.source  # reached before the model enters self_attn
        cache = tracer.cache(modules=[attn.q_proj, source.self_q_proj_0])
        interface = source.attention_interface_1.output[0].save()
        projected = attn.o_proj.input.save()
    q = cache["model.model.layers.0.self_attn.q_proj"].output
    assert torch.equal(cache["model.model.layers.0.self_attn.source.self_q_proj_0"].output, q)
    assert torch.equal(interface.reshape(*interface.shape[:2], -1), projected)
    with eager.trace(PROMPT):
        source = attn.source
        by_module = attn.o_proj.output.save()  # the module that op calls: its call is already under way
        by_op = source.self_o_proj_0.output.save()  # and still served when it returns
    assert torch.equal(by_op, by_module)


def test_recursing_into_eager_attention_gives_the_pre_softmax_scores(eager):
    attn = eager.model.layers[0].self_attn
    with eager.trace(PROMPT, output_attentions=True):
        inner = attn.source.attention_interface_1.source
        scores = inner.torch_matmul_0.output.save()
        probs = inner.nn_functional_softmax_0.output.save()
        out = eager.output.save()
    n = scores.shape[-1]
    causal = torch.full((n, n), float("-inf")).triu(1)
    expected = torch.softmax(scores * attn._module.scaling + causal, dim=-1)
    torch.testing.assert_close(expected, out.attentions[0], rtol=0, atol=1e-6)
    assert torch.equal(probs, out.attentions[0])


def test_editing_an_op_equals_editing_by_hand(eager):
    with eager.trace(PROMPT):
        eager.model.layers[0].self_attn.source.self_o_proj_0.output[:] = 0
        doubled = eager.model.layers[1].self_attn.source.self_o_proj_0
        doubled.output = doubled.output * 2
        logits = eager.output.logits.save()
    layers = eager._module.model.layers
    hooks = [layers[0].self_attn.o_proj.register_forward_hook(lambda m, i, o: torch.zeros_like(o)),
             layers[1].self_attn.o_proj.register_forward_hook(lambda m, i, o: o * 2)]
    try:
        with torch.no_grad():
            expected = eager._module(**eager.tokenizer(PROMPT, return_tensors="pt")).logits
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(logits, expected)


def test_custom_module_super_closure_private_loop_skip(custom):
    root, net, x = custom
    module = net._module
    with root.trace(x):
        hidden = net.source.self_fc1_0.output.save()
        relu = net.source.torch_relu_0.output.save()
        base = net.source.forward_0.output.save()  # super().forward(h)
        args, kwargs = net.source.shift_1.inputs
        net.source.shift_1.output = net.source.shift_1.output * 0  # the closure's result (shift_0 binds it)
        first = net.source.torch_tanh_0.output.save()
        second = net.source.torch_tanh_0.next().output.save()
        out = root.output.save()
    assert torch.equal(hidden, module.fc1(x)) and torch.equal(relu, torch.relu(hidden))
    assert torch.equal(base, relu * 2) and kwargs == {} and torch.equal(args[0], base)
    assert torch.equal(first, torch.zeros_like(first)) and torch.equal(second, first)
    assert torch.equal(out, module.fc2(torch.zeros(3, 4)))
    with root.trace(x):
        net.source.torch_relu_0.skip(torch.ones(3, 4))
        out = root.output.save()
    h = torch.tanh(torch.tanh(((torch.ones(3, 4) * 2) + 0.5) * 3.0))
    torch.testing.assert_close(out, module.fc2(h), rtol=0, atol=0)
    assert torch.equal(root(x), module(x)) and _clean(root._module)


def test_gpt2_mlp_activation_and_invokes(gpt2):
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    act = gpt2.transformer.h[0].mlp.source.self_act_0
    with gpt2.trace(ids):
        act.output[:] = 0
        logits = gpt2.output.logits.save()
    hook = gpt2._module.transformer.h[0].mlp.act.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        with torch.no_grad():
            expected = gpt2._module(ids).logits
    finally:
        hook.remove()
    assert torch.equal(logits, expected)
    with gpt2.trace() as tracer:
        with tracer.invoke(ids[:1]):
            first = act.output.save()
        with tracer.invoke(ids[1:]):
            second = act.output.save()
    for row, value in ((0, first), (1, second)):
        with gpt2.trace(ids[row : row + 1]):
            alone = act.output.save()
        torch.testing.assert_close(value, alone)


def test_a_static_guess_that_the_model_does_not_call_fails_clearly(gpt2):
    attention = gpt2.transformer.h[0].attn.source.attention_interface_1
    assert "eager_attention_forward" in str(attention.source)  # the forward's default, read statically
    with pytest.raises(glassbox.MissedModuleError, match="sdpa_attention_forward, which has no operation"):
        with gpt2.trace(torch.tensor([[1, 2, 3]])):
            attention.source.torch_matmul_0.output.save()
    assert "sdpa_attention_forward" in str(attention.source)  # now known from the call itself


# ---------------------------------------------------------------- cost and cleanup


def test_a_trace_without_source_changes_nothing(eager):
    attn = eager.model.layers[3].self_attn
    with eager.trace(PROMPT):
        before = eager.output.logits.save()
    with eager.trace(PROMPT):
        attn.source.self_o_proj_0.output.save()
    with eager.trace(PROMPT):
        eager.model.layers[5].output.save()
        untouched = "forward" not in attn._module.__dict__
        after = eager.output.logits.save()
    assert untouched and torch.equal(before, after) and _clean(eager._module)


def test_a_failed_trace_leaves_the_model_clean(eager):
    attn = eager.model.layers[2].self_attn
    with eager.trace(PROMPT):
        before = eager.output.logits.save()
    with pytest.raises(ZeroDivisionError):
        with eager.trace(PROMPT):
            attn.source.attention_interface_1.source.torch_matmul_0.output[:] = 0
            1 / 0
    assert _clean(eager._module) and "forward" not in attn.source.attention_interface_1._module.__dict__
    with eager.trace(PROMPT):
        after = eager.output.logits.save()
    assert torch.equal(before, after)


def test_source_is_reached_before_the_model_enters_the_module(eager):
    attn = eager.model.layers[0].self_attn
    with pytest.raises(glassbox.OutOfOrderError, match="already running"):
        with eager.trace(PROMPT):
            attn.q_proj.output.save()
            attn.source.self_o_proj_0.output.save()
    assert _clean(eager._module)
    with eager.trace(PROMPT):
        attn.input.save()  # at self_attn's input boundary it has not started yet
        given = attn.source.self_o_proj_0.input.save()
        assert torch.equal(given, attn.o_proj.input)  # the op's call, then the module it calls


def test_accelerate_hooks_still_run(custom):
    root, net, x = custom
    module = net._module

    class Double(accelerate.hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return tuple(a * 2 for a in args), kwargs

    accelerate.hooks.add_hook_to_module(module, Double())
    hooked = module.__dict__["forward"]
    with root.trace(x):
        hidden = net.source.self_fc1_0.output.save()
        out = root.output.save()
    assert torch.equal(hidden, module.fc1(x * 2)) and torch.equal(out, module(x))
    assert module.__dict__["forward"] is hooked
    accelerate.hooks.remove_hook_from_module(module)
    module.__dict__["forward"] = lambda t: t  # someone else's instance forward: refused, not bypassed
    with pytest.raises(TypeError, match="set on the instance"):
        with root.trace(x):
            net.source.self_fc1_0.output.save()


# ---------------------------------------------------------------- remote


def test_remote_local_reads_and_edits_ops_as_locally(eager, monkeypatch):
    monkeypatch.setattr(CONFIG, "HOST", "http://127.0.0.1:9")

    def run(remote):
        with eager.trace(PROMPT, remote=remote):
            attn = eager.model.layers[0].self_attn
            scores = attn.source.attention_interface_1.source.torch_matmul_0.output.save()
            attn.source.self_o_proj_0.output[:] = 0
            logits = eager.output.logits.save()
        return scores, logits

    for mine, theirs in zip(run(False), run("local")):
        assert torch.equal(mine, theirs)
    with pytest.raises(glassbox.GlassboxError, match="starts with"):
        with eager.trace(PROMPT, remote="local"):
            eager.model.layers[0].self_attn.source.self_q_proj_0._module.save()
    with pytest.raises(TypeError, match="cannot be called on its own"):
        with eager.trace(PROMPT, remote="local"):
            eager.model.layers[0].self_attn.source.self_q_proj_0.forward(1)


def test_docs_examples_run(eager):
    """docs/source.md's python blocks, in order, on the eager SmolLM2 (as ``model`` and ``eager``)."""
    docs = Path(__file__).resolve().parent.parent / "docs" / "source.md"
    namespace = run_python_blocks(docs, {"model": eager, "eager": eager}, least=2)
    assert namespace["scores"].shape[-1] == namespace["scores"].shape[-2]
