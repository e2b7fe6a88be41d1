"""What a job's output may make the server keep (workers/output.py), one limit at a time, without
a server: every kind of byte counts against max_result_bytes, what is cut says so and names the
setting, and the job keeps its status. (test_limits.py checks the same through a real server.)"""

from __future__ import annotations

import re

from glassbox.remote.job import JobResult, Status
from glassbox.remote.protocol import encode_values
from glassbox.server.config import ServerConfig
from glassbox.server.store import output_bytes
from glassbox.server.workers.output import bounded, cut


def _config(**limits) -> ServerConfig:
    return ServerConfig(models={}, **limits)


def _completed(text: str = "ok") -> JobResult:
    desc, blob = encode_values({"saved": {"s": text}, "result": None})
    return JobResult.completed(desc, [], blob)


def test_cut_keeps_the_start_and_says_how_much_was_cut_within_the_limit():
    assert cut("short", 100, " [{cut} cut]") == "short"
    text = cut("é" * 1000, 200, " [{cut} bytes cut]")
    assert len(text.encode()) <= 200 and text.startswith("é")
    kept = len(text.split(" [")[0].encode())
    assert text.endswith(f" [{2000 - kept:,} bytes cut]")


def test_a_long_error_message_is_cut_naming_max_error_bytes_and_the_job_stays_failed():
    failed = JobResult.failed("ValueError", "e" * 100_000, lineno=3, line="x" * 5000)
    output = bounded(failed, [], _config(max_error_bytes=1000))
    assert output.status == Status.ERROR and output.error["type"] == "ValueError"
    message = output.error["message"]
    assert len(message.encode()) <= 1000 and message.startswith("eee")
    assert re.search(r"[\d,]+ more bytes of this error message were cut: the server keeps at most "
                     r"1,000 bytes of a job's error message \(max_error_bytes\)", message), message
    assert len(output.error["line"]) < 600 and output.error["lineno"] == 3
    # What the owner fetches says the same.
    assert JobResult.read(output.result).error.message == message


def test_printed_output_over_max_log_bytes_is_cut_with_a_note():
    output = bounded(_completed(), ["x" * 10_000] * 100, _config(max_log_bytes=1000))
    assert output.status == Status.COMPLETED and output.error is None
    assert len(output.logs.encode()) <= 1000 + 1024
    assert output.logs.rstrip().endswith("bytes of a job's printed output (max_log_bytes)")


def test_printed_output_counts_against_max_result_bytes_with_the_result():
    result = _completed("v" * 20_000)
    output = bounded(result, ["p" * 100_000], _config(max_result_bytes=50_000, max_log_bytes=1024**2))
    assert output.status == Status.COMPLETED
    assert JobResult.read(output.result).decoded()["saved"]["s"] == "v" * 20_000
    assert output_bytes(output.result, output.error, output.logs) <= 50_000
    assert output.logs.startswith("ppp") and "(max_result_bytes)" in output.logs
    assert "result, error and printed output together" in output.logs


def test_a_result_over_max_result_bytes_fails_the_job_saying_so():
    output = bounded(_completed("v" * 60_000), ["printed\n"], _config(max_result_bytes=50_000))
    assert output.status == Status.ERROR and output.error["type"] == "MemoryError"
    assert "over this server's result limit of 50,000 bytes (max_result_bytes)" in output.error["message"]
    assert output.logs == "printed\n"  # the output that fits is kept


def test_a_cancelled_job_stays_cancelled():
    cancelled = JobResult.failed("Cancelled", "the job was cancelled by its owner")
    output = bounded(cancelled, ["a"], _config(), Status.CANCELLED)
    assert output.status == Status.CANCELLED and output.error["type"] == "Cancelled"
