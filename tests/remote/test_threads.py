"""Remote equals local when the user limits threads: the server's --torch-threads 0 is torch's own
default (OMP_NUM_THREADS included), and a result computed with other thread counts says so.

CPU kernels split work by thread count, so a forward with 1 thread and one with 2 differ in the last
bits on SmolLM2: these tests run a client in a process of its own with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from glassbox.offline import smollm2_path

CLIENT = textwrap.dedent("""
    import os, sys, torch
    from glassbox import CONFIG, LanguageModel
    from glassbox.cli import start_server

    path = sys.argv[1]
    server = start_server({os.path.basename(path): path}, state_dir=sys.argv[2], args=sys.argv[3:])
    try:
        CONFIG.HOST, CONFIG.API_KEY, CONFIG.STATUS = server.url, server.create_key("threads"), True
        model = LanguageModel(path)
        with model.trace("The Eiffel Tower is in the city of", remote=True):
            remote = model.output.logits.save()
        with model.trace("The Eiffel Tower is in the city of"):
            local = model.output.logits.save()
        print("client threads", torch.get_num_threads())
        print("equal", torch.equal(remote, local), float((remote - local).abs().max()))
    finally:
        server.stop()
""")


def _client(tmp_path, *server_args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "client.py"  # a file: a remote block needs its source
    script.write_text(CLIENT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), str(smollm2_path()), str(tmp_path / "state"),
                           *server_args], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs for a thread count to differ")
def test_a_client_limited_to_one_thread_gets_the_local_numbers_by_default(tmp_path):
    run = _client(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "client threads 1" in run.stdout
    assert "equal True 0.0" in run.stdout, run.stdout
    assert "torch threads" not in run.stderr  # nothing to explain


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs for a thread count to differ")
def test_a_server_with_other_threads_says_so(tmp_path):
    run = _client(tmp_path, "--torch-threads", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert ("the server ran this job with 2 torch threads, this process uses 1" in run.stderr
            and "--torch-threads 1" in run.stderr), run.stderr[-3000:]
