"""A vLLM model's worker runs its jobs in itself (its engine's threads run already, so it is neither
forked per job nor confined whole), but it is confined all the same: a seccomp filter on every
thread (no programs, sockets or new processes) and Landlock on the thread that runs the jobs.

Against a real ``glassbox serve`` whose executor runs RAW Python (``tests/server/raw_executor.py``:
as if a job had escaped the sandbox) on SmolLM2 served by vLLM: the job cannot read or write files
outside Python's own, open a socket, run a program or start a process; the engine still serves,
and the server's log says what was applied.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from escapes import ESCAPE_NAMES, ESCAPES, WROTE
from glassbox.cli import start_server
from glassbox.remote import transport
from glassbox.server.workers.confine import available
from job_requests import job_request
from waiting import HANG, REQUEST

pytestmark = pytest.mark.skipif(
    not available()["landlock_abi"] or not available()["seccomp"],
    reason="the kernel lacks Landlock or seccomp")

HERE = Path(__file__).resolve().parent
RAW = HERE.parent / "server"  # raw_executor.py

ATTEMPTS = ESCAPES + """
with model.trace(prompt, temperature=0.0, max_tokens=2) as tracer:
    logits = model.logits.output.save()
out["tokens"] = tracer.result[0].token_ids
out["logits_shape"] = tuple(logits.shape)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2):
    root = tmp_path_factory.mktemp("vllm-raw")
    catalog = root / "catalog.toml"
    catalog.write_text(textwrap.dedent(f"""
        [server]
        torch_threads = 1
        vllm_python = "{sys.executable}"

        [models.smollm2-vllm]
        path = "{smollm2}"
        engine = "vllm"
        dtype = "float32"
        max_model_len = 256
    """))
    with pytest.MonkeyPatch.context() as patch:  # the server and its workers find raw_executor
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(RAW), os.environ.get("PYTHONPATH")])))
        running = start_server({}, state_dir=str(root / "state"), args=[
            "--models-file", str(catalog), "--executor", "raw_executor", "--max-batch", "1",
            "--crash-retries", "0"])
    try:
        yield running
    finally:
        running.stop()


def test_a_raw_job_in_the_vllm_worker_is_confined_and_the_engine_still_serves(server):
    key = server.create_key("mallory")
    request = job_request(ATTEMPTS, model="smollm2-vllm", inputs=["The Eiffel Tower is in"], first_line=1,
                          model_refs={}, modules={}, filename="<remote block>")
    job = transport.submit(server.url, key, request, REQUEST)
    for _ in transport.events(server.url, key, job, timeout=HANG):
        pass
    result = transport.result(server.url, key, job, timeout=REQUEST)
    assert result.ok, result.error
    out = result.decoded()["saved"]["out"]
    for name in ESCAPE_NAMES:
        assert out[name] != "allowed", (name, out)
    assert not os.path.exists(WROTE)
    assert len(out["tokens"]) == 2 and out["logits_shape"][0] == 1  # the engine went on serving
    log = server.output()
    assert "vLLM worker" in log and "confined: landlock ABI" in log and "no new processes" in log, log[-3000:]
