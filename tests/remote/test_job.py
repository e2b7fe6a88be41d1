"""The typed job contract (glassbox/remote/job.py): one request / result / status type, the wire unchanged."""

from __future__ import annotations

import base64
import json

import pytest
import torch

import glassbox
from glassbox import LanguageModel
from glassbox.offline import tiny_gpt2_path
from glassbox.remote.executor import run_locally
from glassbox.remote.job import FINAL, JobError, JobRequest, JobResult, Status
from glassbox.remote.protocol import ProtocolError
from job_requests import job_request, saved

# A request exactly as the glassbox client of protocol 1 framed it before the job had a type
# (made by the client at commit 2b17bb1 for the block in test_an_old_clients_request_still_runs).
FROZEN_REQUEST = base64.b64decode(
    "AAAAAAAAAsF7InByb3RvY29sIjoxLCJnbGFzc2JveCI6IjAuMS4wIiwia2luZCI6ImpvYiIsIm1vZGVsIjoidGlueS1ncHQyLWw0"
    "LWQ2NC1oNC1zMCIsIm1ldGhvZCI6InRyYWNlIiwic291cmNlIjoiaCA9IG1vZGVsLnRyYW5zZm9ybWVyLmhbMV0ub3V0cHV0LnNh"
    "dmUoKVxubW9kZWwudHJhbnNmb3JtZXIuaFsyXS5vdXRwdXRbOl0gPSBoICogc2NhbGVbMF1cbm5hbWVzLmFwcGVuZChcImNcIilc"
    "bmxvZ2l0cyA9IG1vZGVsLm91dHB1dC5sb2dpdHNbOiwgLTFdLnNhdmUoKVxuIiwiZmlsZW5hbWUiOiIvdG1wL21rcmVxLnB5Iiwi"
    "Zmlyc3RfbGluZSI6MTYsInRyYWNlcl9uYW1lIjoidHJhY2VyIiwibW9kZWxfcmVmcyI6eyJtb2RlbCI6IiJ9LCJtb2R1bGVzIjp7"
    "fSwidmFsdWVzIjp7InZhbHVlcyI6eyJ2YXJzIjp7InQiOiJkaWN0IiwidiI6eyJuYW1lcyI6eyJ0IjoibGlzdCIsInYiOlt7InQi"
    "OiJzdHIiLCJ2IjoiYSJ9LHsidCI6InN0ciIsInYiOiJiIn1dfSwic2NhbGUiOnsidCI6InRlbnNvciIsImR0eXBlIjoiZmxvYXQz"
    "MiIsInNoYXBlIjpbNF0sImtleSI6InQwIn19fSwiaW5wdXRzIjp7InQiOiJsaXN0IiwidiI6W3sidCI6InN0ciIsInYiOiJIZWxs"
    "byB3b3JsZCJ9XX0sImNhbGwiOnsidCI6ImRpY3QiLCJ2Ijp7fX19fSwid3JpdGVzIjpbImgiLCJsb2dpdHMiXSwicmV0dXJucyI6"
    "WyJoIiwibG9naXRzIiwibmFtZXMiXSwidGltZW91dCI6bnVsbH04AAAAAAAAAHsidDAiOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6"
    "WzRdLCJkYXRhX29mZnNldHMiOlswLDE2XX19AAAAAAAAgD8AAABAAABAQA=="
)


@pytest.fixture(scope="module")
def tiny() -> LanguageModel:
    return LanguageModel(tiny_gpt2_path())


def test_an_old_clients_request_reads_and_frames_to_the_same_bytes():
    request = JobRequest.read(FROZEN_REQUEST)
    assert (request.model, request.method) == ("tiny-gpt2-l4-d64-h4-s0", "trace")
    assert request.tracer_name == "tracer"
    assert request.writes == ("h", "logits") and request.returns == ("h", "logits", "names")
    assert request.model_refs == {"model": ""} and request.first_line == 16 and request.timeout is None
    assert request.frame() == FROZEN_REQUEST  # the JSON on the wire did not change
    values = request.decoded()
    assert values.inputs == ["Hello world"] and values.call == {} and values.vars["names"] == ["a", "b"]
    assert torch.equal(values.vars["scale"], torch.arange(4.0))
    assert (request.input_count, request.call_is_empty, request.call_is_dict) == (1, True, True)


def test_an_old_clients_request_still_runs(tiny):
    result = run_locally(tiny, JobRequest.read(FROZEN_REQUEST), log=print)
    scale = torch.arange(4.0)
    with tiny.trace("Hello world"):
        h = tiny.transformer.h[1].output.save()
        tiny.transformer.h[2].output[:] = h * scale[0]
        logits = tiny.output.logits[:, -1].save()
    values = saved(result)
    assert torch.equal(values["h"], h) and torch.equal(values["logits"], logits)
    assert "names" not in values  # a container comes back only when it holds saved values


@pytest.mark.parametrize(("change", "complaint"), [
    ({"model": ""}, "'model' must name a served model"),
    ({"method": "exec"}, "unknown method 'exec'"),
    ({"tracer_name": "__class__"}, "bad tracer name"),
    ({"tracer_name": "a b"}, "bad tracer name"),
    ({"first_line": "2"}, "'first_line' must be a positive int"),
    ({"writes": "h"}, "'writes' must be a list of names"),
    ({"model_refs": {"m": 3}}, "'model_refs' must map names to names"),
    ({"values": {"vars": {}}}, "'values' must be the description"),
    ({"timeout": "soon"}, "'timeout' must be a number"),
])
def test_a_malformed_request_is_refused_saying_what_is_wrong(change, complaint):
    envelope = {**JobRequest.read(FROZEN_REQUEST).envelope(), **change}
    with pytest.raises(ProtocolError, match=complaint):
        JobRequest.from_envelope(envelope)
    envelope.pop("source")
    with pytest.raises(ProtocolError, match="missing 'source'|" + complaint):
        JobRequest.from_envelope(envelope)


def test_a_request_is_frozen():
    request = job_request("h = model.output.save()\n")
    with pytest.raises(AttributeError):
        request.source = "import os"  # type: ignore[misc]


def test_status_is_one_enum_with_one_final_set():
    assert Status.QUEUED == "QUEUED" and f"{Status.ERROR}" == "ERROR" and str(Status.RUNNING) == "RUNNING"
    assert json.dumps({"status": Status.CANCELLED}) == '{"status": "CANCELLED"}'
    assert FINAL == {Status.COMPLETED, Status.ERROR, Status.CANCELLED} and "ERROR" in FINAL
    assert Status.RUNNING not in FINAL and Status("QUEUED") is Status.QUEUED


def test_a_result_round_trips_and_its_error_is_the_exception_it_was():
    failed = JobResult.failed("OutOfOrderError", "model.h.1 after model.h.2", lineno=7, line="x = 1")
    again = JobResult.read(failed.frame())
    assert again == failed and not again.ok and again.status is Status.ERROR
    with pytest.raises(glassbox.OutOfOrderError, match='line 7: x = 1'):
        again.raise_if_failed("user.py")
    with pytest.raises(ZeroDivisionError):
        JobResult.failed("ZeroDivisionError", "division by zero").raise_if_failed()
    with pytest.raises(glassbox.RemoteError, match="WorkerCrashed: died"):
        JobResult.failed("WorkerCrashed", "died").raise_if_failed()
    assert JobError.from_wire({"type": 3, "lineno": "x"}) == JobError("3", "", None, None)


def test_a_malformed_result_is_refused():
    envelope = JobResult.failed("X", "y").envelope()
    with pytest.raises(ProtocolError, match="status 'DONE'"):
        JobResult.from_envelope({**envelope, "status": "DONE"})
    with pytest.raises(ProtocolError, match="has no values"):
        JobResult.from_envelope({**envelope, "status": "COMPLETED"})
