"""Two Ray replicas of a model on one machine hold one copy of its weights (``--share-weights``).

A real ``glassbox serve --backend ray`` (a private Ray instance, the default isolation) with two
replicas of the tiny GPT-2: the folder holds ONE weights file; two processes that neither forked
the other (the replicas' workers) map it, and each is charged about half of its resident pages
(PSS, /proc/PID/smaps); jobs through the client still equal a local run bit for bit. Once the
server is gone, nothing maps the file and a sweep removes it.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch

from glassbox import CONFIG, LanguageModel
from glassbox.cli import start_server
from glassbox.offline import tiny_gpt2_path
from glassbox.server.jobs.weights_file import NAME_GLOB, sweep
from glassbox.server.workers.confine import available
from waiting import Not, wait_until

pytest.importorskip("ray")  # the [ray] extra
pytestmark = pytest.mark.skipif(
    not available()["landlock_abi"] or not available()["seccomp"],
    reason="the kernel lacks Landlock or seccomp (isolation='process' refuses to start there)")

PROMPTS = ["The Eiffel Tower is in", "Hello", "A third prompt, longer than the others"]


def resident(pid: int, path: str) -> tuple[int, int] | None:
    """(Rss, Pss) in kB of ``path``'s mappings in process ``pid``; None if it maps none."""
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rss = pss = 0
    inside = found = False
    for line in lines:
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = line.endswith(path)
            found = found or inside
        elif inside and head[0] in ("Rss:", "Pss:"):
            if head[0] == "Rss:":
                rss += int(head[1])
            else:
                pss += int(head[1])
    return (rss, pss) if found else None


def mappers(path: str) -> dict[int, tuple[int, int]]:
    return {pid: usage for pid in psutil.pids() if (usage := resident(pid, path)) is not None}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    state = tmp_path_factory.mktemp("ray-shared")
    folder = state / "weights"
    name = tiny_gpt2_path().name  # what LanguageModel(path) asks a server for
    running = start_server({name: str(tiny_gpt2_path())}, state_dir=str(state), args=[
        "--backend", "ray", "--replicas", f"{name}=2", "--share-weights", str(folder),
        "--torch-threads", str(torch.get_num_threads()), "--max-batch", "1"])
    old = CONFIG.HOST, CONFIG.API_KEY
    CONFIG.HOST, CONFIG.API_KEY = running.url, running.create_key("alice")
    try:
        yield running, folder
    finally:
        CONFIG.HOST, CONFIG.API_KEY = old
        running.stop()


def test_two_replicas_map_one_copy_and_compute_as_local(served):
    _, folder = served
    files = list(folder.glob(NAME_GLOB))
    assert len(files) == 1, files
    path = str(files[0])

    local = LanguageModel(tiny_gpt2_path(), dispatch=True)
    for prompt in PROMPTS * 2:  # enough jobs that both replicas run some
        with local.trace(prompt):
            expected = local.output.logits.save()
        with local.trace(prompt, remote=True):
            got = local.output.logits.save()
        assert torch.equal(got, expected)

    def two_replicas() -> dict | Not:
        found = mappers(path)
        # a replica's worker maps it and forked the processes below it (zygote, host, jobs):
        # the roots are the processes whose parent does not map it
        roots = {pid: usage for pid, usage in found.items() if psutil.Process(pid).ppid() not in found}
        return roots if len(roots) == 2 and all(rss > 0 for rss, _ in roots.values()) else Not(found)

    roots = wait_until(two_replicas, "two replicas to map the one weights file")
    for rss, pss in roots.values():
        assert pss <= 0.6 * rss, roots  # its pages are shared, not a copy of its own


def test_the_file_goes_when_nothing_maps_it(served):
    running, folder = served
    (path,) = folder.glob(NAME_GLOB)
    running.stop()

    def removed() -> bool | Not:
        sweep(str(folder))
        return True if not path.exists() else Not(sorted(mappers(str(path))))

    wait_until(removed, "the weights file to be removed once every replica's processes have ended")
