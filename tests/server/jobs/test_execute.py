"""run_job / after_job in process: the server's execution of one job, without HTTP."""

from __future__ import annotations

import pytest
import torch

from glassbox import LanguageModel
from glassbox.offline import tiny_gpt2_path
from glassbox.server.jobs.execute import error_reply, run_job
from glassbox.server.jobs.served import after_job
from glassbox.server.jobs.server_paths import without_server_paths
from job_requests import job_request, saved


@pytest.fixture(scope="module")
def models():
    return {"tiny": LanguageModel(tiny_gpt2_path(), dispatch=True)}


def _job(source: str, values: dict | None = None, model: str = "tiny", first_line: int = 10):
    return job_request(source, model=model, values=values, inputs=["Hello world"], filename="user.py",
                       first_line=first_line, returns=("h", "u"))


def _run(models, source, limits=None, **kw):
    printed: list[str] = []
    reply = run_job(models, _job(source, **kw), log=printed.append, limits=limits or {})
    return reply, saved(reply), printed


def test_saved_values_come_back_and_unsaved_ones_are_named(models):
    reply, values, printed = _run(models, "h = model.transformer.h[1].output.save()\n"
                                          "u = model.transformer.h[2].output\nprint('hi')\n")
    model = models["tiny"]
    with model.trace("Hello world"):
        local = model.transformer.h[1].output.save()
    assert torch.equal(values["h"], local) and reply.unsaved == ("u",) and printed == ["hi\n"]


def test_errors_name_type_line_and_code(models):
    reply, _, _ = _run(models, "h = model.transformer.h[1].output.save()\nx = 1 / 0\n", first_line=20)
    error = reply.error
    assert (error.type, error.lineno, error.line) == ("ZeroDivisionError", 21, "x = 1 / 0")


def test_unknown_model_and_result_limit(models):
    reply, _, _ = _run(models, "h = 1\n", model="nope")
    assert reply.error.type == "LookupError" and "tiny" in reply.error.message
    reply, _, _ = _run(models, "h = model.output.logits.save()\n", limits={"max_result_bytes": 1000})
    assert reply.error.type == "MemoryError" and "result limit" in reply.error.message


def test_after_job_restores_a_weight_changed_behind_the_sandbox(models):
    model = models["tiny"]
    _run(models, "h = model.transformer.h[0].output.save()\n")  # the guard's snapshot exists
    weight = model.transformer.h[0].mlp.c_fc.weight
    reference = weight.detach().clone()
    with torch.no_grad():
        weight.data.zero_()  # what a missed write path would do; _version does not move
    assert after_job(models) == {"tiny": ["transformer.h.0.mlp.c_fc.weight"]}
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, reference)
    assert after_job(models) == {}


# ---------------------------------------------------------------- every byte sent back counts


@pytest.mark.parametrize("source", [
    'h = glassbox.save("x" * 30_000_000)\n',                              # one 30 MB string
    'h = glassbox.save(["y" * 1_000_000 for i in range(30)])\n',          # a list of strings
])
def test_saved_strings_count_against_the_result_limit(models, source):
    reply, _, _ = _run(models, source, limits={"max_result_bytes": 20_000_000})
    error = reply.error
    assert error.type == "MemoryError", error
    assert "over this server's result limit of 20,000,000" in error.message
    assert "0 of tensors" in error.message  # all of it strings: nothing was in the blob
    reply, values, _ = _run(models, source, limits={"max_result_bytes": 40_000_000})
    assert reply.ok and len("".join(values["h"])) == 30_000_000


# ---------------------------------------------------------------- errors do not disclose server paths


def test_error_messages_name_no_server_path():
    reply = error_reply(OSError(2, "No such file or directory", "/srv/models/gpt2/model.safetensors"),
                        "<glassbox job 1>", None)
    assert reply.error.message == "[Errno 2] No such file or directory: '<server path>'"
    cases = {
        'File "/usr/lib/python3/site-packages/torch/nn/modules/module.py", line 5':
            'File "<server path>", line 5',
        "loaded from /root/.cache/glassbox/tiny gpt2 and file:///etc/passwd, at /pytorch/aten/x.cpp:12":
            "loaded from <server path> gpt2 and <server path>, at <server path>:12",
        '[Errno 13] Permission denied: "/home/op/my models/w.bin"':
            '[Errno 13] Permission denied: "<server path>"',
    }
    for message, expected in cases.items():
        assert without_server_paths(message) == expected
    kept = ["mat1 and mat2 shapes cannot be multiplied (2x64 and 3x3)", "1/2 of the rows, a/b and x /2",
            "unsupported operand type(s) for /: 'int' and 'str'", "see https://pytorch.org/docs/stable/x.html",
            "'(' was never closed (<glassbox job 7>, line 2)", "h[:, -1] // 2", "'/'", "~/.cache is relative"]
    for message in kept:
        assert without_server_paths(message) == message


def test_a_job_error_that_holds_a_server_path_comes_back_without_it(models):
    served_at = str(tiny_gpt2_path())  # where this server keeps the model; the job finds it out
    source = ("x = model.config.name_or_path\n"
              "raise FileNotFoundError(2, 'No such file or directory', x + '/weights.bin')\n")
    reply, _, _ = _run(models, source, first_line=20)
    error = reply.error
    assert error.message == "[Errno 2] No such file or directory: '<server path>'"
    assert served_at not in str(reply.envelope()) and (error.type, error.lineno) == ("FileNotFoundError", 21)
    # An ordinary message is left as it is, and so is the job's own file name.
    reply, _, _ = _run(models, "h = model.transformer.h[0].output\nh = h @ torch.ones(3, 3)\n")
    assert reply.error.message == "mat1 and mat2 shapes cannot be multiplied (2x64 and 3x3)"
    reply, _, _ = _run(models, "h = (\n")
    assert reply.error.type == "SyntaxError" and "(<glassbox job " in reply.error.message


def test_warm_up_runs_a_job_of_its_own_through_the_whole_path():
    """``warm_up`` (run where job processes are forked from, before any is) takes a fresh
    interpreter through a job's first-time work: the first trace mounts Tensor.save, the sandbox
    compiles, the model is left with no trace open, and a model it cannot run is skipped."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from glassbox.offline import tiny_gpt2_path\n"
        "from glassbox.server.jobs.executor import load_models, warm_up\n"
        "models = load_models({'m': str(tiny_gpt2_path())})\n"
        "models['plain'] = torch.nn.Linear(2, 2)\n"
        "before = hasattr(torch.Tensor, 'save')\n"
        "warm_up(models)\n"
        "from glassbox.server.jobs import execute\n"
        "print(before, hasattr(torch.Tensor, 'save'), models['m'].active is None, execute.next_filename())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[-2] == "False True True <glassbox job 2>"  # one job ran: the warm-up
