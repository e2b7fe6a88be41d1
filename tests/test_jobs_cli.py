"""``glassbox jobs`` against a real server (tiny GPT-2): tables, logs, results as safetensors,
cancel, where the URL and key come from, and the exit codes scripts rely on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from glassbox.cli import free_port, main, start_server
from glassbox.jobs_cli import JOB_FAILED, NOT_FINISHED, OK, UNREACHABLE, USAGE
from glassbox.remote import transport
from job_requests import job_request, saved
from waiting import HANG, REQUEST, wait_until

pytest.importorskip("fastapi", reason="tested against a real server: pip install 'glassbox[server]'")

PRINTS = "for i in range(3):\n    print('line', i)\n"
SAVES = "h = glassbox_model.transformer.h[1].output.save()\necho = glassbox.save(marker)\n"
FOREVER = "print('started')\nn = 0\nwhile True:\n    n = n + 1\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator:
    from glassbox.offline import tiny_gpt2_path

    state = tmp_path_factory.mktemp("jobs-cli-server")
    running = start_server({"gpt2": str(tiny_gpt2_path())}, state_dir=str(state), args=[
        # FOREVER jobs end when the tests cancel them: no time limit races a busy machine
        "--max-seconds", str(HANG), "--torch-threads", "1", "--max-batch", "1"])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def alice(server) -> str:
    return server.create_key("alice")


@pytest.fixture(autouse=True)
def environment(server, alice, monkeypatch, tmp_path) -> None:
    # What a user's shell would hold; the config file is an empty one of this test's own.
    monkeypatch.setenv("GLASSBOX_HOST", server.url)
    monkeypatch.setenv("GLASSBOX_API_KEY", alice)
    monkeypatch.setenv("GLASSBOX_CONFIG", str(tmp_path / "no-config"))


def jobs(capsys, *args: str) -> tuple[int, str, str]:
    """``glassbox jobs ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["jobs", *args])
    out, err = capsys.readouterr()
    return code, out, err


def submit(server, key: str, source: str, marker: str = "m") -> str:
    request = job_request(source, values={"marker": marker}, inputs=["The Eiffel Tower is in"], model_refs={},
                          modules={"glassbox": "glassbox"}, returns=("echo", "h"), filename="<remote block>")
    return transport.submit(server.url, key, request, timeout=REQUEST)


def test_a_completed_job_listed_followed_and_saved_as_safetensors(server, alice, capsys, tmp_path):
    job = submit(server, alice, PRINTS + SAVES, "from-cli")
    code, out, _ = jobs(capsys, "logs", job, "--follow")
    assert code == OK and out == "line 0\nline 1\nline 2\n"
    code, out, _ = jobs(capsys, "list")
    header, *rows = out.splitlines()
    assert code == OK and header.split() == ["ID", "MODEL", "STATUS", "SUBMITTED", "RUN", "TIME", "ATTEMPTS"]
    [row] = [line for line in rows if line.startswith(job)]
    assert row.split()[1:3] == ["gpt2", "COMPLETED"]
    code, out, _ = jobs(capsys, "status", job)
    assert code == OK and "status     COMPLETED" in out and "output     21 characters" in out
    code, out, _ = jobs(capsys, "status", job, "--json")
    assert code == OK and json.loads(out)["status"] == "COMPLETED"
    assert jobs(capsys, "logs", job) == (OK, "line 0\nline 1\nline 2\n", "")
    code, out, _ = jobs(capsys, "result", job)
    assert code == OK
    assert "h     tensor  1x7x64  float32" in out and 'echo  str             "from-cli"' in out

    target = tmp_path / "values.safetensors"
    code, _, err = jobs(capsys, "result", job, "--out", str(target))
    assert code == OK and f"wrote 1 tensors to {target}" in err
    from safetensors import safe_open

    expected = saved(transport.result(server.url, alice, job))
    with safe_open(str(target), framework="pt") as file:
        assert list(file.keys()) == ["h"]
        assert torch.equal(file.get_tensor("h"), expected["h"])
        assert json.loads(file.metadata()["echo"]) == "from-cli"


def test_a_failed_job_exits_1_with_its_error(server, alice, capsys):
    job = submit(server, alice, "print('before')\nx = [1, 2][5]\n")
    code, out, err = jobs(capsys, "logs", job, "--follow")
    assert code == JOB_FAILED and out == "before\n" and "IndexError" in err and "line 3" in err
    code, out, _ = jobs(capsys, "status", job)
    assert code == JOB_FAILED and "ERROR" in out and "IndexError" in out
    code, _, err = jobs(capsys, "result", job)
    assert code == JOB_FAILED and "IndexError" in err


def test_a_running_job_has_no_result_yet_and_can_be_cancelled(server, alice, capsys):
    job = submit(server, alice, FOREVER)
    wait_until(lambda: transport.status(server.url, alice, job)["status"] == "RUNNING", f"job {job} to run")
    code, _, err = jobs(capsys, "result", job)
    assert code == NOT_FINISHED and "RUNNING" in err
    code, out, _ = jobs(capsys, "cancel", job)
    assert (code, out) == (OK, f"{job} CANCELLED\n")
    code, out, _ = jobs(capsys, "cancel", job)  # already cancelled: the same answer for scripts
    assert code == OK and "CANCELLED" in out
    assert jobs(capsys, "status", job)[0] == JOB_FAILED
    done = submit(server, alice, SAVES)
    assert jobs(capsys, "logs", done, "--follow")[0] == OK
    code, out, err = jobs(capsys, "cancel", done)
    assert code == JOB_FAILED and "COMPLETED" in out and "nothing to cancel" in err


def test_unknown_or_foreign_jobs_and_bad_keys_exit_2(server, alice, capsys, monkeypatch):
    job = submit(server, alice, SAVES)
    bob = server.create_key("bob")
    for args in (["status", "no-such-job"], ["status", job, "--key", bob], ["logs", job, "--key", bob],
                 ["result", job, "--key", bob], ["cancel", job, "--key", bob]):
        code, out, err = jobs(capsys, *args)
        assert code == USAGE and out == "" and "not found" in err, args
    code, _, err = jobs(capsys, "list", "--key", "gbx_wrong")
    assert code == USAGE and "API key rejected" in err
    code, out, _ = jobs(capsys, "list", "--key", bob)
    assert code == OK and job not in out
    monkeypatch.delenv("GLASSBOX_API_KEY")
    code, _, err = jobs(capsys, "list")
    assert code == USAGE and "no API key" in err
    with pytest.raises(SystemExit) as exited:
        main(["jobs", "frobnicate"])
    assert exited.value.code == USAGE


def test_an_unreachable_server_exits_3(capsys):
    code, _, err = jobs(capsys, "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == UNREACHABLE and "no glassbox server at" in err


def test_url_and_key_come_from_the_config_file_and_flags_win(server, alice, capsys, monkeypatch, tmp_path):
    job = submit(server, alice, SAVES)
    config = tmp_path / "config"
    config.write_text(f"host = {server.url}\napi_key = {alice}\n")
    monkeypatch.setenv("GLASSBOX_CONFIG", str(config))
    monkeypatch.delenv("GLASSBOX_HOST")
    monkeypatch.delenv("GLASSBOX_API_KEY")
    assert job in jobs(capsys, "list")[1]
    monkeypatch.setenv("GLASSBOX_API_KEY", "gbx_wrong")  # the environment wins over the file ...
    assert jobs(capsys, "list")[0] == USAGE
    assert job in jobs(capsys, "list", "--key", alice, "--url", server.url)[1]  # ... and flags over both


def test_the_console_command_exits_with_the_jobs_outcome(server, alice):
    # One real process, as a shell script runs it: the exit status is the job's outcome.
    job = submit(server, alice, SAVES)
    list(transport.events(server.url, alice, job, timeout=HANG))
    done = subprocess.run([sys.executable, "-m", "glassbox.cli", "jobs", "status", job, "--url", server.url,
                           "--key", alice], capture_output=True, text=True, timeout=HANG)
    assert done.returncode == OK and "COMPLETED" in done.stdout, done.stderr


def test_status_of_a_queued_job_shows_its_position_and_estimated_start(server, alice, capsys):
    # History for the estimate: a finished job of the model (whatever ran before this test).
    assert jobs(capsys, "logs", submit(server, alice, SAVES), "--follow")[0] == OK
    for _attempt in range(5):  # look while the blocker runs (it runs until cancelled)
        blocker = submit(server, alice, FOREVER)
        wait_until(lambda: transport.status(server.url, alice, blocker)["status"] != "QUEUED",  # noqa: B023
                   f"the blocker {blocker} to start")
        waiting = submit(server, alice, SAVES)
        code, out, _ = jobs(capsys, "status", waiting)
        answer = json.loads(jobs(capsys, "status", waiting, "--json")[1])
        transport.cancel(server.url, alice, blocker)
        assert jobs(capsys, "logs", waiting, "--follow")[0] == OK
        if "QUEUED" in out and answer["status"] == "QUEUED":
            break
    else:
        pytest.fail("the queued job was never seen queued")
    assert code == OK and "position   0 (jobs ahead in the queue)" in out
    estimate = answer["estimated_start_seconds"]
    assert isinstance(estimate, float) and estimate >= 0 and answer["note"] is None
    assert re.search(r"^starts in  ~\d+\.\d s \(estimated from recent run times\)$", out, re.M), out
    assert "note" not in out.split()  # nothing is done for a queued job: no note row
