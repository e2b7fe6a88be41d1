"""tests/waiting.py, the suite's one way to wait: on the condition, with a limit that only stops a
hang and says what it waited for; at once, with the output, when the watched process died."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from waiting import Not, ProcessDied, cpu_hogs, wait_until


def test_it_returns_the_first_truthy_value_as_soon_as_there_is_one():
    values = iter([None, 0, Not({"status": "QUEUED"}), {"status": "DONE"}])
    assert wait_until(lambda: next(values), "the job", interval=0) == {"status": "DONE"}


def test_giving_up_says_what_it_waited_for_and_what_it_saw_last():
    with pytest.raises(AssertionError, match=r"gave up waiting for the job to finish after \d+ s .*"
                                             r"not yet: \{'status': 'QUEUED'\}"):
        wait_until(lambda: Not({"status": "QUEUED"}), "the job to finish", limit=0.2, interval=0.01)


def test_the_exceptions_to_retry_are_not_yet_and_others_propagate():
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset while it restarts")
        return "answered"

    assert wait_until(flaky, "an answer", retry=(ConnectionResetError,), interval=0) == "answered"

    def reset() -> None:
        raise ConnectionResetError("reset while it restarts")

    with pytest.raises(AssertionError, match="the last attempt raised ConnectionResetError: reset"):
        wait_until(reset, "an answer", retry=(ConnectionResetError,), limit=0.1, interval=0.01)
    with pytest.raises(ValueError):
        wait_until(lambda: int("x"), "a number", retry=(ConnectionResetError,))


def test_a_watched_process_that_dies_ends_the_wait_at_once_with_its_output():
    process = subprocess.Popen([sys.executable, "-c", "print('it broke')"])
    process.wait()
    started = time.monotonic()
    with pytest.raises(ProcessDied, match=r"(?s)gave up waiting for the server: the process .* exited "
                                          r"with 0 first:\n.*it broke"):
        wait_until(lambda: False, "the server", process=process, output=lambda: "log: it broke")
    assert time.monotonic() - started < 60  # not the limit: at once


def test_cpu_hogs_spin_until_the_block_ends():
    with cpu_hogs(2) as hogs:
        assert [hog.poll() for hog in hogs] == [None, None]
    assert all(hog.poll() is not None for hog in hogs)
