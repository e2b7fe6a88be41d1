"""Warnings a block raises on the server come back as warnings, at the user's line, as a local run
raises them: through a real embedded server (``glassbox serve``, the default isolation: a plain
trace runs split, a trace with ``tracer.iter`` in a process of its own) and ``remote="local"``.

Only warnings located at the block's own lines travel (a library's, located at a server path, do
not), with server paths hidden, each location once, a bounded number; the client rebuilds only
Python's own categories by name.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from glassbox.cli import start_server
from glassbox.offline import tiny_gpt2_path
from glassbox.remote.job import MAX_WARNINGS, JobResult, JobWarning
from glassbox.server.jobs.job_warnings import captured


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tiny_gpt2_path()
    running = start_server({path.name: str(path)}, state_dir=str(tmp_path_factory.mktemp("warnings")),
                           args=["--torch-threads", str(torch.get_num_threads())])
    try:
        yield running
    finally:
        running.stop()


def seen(run) -> list[tuple[str, str, str, int]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [(w.category.__name__, str(w.message), w.filename, w.lineno) for w in caught]


def open_loop(model, remote):
    with model.trace("Hello", remote=remote) as tracer:
        for _ in tracer.iter[:]:
            model.transformer.h[0].output.save()


def copy_constructed(model, remote):
    with model.trace("Hello", remote=remote):
        h = model.transformer.h[0].output
        again = torch.tensor(h)  # torch warns: use clone().detach()
        again.save()


def deprecated_spelling(model, remote):
    with model.trace("Hello", remote=remote):
        model.iter  # nnsight's deprecated spelling: a DeprecationWarning at this line
        model.transformer.h[0].output.save()


@pytest.mark.parametrize("block", [open_loop, copy_constructed, deprecated_spelling],
                         ids=lambda block: block.__name__)
def test_remote_warns_what_local_warns_at_the_same_line(gpt2, remote, block):
    here = seen(lambda: block(gpt2, False))
    assert here and all(filename == __file__ for _, _, filename, _ in here), here
    assert seen(lambda: block(gpt2, True)) == here
    assert seen(lambda: block(gpt2, "local")) == here


def test_a_warning_before_an_error_still_arrives(gpt2, remote):
    def failing():
        with gpt2.trace("Hello", remote=True):
            h = gpt2.transformer.h[0].output
            torch.tensor(h)
            1 / 0

    with pytest.warns(UserWarning, match="clone"), pytest.raises(ZeroDivisionError):
        failing()


def test_warnings_can_be_errors_on_the_client(gpt2, remote):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with pytest.raises(DeprecationWarning, match=r"model\.iter is deprecated"):
            deprecated_spelling(gpt2, True)


def test_only_the_blocks_own_lines_travel_once_each_and_bounded():
    block = compile("import warnings\nfor i in range(100):\n    warnings.warn(f'w{i % 40}')\n"
                    "warnings.warn('twice')\nwarnings.warn('twice')\n"
                    "warnings.warn('at /srv/models/secret/config.json')\n", "<job 1>", "exec")
    library = compile("import warnings\nwarnings.warn('from a library')\n", "/srv/venv/lib/x.py", "exec")
    with captured("<job 1>") as found:
        exec(library, {})
        exec(block, {})
    assert all(w.message != "from a library" for w in found)
    assert len(found) == MAX_WARNINGS  # 40 distinct + 2 more, cut to the bound
    assert [w.message for w in found[:3]] == ["w0", "w1", "w2"] and found[0].lineno == 3
    with captured("<job 1>") as found:
        exec(compile("import warnings\nwarnings.warn('twice')\nwarnings.warn('twice')\n"
                     "warnings.warn('at /srv/models/secret/config.json')\n", "<job 1>", "exec"), {})
    assert [w.message for w in found] == ["twice", "twice", "at <server path>"]  # two lines, each once


def test_the_wire_keeps_warnings_and_rebuilds_only_pythons_categories():
    sent = JobResult.failed("ValueError", "bad").replace(warnings=(
        JobWarning("DeprecationWarning", "old", 3), JobWarning("SystemExit", "not a warning", 4),
        JobWarning("SomeLibraryWarning", "theirs", 5)))
    back = JobResult.read(sent.frame())
    assert back.warnings == sent.warnings
    got = seen(lambda: [w.issue("analysis.py") for w in back.warnings])
    assert got == [("DeprecationWarning", "old", "analysis.py", 3),
                   ("UserWarning", "SystemExit: not a warning", "analysis.py", 4),
                   ("UserWarning", "SomeLibraryWarning: theirs", "analysis.py", 5)]
    envelope = sent.envelope()
    envelope["warnings"] = [{"category": "UserWarning"}, "junk", *[{"message": "m", "lineno": 1}] * 100]
    read = JobResult.from_envelope(envelope)
    assert len(read.warnings) < MAX_WARNINGS and all(w.lineno == 1 for w in read.warnings)
    assert "warnings" not in JobResult.failed("ValueError", "bad").envelope()  # protocol 1's wire
