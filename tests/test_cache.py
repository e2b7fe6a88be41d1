"""tracer.cache(): outputs (and inputs) of chosen or all modules."""

from __future__ import annotations

import torch


def test_cache_all_modules(net, mlp, x):
    with net.trace(x) as tracer:
        cache = tracer.cache()
    assert torch.allclose(cache["model.0"].output, mlp[0](x))
    assert torch.allclose(cache.model[2].output, mlp[:3](x))
    assert torch.allclose(cache["model"].output, mlp(x))
    assert len(cache) == len(list(mlp.modules()))


def test_cache_selected_modules_with_inputs(net, mlp, x):
    with net.trace(x) as tracer:
        cache = tracer.cache(modules=[net[2], mlp[4]], include_inputs=True)
    assert set(cache) == {"model.2", "model.4"}
    assert torch.allclose(cache["model.2"].input, mlp[:2](x))
    assert torch.allclose(cache["model.4"].output, mlp[:5](x))


def test_cache_sees_edits(net, x):
    with net.trace(x) as tracer:
        cache = tracer.cache(modules=[net[1], net[2]])
        net[1].output[:] = 0
    assert torch.count_nonzero(cache["model.1"].output) == 0


def test_cache_holds_replaced_values(net, x):
    with net.trace(x) as tracer:
        cache = tracer.cache(modules=[net[2]])
        net[2].output = torch.full((2, 8), 7.0)
    assert torch.equal(cache["model.2"].output, torch.full((2, 8), 7.0))


# ---------------------------------------------------------------- options and visits (nnsight 0.8)


class Shared(torch.nn.Module):
    """One block used at three places of the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.block = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = torch.tanh(self.block(x))
        return x


def test_one_entry_per_call():
    import glassbox

    torch.manual_seed(0)
    module = Shared()
    x = torch.randn(2, 4)
    with glassbox.NNsight(module).trace(x) as tracer:
        cache = tracer.cache(modules=["model.block"], include_inputs=True)
    entry = cache["model.block"]
    assert len(entry) == 3 and len(cache.model.block) == 3
    h, outs = x, []
    with torch.no_grad():
        for _ in range(3):
            outs.append(module.block(h))
            h = torch.tanh(outs[-1])
    assert all(torch.equal(a, b) for a, b in zip(entry.output, outs))  # a list: one per call
    assert torch.equal(entry[1].input, torch.tanh(outs[0]))
    assert entry.outputs == entry.output and len(entry.all_inputs) == 3


def test_options_dtype_detach_device_and_paths(net, mlp, x):
    x = x.requires_grad_()
    with net.trace(x) as tracer:
        half = tracer.cache(modules=["0", net[2]], dtype=torch.float16)
        kept = tracer.cache(modules=[mlp[4]], detach=False, device=None)
    assert set(half) == {"model.0", "model.2"}
    assert half["model.0"].output.dtype == torch.float16 and not half["model.0"].output.requires_grad
    assert torch.allclose(half["model.2"].output.float(), mlp[:3](x), atol=1e-2)
    live = kept["model.4"].output
    assert live.grad_fn is not None  # detach=False: still part of the graph
    live.sum().backward()
    assert x.grad is not None


def test_inputs_none_when_not_cached_and_inputs_only(net, mlp, x):
    with net.trace(x) as tracer:
        outs = tracer.cache(modules=[net[2]])
        ins = tracer.cache(modules=[net[2]], include_output=False, include_inputs=True)
    assert outs["model.2"].inputs is None and outs["model.2"].input is None
    assert ins["model.2"].output is None
    assert torch.allclose(ins["model.2"].input, mlp[:2](x))


def test_navigation_short_form_indices_and_aliases(gpt2_module):
    import glassbox

    model = glassbox.NNsight(gpt2_module, rename={"transformer.h": "layers"})
    ids = torch.tensor([[1, 2, 3]])
    with model.trace(ids) as tracer:
        cache = tracer.cache(modules=[model.transformer.h[0], model.transformer.h[3]])
    first = cache["model.transformer.h.0"].output[0]
    assert torch.equal(cache.model.transformer.h[0].output[0], first)
    assert torch.equal(cache.transformer.h[0].output[0], first)  # the short form, as nnsight
    assert torch.equal(cache.layers[-1].output[0], cache["model.transformer.h.3"].output[0])  # alias + -1
    assert sorted(cache.model.transformer.keys()) == ["model.transformer.h.0", "model.transformer.h.3"]


def test_one_entry_per_generation_step(gpt2_lm):
    with gpt2_lm.generate("Hello there", max_new_tokens=3) as tracer:
        cache = tracer.cache(modules=[gpt2_lm.lm_head])
        out = tracer.result.save()
    steps = cache.model.lm_head
    assert len(steps) == 3
    # generate asks the head for the last position only: one row of logits per step, and each
    # step's argmax is the token it generated (greedy)
    assert all(step.shape[:2] == (1, 1) for step in steps.output)
    assert [int(step[0, -1].argmax()) for step in steps.output] == out[0, -3:].tolist()


def test_cache_comes_back_from_a_remote_block(gpt2_lm, monkeypatch):
    import glassbox

    monkeypatch.setattr(glassbox.CONFIG, "HOST", "http://127.0.0.1:9")  # nothing may use the network
    results = []
    for remote in (False, "local"):
        with gpt2_lm.trace("The cat sat", remote=remote) as tracer:
            cache = tracer.cache(modules=["transformer.h.1", "lm_head"], include_inputs=True)
        results.append(cache)
    local, remote = results
    assert type(remote) is glassbox.Cache and set(remote) == set(local)
    assert torch.equal(remote.model.lm_head.output, local.model.lm_head.output)
    assert torch.equal(remote.transformer.h[1].input, local.transformer.h[1].input)
