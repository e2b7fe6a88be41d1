"""Split execution of co-tenant batches, through the real worker (the default executor, sandboxed):
the requests that share a forward each run in a process of their own, and whatever a request asks
of the forward reaches only its own rows; what a body cannot do in a shared pass (``.source``,
``hook=True``, the tracer, an error of the model's side) runs that request alone, with the result
it has alone.

Each case queues an attacker with two ordinary requests as ONE batch (``test_cotenant``'s feeder,
a real worker process with the default isolation), then compares every result with the same
request run alone.
"""

from __future__ import annotations

import pytest
from test_cotenant import GPT2_READ, PADDED, _result, _submit, alone, handle, request, saved  # noqa: F401

from glassbox import LanguageModel
from glassbox.offline import tiny_gpt2_path
from glassbox.server.workers.confine import available

pytestmark = pytest.mark.skipif(
    not available()["landlock_abi"] or not available()["seccomp"],
    reason="the kernel lacks Landlock or seccomp (isolation='process' refuses to start there)")

ATTACKS = {
    "a callable replaced inside the forward (.source)": (
        "def spy(module, query, key, value, *args, **kwargs):\n"
        "    out = eager(module, query, key, value, *args, **kwargs)\n"
        "    return (out[0] + query.shape[0], out[1])\n"   # every row the call was handed: +rows
        "source = model.transformer.h[0].attn.source\n"
        "eager = source.attention_interface_0.output\n"
        "source.attention_interface_0.output = spy\n"
        "h = model.transformer.h[1].output.save()\n"
        "logits = model.output.logits.save()\n"),
    "a source op edited": (
        "source = model.transformer.h[0].attn.source\n"
        "source.self_c_attn_1.output[:] = 0\n"
        "h = model.transformer.h[1].output.save()\n"
        "logits = model.output.logits.save()\n"),
    "a module called inside the forward (hook=True)": (
        "h = model.transformer.h[1].output\n"
        "model.transformer.h[1].output = model.transformer.h[2](h, hook=True)\n"
        "logits = model.output.logits.save()\n"),
    "edits and a replacement of its own rows": (
        "model.transformer.h[0].output[:] = 1e4\n"
        "model.transformer.h[1].output = model.transformer.h[1].output * -3\n"
        "model.transformer.wte.output[:] = 0\n"
        "logits = model.output.logits.save()\n"),
    "a replacement of another layout": (
        "model.transformer.h[1].output = model.transformer.h[1].output[:, :1]\n"
        "logits = model.output.logits.save()\n"),
    "a module that never runs": (
        "h = model.transformer.h[3].output.save()\n"
        "logits = model.transformer.h[1].output.save()\n"),
    "an error of its own in the middle": (
        "h = model.transformer.h[1].output.save()\n"
        "n = 1 / 0\n"),
}


@pytest.fixture(scope="module")
def local():
    return {"m": LanguageModel(tiny_gpt2_path(), dispatch=True)}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_an_attack_in_a_batch_reaches_only_its_own_request(handle, local, attack):  # noqa: F811
    source = ATTACKS[attack]
    # The attacker last: its neighbours are served first at every site, and wait at the next one
    # (h[2], which they edit) while it acts at h[1].
    jobs = [_submit(handle, GPT2_READ, p) for p in PADDED[1:]] + [_submit(handle, source, PADDED[0])]
    handle.wake()
    results = [_result(handle, job)[0] for job in jobs]
    assert handle.batches == 1  # they shared one batch
    expected = alone(local, request(source, PADDED[0]))
    assert results[-1].ok == expected.ok, (results[-1].error, expected.error)
    if expected.ok:  # the attacker got exactly what it gets alone
        for name, value in saved(expected).items():
            assert (saved(results[-1])[name] - value).abs().max() <= 1e-4, name
    else:
        assert results[-1].error == expected.error
    for prompt, result in zip(PADDED[1:], results):  # and its neighbours what they get alone
        lone = saved(alone(local, request(GPT2_READ, prompt)))
        for name in ("h", "logits"):
            assert (saved(result)[name] - lone[name]).abs().max() <= 1e-4, name


def test_printed_output_and_names_stay_with_their_request(handle):  # noqa: F811
    sources = [f"print('request', {i})\nn = glassbox.save({i})\nlogits = model.output.logits.save()\n"
               for i in range(3)]
    jobs = [_submit(handle, source, prompt) for source, prompt in zip(sources, PADDED)]
    handle.wake()
    for i, job in enumerate(jobs):
        result, info = _result(handle, job)
        assert saved(result)["n"] == i
        assert info.logs == f"request {i}\n"
    assert handle.batches == 1


def test_a_lone_job_that_leaves_its_pass_prints_once_and_gets_its_lone_result(handle, local):  # noqa: F811
    # A lone job that could share a pass runs as a pass of one (its output shown as it prints);
    # .source makes it leave and run alone from the start: what it printed is not printed again.
    source = ("print('before')\nn = model.transformer.h[0].attn.source.self_c_attn_1.output.save()\n"
              "h = model.transformer.h[1].output.save()\nprint('after')\n"
              "logits = model.output.logits.save()\n")
    job = _submit(handle, source, PADDED[0])
    handle.wake()
    result, info = _result(handle, job)
    assert result.ok, result.error
    assert info.logs == "before\nafter\n"
    expected = saved(alone(local, request(source, PADDED[0])))
    for name in ("h", "n", "logits"):
        assert (saved(result)[name] - expected[name]).abs().max() <= 1e-4, name
