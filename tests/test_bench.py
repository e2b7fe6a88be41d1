"""Every bench in bench/ runs in its ``--quick`` mode and prints its table (issue 23).

Each test runs ``python bench/NAME.py --quick`` in a subprocess (this interpreter, the repository
root as cwd) and checks that it exits 0 and prints its headings, its table's header and its rows:
that the bench still runs, never its numbers (this machine is shared and loaded). The timeouts only
stop a hang. ``bench/vllm.py`` needs vLLM: its test is tests/vllm/test_bench_vllm.py, run in
``.venv-vllm``. The benches that compare with nnsight or TransformerLens run them from
``.venv-peers`` (``bash bench/setup_peers.sh``); without it their rows say SKIPPED (or n/a) and the
table is still printed, which is what is checked then.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# as bench/_peer.py finds it: PEERS_PYTHON (a worktree's benches use the main checkout's), else .venv-peers
PEERS = Path(os.environ.get("PEERS_PYTHON") or ROOT / ".venv-peers" / "bin" / "python").exists()
TIMEOUT = 900  # seconds: a limit against hangs on a loaded 2-core machine, not a timing check
TESTED_ELSEWHERE = {"vllm": "tests/vllm/test_bench_vllm.py"}


def run_quick(name: str, python: str = sys.executable) -> list[str]:
    """``bench/NAME.py --quick``'s stdout, as lines; fails with its output's tail if it exits non-zero."""
    done = subprocess.run([python, f"bench/{name}.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, (f"bench/{name}.py --quick exited {done.returncode}\n--- stdout (tail)\n"
                                  f"{done.stdout[-4000:]}\n--- stderr (tail)\n{done.stderr[-4000:]}")
    return done.stdout.splitlines()


def row(lines: list[str], prefix: str) -> str:
    """The one printed line starting with ``prefix``."""
    found = [line for line in lines if line.startswith(prefix)]
    assert found, f"no line starts with {prefix!r} in:\n" + "\n".join(lines)
    return found[0]


def markdown_rows(lines: list[str], header: str) -> list[list[str]]:
    """The cells of the rows of the markdown table whose header line starts with ``header``."""
    start = lines.index(row(lines, header))
    assert set(lines[start + 1]) <= set("|-: "), f"no |---| line under {header!r}: {lines[start + 1]!r}"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert rows, f"the table under {header!r} has no rows"
    return rows


def test_every_bench_has_a_quick_test():
    benches = {p.stem for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_")}
    here = {name[len("test_"):-len("_quick")] for name in globals()
            if name.startswith("test_") and name.endswith("_quick")}
    assert benches == here | set(TESTED_ELSEWHERE)
    for path in TESTED_ELSEWHERE.values():
        assert (ROOT / path).is_file()


def test_catalog_quick():
    lines = run_quick("catalog")
    assert any("1 round(s)" in line for line in lines[:3])  # --quick: one round of the tiny models
    header = row(lines, "model")
    assert "catalog load" in header and "loaded est" in header and "peak est" in header
    for model in ("tiny GPT-2", "tiny Llama"):
        assert len(row(lines, model).split()) >= 12, model  # every column filled
    assert any(line.startswith("idle worker measured") for line in lines)


def test_extract_quick():
    lines = run_quick("extract")
    rows = {cells[0]: cells for cells in markdown_rows(lines, "| variant | tokens/s (median) | vs hooks |")}
    assert list(rows) == ["hooks", "extract", "remote", "nnsight", "TransformerLens"]
    assert rows["hooks"][2:] == ["1.000x", "(reference)"]
    for variant in ("extract", "remote"):  # the bench's own check: same activations as plain hooks
        assert rows[variant][3] == "same rows, same values", rows[variant]
    for peer in ("nnsight", "TransformerLens"):  # measured in .venv-peers, else SKIPPED and why
        assert rows[peer][3] == "same rows, same values" or rows[peer][1].startswith("SKIPPED"), rows[peer]
        if not PEERS:
            assert rows[peer][1].startswith("SKIPPED") and "is missing" in rows[peer][1]
    assert row(lines, "extract / hooks:")
    assert row(lines, "remote / local extract:")


def test_gpu_check_quick():
    lines = run_quick("gpu_check")
    assert row(lines, "dry run on the CPU")
    checks = [line for line in lines if line[:6] in ("PASS  ", "FAIL  ")]
    assert len(checks) >= 5 and all(line.startswith("PASS") for line in checks), checks
    for dtype in ("float32", "bfloat16"):
        assert "glassbox/hooks" in row(lines, f"INFO  timing torch.{dtype}")
    assert lines[-1] == "all checks passed"


def test_gpu_serve_check_quick():
    lines = run_quick("gpu_serve_check")
    assert "CPU (--quick)" in lines[0]
    assert row(lines, "PASS  bf16 on the CPU: remote equals local")
    assert not [line for line in lines if line.startswith("FAIL")]
    skipped = [line for line in lines if line.startswith("SKIP  ")]
    assert skipped and all("(needs CUDA)" in line for line in skipped)
    assert row(lines, "INFO  /v1/models")
    assert lines[-1] == "all checks passed"


def test_overhead_quick():
    lines = run_quick("overhead")
    assert row(lines, "## Summary") and row(lines, "## Targets")
    rows = markdown_rows(lines, "| model | case | raw µs | hooks µs | glassbox µs | nnsight µs |")
    cases = {(cells[0], cells[1]) for cells in rows}
    assert {("mlp12", "empty"), ("mlp12", "save_12"), ("gpt2-tiny30", "save_all")} <= cases, cases
    if not PEERS:
        assert all(cells[5] == "n/a" for cells in rows)
        assert any("nnsight not measured" in line for line in lines)


def test_overhead_before_after_compares_two_workers():
    """With --baseline, before/after is glassbox@REV's overhead over today's checkout timed in a
    worker like it (glassbox-worker), not over the in-process glassbox (which also holds hooks)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import _overhead_report as report
    finally:
        sys.path.remove(str(ROOT / "bench"))

    def stats(median: float, overhead: float | None = None) -> dict:
        out = {"median_us": median}
        if overhead is not None:
            out.update(overhead_us=overhead, overhead_ci95_lo_us=overhead, overhead_ci95_hi_us=overhead)
        return out

    label = "glassbox@old"
    gb = {"m": {"empty": {"raw": stats(100), "hooks": stats(100, 0.5), "glassbox": stats(120, 20)}}}
    base = {"results": {"m": {"empty": {"raw": stats(100), label: stats(130, 30)}}}}
    twin = {"results": {"m": {"empty": {"raw": stats(100), report.TWIN: stats(110, 10)}}}}
    rows = report.build_rows(gb, None, base, label, twin)
    assert rows[0]["before_over_after_overhead"][0] == 3.0  # 30 / the twin's 10, not / 20
    assert rows[0]["twin_overhead"][0] == 10
    assert report.build_rows(gb, None, base, label)[0]["before_over_after_overhead"][0] == 1.5
    access = report.per_access(rows, {"m": 12}, label)
    assert f"m/{report.TWIN}" in access


def test_profile_trace_quick():
    lines = run_quick("profile_trace")
    for side in ("glassbox", "hooks"):
        assert row(lines, f"### {side} mlp12 save_12: 100 calls")
    assert sum("ncalls  tottime" in line for line in lines) == 2


def test_remote_latency_quick():
    lines = run_quick("remote_latency")
    rows = markdown_rows(lines, "| model | isolation | local ms | remote ms |")
    assert [cells[:2] for cells in rows] == [["tiny-gpt2", "process"], ["tiny-gpt2", "none"]]
    for isolation in ("process", "none"):
        assert row(lines, f"tiny-gpt2, --isolation {isolation}: where a remote round trip goes")
    assert row(lines, "tiny-gpt2: run_job called in this process")


def test_split_cost_quick():
    lines = run_quick("split_cost")
    assert "(--quick)" in lines[0]
    cases = [line.split() for line in lines if line.startswith("gpt2") and " read" in line]
    assert len(cases) == 2 and all(float(c[-1]) > 0 for c in cases), lines  # 1 read, then every layer
    assert any("per boundary and request" in line for line in lines)


def test_shared_weights_quick():
    pytest.importorskip("ray")  # the [ray] extra
    lines = run_quick("shared_weights")
    assert "2 Ray replicas" in lines[0]
    rows = markdown_rows(lines, "| mode | server tree PSS (MiB) |")
    assert [r[0] for r in rows] == ["a private copy per replica", "--share-weights"]
    assert all(float(r[1]) > 0 for r in rows)


def test_smollm2_quick():
    lines = run_quick("smollm2")
    assert "--quick" in row(lines, "model: ")
    assert row(lines, "## Summary") and row(lines, "## Targets")
    rows = markdown_rows(lines, "| case | raw/HF ms | hooks ms | glassbox ms | nnsight ms |")
    assert [cells[0] for cells in rows] == ["save_all", "sweep_31", "sweep_31_batched", "generate_edit"]
    if not PEERS:
        assert all(cells[4] == "n/a" for cells in rows)
        assert any("nnsight not measured" in line for line in lines)


def test_throughput_quick():
    lines = run_quick("throughput")
    assert any("(--quick)" in line for line in lines[:3])
    assert "req/s" in row(lines, "configuration ")
    for mode in ("off", "on"):
        assert len(row(lines, f"local, batching {mode} ").split()) >= 10
        assert row(lines, f"correctness, local, batching {mode}:")
    assert row(lines, "local backend: throughput on/off")
