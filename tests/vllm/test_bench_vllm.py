"""bench/vllm.py runs in its ``--quick`` mode and prints its table (issue 23; the other benches are
in tests/test_bench.py).

Runs ``python bench/vllm.py --quick`` (this interpreter: ``.venv-vllm``'s) from the repository root
and checks the exit status, the heading, the table's header and its two rows, never their numbers.
The timeout only stops a hang.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 900  # seconds: a limit against hangs on a loaded 2-core machine, not a timing check


def test_vllm_quick():
    done = subprocess.run([sys.executable, "bench/vllm.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, (f"bench/vllm.py --quick exited {done.returncode}\n--- stdout (tail)\n"
                                  f"{done.stdout[-4000:]}\n--- stderr (tail)\n{done.stderr[-4000:]}")
    lines = done.stdout.splitlines()  # vLLM's own log lines come first; the bench's lines follow
    heading = [i for i, line in enumerate(lines) if line.startswith("tiny Llama (--quick) float32, layer 2")]
    assert len(heading) == 1, done.stdout
    header, rows = lines[heading[0] + 1], lines[heading[0] + 2:heading[0] + 4]
    assert header.split() == ["case", "vllm", "vllm+hook", "glassbox", "glassbox-hf", "glassbox/hook",
                              "glassbox/hf"]
    assert [r.split()[0] for r in rows] == ["steer", "save"], rows
    assert all(len(r.split()) == 7 for r in rows), rows
