"""Co-tenant batching: several users' requests in ONE forward pass, each as if it ran alone.

Real requests (as the client frames them) on the real tiny GPT-2 and SmolLM2, compared with the
same requests run one by one through ``run_job``.
"""

from __future__ import annotations

import contextlib

import pytest

from glassbox import LanguageModel
from glassbox.offline import smollm2_path, tiny_gpt2_path
from glassbox.remote.job import JobRequest, JobResult
from glassbox.remote.protocol import ProtocolError
from glassbox.server.config import ServerConfig
from glassbox.server.jobs.batchable import batch_key
from glassbox.server.jobs.cotenant import run_batch
from glassbox.server.jobs.execute import run_job
from glassbox.server.store import JobStore
from glassbox.server.workers.feeder import Feeder
from job_requests import job_request
from waiting import HANG, patient, wait_until

GPT2_READ = ("h = model.transformer.h[1].output.save()\n"
             "model.transformer.h[2].output[:, -1] *= 2\n"
             "logits = model.output.logits.save()\n")
SMOL_READ = ("h = model.model.layers[1].output.save()\n"
             "model.model.layers[2].output[:, -1] *= 2\n"
             "logits = model.output.logits.save()\n")
PADDED = ["The Eiffel Tower is in the city of", "Hello there",
          "A much longer prompt, with many more tokens than the other two"]


def request(source: str, prompt="The Eiffel Tower is in", *, model="m", method="trace", call=None,
            first_line=10, values=None) -> JobRequest:
    return job_request(source, model=model, method=method, call=call, values=values, inputs=[prompt],
                       first_line=first_line, returns=("h", "logits", "n"), filename="<remote block>")


def saved(result: JobResult) -> dict:
    assert result.ok, result.error
    return result.decoded()["saved"]


def alone(models, item: JobRequest) -> JobResult:
    return run_job(models, item, log=lambda text: None, limits={})


@pytest.fixture(scope="module")
def gpt2():
    return {"m": LanguageModel(tiny_gpt2_path(), dispatch=True)}


@pytest.fixture(scope="module")
def smol():
    return {"m": LanguageModel(smollm2_path(), dispatch=True)}


@contextlib.contextmanager
def forward_passes(models):
    """The rows of every forward pass of the model (what its input embedding sees)."""
    rows: list[int] = []
    embedding = models["m"]._module.get_input_embeddings()
    hook = embedding.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    try:
        yield rows
    finally:
        hook.remove()


def _batch(models, items, limits=None):
    printed = [[] for _ in items]
    results = run_batch(models, items, logs=[p.append for p in printed], limits=limits or {})
    return results, printed


# ---------------------------------------------------------------- which requests may share


def _key(source, **kw):
    return batch_key(request(source, **kw))


def test_plain_traces_of_one_model_share_a_key():
    assert _key(GPT2_READ) == _key("n = model.output.logits.save()\n", prompt="other") is not None
    assert _key(GPT2_READ, model="m") != _key(GPT2_READ, model="other")


@pytest.mark.parametrize("source", [
    "h = model.output.save()\ntracer.stop()\n",                       # uses the tracer
    "with tracer.invoke('x'):\n    h = model.output.save()\n",       # its own invokes
    "h = model.output.logits.sum()\nh.backward()\n",                  # gradients
    "g = model.transformer.h[0].output.grad\n",
    "model.transformer.h[0].skip(model.transformer.h[0].input)\n",   # module skipping
    "h = model.transformer.h[0].next().output.save()\n",
    "def f(\n",                                                        # does not even parse
])
def test_requests_that_need_the_trace_to_themselves_run_alone(source):
    assert _key(source) is None


def test_generation_sessions_and_trace_arguments_run_alone():
    assert _key(GPT2_READ, method="generate") is None
    assert _key(GPT2_READ, method="session") is None
    assert _key(GPT2_READ, call={"output_attentions": True}) is None
    with pytest.raises(ProtocolError):  # not a request at all: refused at submit, never keyed
        JobRequest.read(b"not a request")


# ---------------------------------------------------------------- equal to running alone


def test_a_padded_batch_equals_each_request_alone(gpt2):
    items = [request(GPT2_READ, prompt) for prompt in PADDED]
    with forward_passes(gpt2) as passes:
        results, _ = _batch(gpt2, items)
    assert passes == [3]  # one shared forward pass
    assert all("batch_size" not in r.envelope() for r in results)  # which does not tell how many shared it
    for item, result in zip(items, results):
        expected, got = saved(alone(gpt2, item)), saved(result)
        for name in ("h", "logits"):
            assert got[name].shape == expected[name].shape  # no padding shows
            assert (got[name] - expected[name]).abs().max() <= 1e-4


def test_an_unpadded_batch_equals_each_request_alone(gpt2):
    prompts = ["The cat sat on the", "The dog ran to the", "The cow ate all the"]
    assert len({len(gpt2["m"].tokenizer(p)["input_ids"]) for p in prompts}) == 1
    items = [request(GPT2_READ, prompt) for prompt in prompts]
    with forward_passes(gpt2) as passes:
        results, _ = _batch(gpt2, items)
    assert passes == [3]
    for item, result in zip(items, results):
        expected, got = saved(alone(gpt2, item)), saved(result)
        assert (got["logits"] - expected["logits"]).abs().max() <= 1e-4
        assert (got["h"] - expected["h"]).abs().max() <= 1e-4


def test_smollm2_padded_batch_equals_alone(smol):
    items = [request(SMOL_READ, prompt) for prompt in PADDED]
    with forward_passes(smol) as passes:
        results, _ = _batch(smol, items)
    assert passes == [3]
    for item, result in zip(items, results):
        expected, got = saved(alone(smol, item)), saved(result)
        assert got["h"].shape == expected["h"].shape
        assert (got["logits"] - expected["logits"]).abs().max() <= 1e-4
        # SmolLM2's residual stream reaches |h| ~ 1e2: the same 1e-4, relative to its scale
        scale = expected["h"].abs().max().clamp(min=1.0)
        assert (got["h"] - expected["h"]).abs().max() <= 1e-4 * scale


def test_an_edit_reaches_only_its_own_request(gpt2):
    zero = "model.transformer.h[0].output[:] = 0\nlogits = model.output.logits.save()\n"
    plain = "logits = model.output.logits.save()\n"
    items = [request(zero, PADDED[0]), request(plain, PADDED[1]), request(plain, PADDED[2])]
    results, _ = _batch(gpt2, items)
    for item, result in zip(items, results):
        assert (saved(result)["logits"] - saved(alone(gpt2, item))["logits"]).abs().max() <= 1e-4
    untouched = saved(alone(gpt2, request(plain, PADDED[0])))["logits"]
    assert (saved(results[0])["logits"] - untouched).abs().max() > 1e-2  # the edit did act


def test_names_and_printed_output_stay_with_their_request(gpt2):
    source = ("n = glassbox.save(marker)\nprint('I am', marker)\n"
              "h = model.transformer.h[0].output[:, -1].save()\n")
    items = [request(source, p, values={"marker": m}) for p, m in zip(PADDED, ["a", "b", "c"])]
    results, printed = _batch(gpt2, items)
    assert [saved(r)["n"] for r in results] == ["a", "b", "c"]
    assert printed == [["I am a\n"], ["I am b\n"], ["I am c\n"]]


# ---------------------------------------------------------------- one request's failure is its own


def test_an_error_in_one_request_fails_only_that_request(gpt2):
    bad = "h = model.transformer.h[1].output.save()\nx = 1 / 0\n"
    items = [request(GPT2_READ, PADDED[0]), request(bad, PADDED[1], first_line=30),
             request(GPT2_READ, PADDED[2])]
    results, _ = _batch(gpt2, items)
    error = results[1].error
    assert (error.type, error.lineno, error.line) == ("ZeroDivisionError", 31, "x = 1 / 0")
    for index in (0, 2):
        expected = saved(alone(gpt2, items[index]))
        assert (saved(results[index])["logits"] - expected["logits"]).abs().max() <= 1e-4


def test_a_refused_request_fails_before_the_pass_and_the_rest_share_it(gpt2):
    items = [request("h = model.__class__\n", PADDED[0]), request(GPT2_READ, PADDED[1]),
             request(GPT2_READ, PADDED[2])]
    with forward_passes(gpt2) as passes:
        results, _ = _batch(gpt2, items)
    assert results[0].status == "ERROR" and "__class__" in results[0].error.message
    assert passes == [2]


def test_a_request_over_a_limit_fails_alone_inside_the_batch(gpt2):
    big = "h = model.output.logits.save()\n"
    small = "h = model.transformer.h[0].output[:, -1].save()\n"
    items = [request(big, PADDED[0]), request(small, PADDED[1]), request(small, PADDED[2])]
    with forward_passes(gpt2) as passes:
        results, _ = _batch(gpt2, items, limits={"max_result_bytes": 100_000})
    error = results[0].error
    assert error.type == "MemoryError" and "result limit" in error.message
    assert passes == [3]
    assert saved(results[1])["h"].shape == (1, 64)


def test_a_padded_length_that_matches_a_model_size_is_padded_one_further(gpt2):
    # The tiny GPT-2 has 4 heads: a batch padded to 4 positions could not tell heads from
    # positions, so it is padded to 5, and every request still sees its own length.
    tokenizer = gpt2["m"].tokenizer
    two, four = "Hello there", "The cat sat down"
    assert [len(tokenizer(p)["input_ids"]) for p in (two, four)] == [2, 4]
    items = [request(GPT2_READ, two), request(GPT2_READ, four), request(GPT2_READ, four)]
    with forward_passes(gpt2) as passes:
        results, _ = _batch(gpt2, items)
    assert passes == [3]
    for item, result in zip(items, results):
        expected, got = saved(alone(gpt2, item)), saved(result)
        assert got["h"].shape == expected["h"].shape and got["logits"].shape == expected["logits"].shape
        assert (got["h"] - expected["h"]).abs().max() <= 1e-4
        assert (got["logits"] - expected["logits"]).abs().max() <= 1e-4


# ---------------------------------------------------------------- the worker forms batches


def _feeder(tmp_path, max_seconds: float):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    config = ServerConfig(models={"m": str(tiny_gpt2_path())}, max_seconds=max_seconds, torch_threads=1,
                          batch_window_ms=50.0, batch_wait_always=True)
    worker = Feeder(config, store)
    try:
        worker.start()
        yield worker
    finally:
        worker.stop()
        store.close()


@pytest.fixture
def handle(tmp_path):
    yield from _feeder(tmp_path, HANG)  # a limit only for a job that hangs


@pytest.fixture
def limited(tmp_path):
    # Long enough for a job's rerun alone on a busy machine; the endless job waits it out.
    yield from _feeder(tmp_path, patient(10.0))


def _submit(handle, source, prompt, owner="k"):
    sent = request(source, prompt)  # its batch key is decided at submit, as the API does
    job = handle.store.create_job(owner, "m", sent.frame(), batch_key=batch_key(sent))
    handle.store.mark_queued(job)
    return job


def _result(handle, job):
    info = wait_until(lambda: (lambda info: info.terminal and info)(handle.store.get(job)),
                      f"job {job} to finish", interval=0.02)
    return JobResult.read(handle.store.result(job)), info


def test_the_batch_window_is_waited_only_while_jobs_arrive_together(tmp_path):
    # A window longer than any wait here: a lone job that waited it would never finish in time.
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    config = ServerConfig(models={"m": str(tiny_gpt2_path())}, max_seconds=HANG, torch_threads=1,
                          batch_window_ms=4 * HANG * 1000)
    worker = Feeder(config, store)
    try:
        worker.start()
        for prompt in PADDED:  # one after another, each alone: none waits for company
            lone = _submit(worker, GPT2_READ, prompt)
            worker.wake()
            assert _result(worker, lone)[0].ok
        assert worker.batches == 0
    finally:
        worker.stop()
        store.close()


def test_jobs_queued_together_run_as_one_batch(handle):
    jobs = [_submit(handle, GPT2_READ, prompt) for prompt in PADDED]
    handle.wake()
    results = [_result(handle, job)[0] for job in jobs]
    assert handle.batches == 1 and all("batch_size" not in r.envelope() for r in results)
    local = {"m": LanguageModel(tiny_gpt2_path(), dispatch=True)}
    for prompt, result in zip(PADDED, results):
        expected = saved(alone(local, request(GPT2_READ, prompt)))
        assert (saved(result)["logits"] - expected["logits"]).abs().max() <= 1e-4


def test_a_batch_over_the_time_limit_reruns_alone_and_only_the_slow_job_fails(limited):
    handle = limited
    forever = "n = 0\nwhile True:\n    n = n + 1\n"
    jobs = [_submit(handle, GPT2_READ, PADDED[0]), _submit(handle, forever, PADDED[1]),
            _submit(handle, GPT2_READ, PADDED[2])]
    handle.wake()
    (slow, info) = _result(handle, jobs[1])
    assert handle.batches >= 1  # they did start as one batch
    assert info.status == "ERROR" and slow.error.type == "TimeoutError"
    for job in (jobs[0], jobs[2]):
        result, info = _result(handle, job)
        assert info.status == "COMPLETED" and result.status == "COMPLETED"  # re-run alone
