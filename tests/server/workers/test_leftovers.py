"""No job's process holds an earlier job's bytes: not in memory it is handed uninitialised, not
anywhere in its address space, not in its environment or its arguments.

Against a real ``glassbox serve`` whose executor runs RAW Python (``raw_executor``, test-only: as
if a job had escaped the sandbox). A first job carries a canary in its prompt, its source, its
printed output, its saved value and its error; the next job searches for it everywhere it can:
- every readable region of its own address space that holds an object, a heap block or a tensor
  (what a full escape can reach; ``/proc/self/maps`` is closed to it, so the regions are found by
  probing pages);
- memory handed out uninitialised, in every way the libraries offer: libc ``malloc`` of every
  size class, Python's ``PyObject_Malloc``, ``torch.empty`` and its relatives, ``numpy.empty``,
  ``torch.UntypedStorage``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from raw_jobs import leaves_nothing, raw_server, run_raw

from glassbox.offline import tiny_gpt2_path
from glassbox.server.workers.confine import available

pytestmark = pytest.mark.skipif(
    not available()["landlock_abi"] or not available()["seccomp"],
    reason="the kernel lacks Landlock or seccomp (isolation='process' refuses to start there)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    # Not a secret by its name, so the worker keeps it; a job must not see it.
    with raw_server(str(tmp_path_factory.mktemp("raw")),
                    env={"GLASSBOX_TEST_HARMLESS_SETTING": "operator-value"}) as running:
        yield running


def test_the_next_job_finds_nothing_of_the_last_one(server: tuple[str, str]) -> None:
    assert leaves_nothing(server)["found"] == []


def test_a_job_sees_no_server_settings_in_its_environment_or_arguments(server: tuple[str, str]) -> None:
    out = run_raw(server, """
import multiprocessing, os, sys
out["environ"] = dict(os.environ)
try:
    out["proc_environ"] = open("/proc/self/environ", "rb").read().decode(errors="replace")
except OSError as err:
    out["proc_environ"] = type(err).__name__
out["argv"] = list(sys.argv) + list(getattr(sys, "orig_argv", []))
process = multiprocessing.current_process()
out["process_args"] = repr(getattr(process, "_args", ())) + repr(getattr(process, "_kwargs", {}))
frame, seen = sys._getframe(), []
while frame is not None:   # every caller up the stack, into the worker's own functions
    seen.append(repr(frame.f_locals))
    frame = frame.f_back
out["frame_locals"] = seen
""", "a prompt")
    assert "error" not in out, out
    text = repr(out)
    assert "operator-value" not in text, "an operator's environment variable reached the job"
    model_folder = str(tiny_gpt2_path())
    assert model_folder not in out["process_args"], "the worker's arguments reached the job"
    assert not [scope for scope in out["frame_locals"] if model_folder in scope], out["frame_locals"]
    assert "PATH" in out["environ"]  # scrubbed, not emptied: a usable environment
