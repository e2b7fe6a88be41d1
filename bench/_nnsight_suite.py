"""Run nnsight's own hub-free tests against glassbox (the work of bench/nnsight_suite.sh).

    python bench/_nnsight_suite.py SDIST WORKDIR [pytest args...]

Unpacks nnsight's sdist (a .tar.gz that pip downloaded) into WORKDIR, copies its
tests/conftest.py and the five test files that need no Hugging Face hub download
(they wrap small torch modules they build themselves) into WORKDIR/tests with one
plain name map applied to every line, ``nnsight`` -> ``glassbox`` as a whole word (imports,
``nnsight.save``, the code strings some tests run in a subprocess; ``NNsight`` keeps its
name, as glassbox exports it), runs pytest on them with this Python, and prints the counts
and the failures by name, each with its exception's first line. No test is patched: the
files run as nnsight ships them, with the new name. Nothing from nnsight is kept in this
repository; the sdist is fetched at run time.

Exit status: 0 when at least --min-pass tests passed (default 100, issue 22), else 1.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

# nnsight 0.8.1's five test files (192 tests) that load no model from the hub and trace
# small torch modules they build themselves through NNsight / Envoy. Of its other files, most
# load a hub model (the `gpt2` fixture or a repo id); the rest test parts glassbox does not
# have (nnsight's config file, login, remote backend, quantization, tensor parallelism, util)
HUB_FREE = (
    "test_backward.py",
    "test_interleaving.py",
    "test_multiple_wrappers.py",
    "test_saving.py",
    "test_tracing.py",
)
NAME_MAP = (re.compile(r"\bnnsight\b"), "glassbox")


def unpack(sdist: Path, work: Path) -> Path:
    """The sdist's tests/ folder, unpacked under work/src."""
    dest = work / "src"
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/tests/" in f"/{m.name}" and (m.isfile() or m.isdir())]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
        tar.extractall(dest, members=members, **safe)
    found = sorted(dest.glob("*/tests"))
    if not found:
        sys.exit(f"no tests/ folder in {sdist.name}")
    return found[0]


def mapped_copy(tests: Path, work: Path) -> Path:
    """work/tests: conftest.py and the hub-free files with the name map applied, nothing else."""
    out = work / "tests"
    out.mkdir(parents=True, exist_ok=True)
    pattern, new = NAME_MAP
    replaced = 0
    for name in ("conftest.py", *HUB_FREE):
        src = tests / name
        if not src.exists():
            sys.exit(f"{name} is not in the sdist's tests/ (another nnsight version?)")
        text, n = pattern.subn(new, src.read_text())
        replaced += n
        (out / name).write_text(text)
    # an ini file of its own pins pytest's rootdir here, so no outer project's settings apply
    (work / "pytest.ini").write_text("[pytest]\n")
    print(f"name map nnsight -> glassbox: {replaced} replacements in conftest.py + {len(HUB_FREE)} files")
    return out


def first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        line = line.strip()
        if line:
            return line[:160]
    return ""


def defined_tests(path: Path) -> list[str]:
    """The test ids a file defines (module-level test_* and Test*.test_*; none is parametrized),
    for a file that pytest could not import and so reports as one collection error."""
    ids = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            ids.append(f"{path.name}::{node.name}")
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            ids += [f"{path.name}::{node.name}::{item.name}" for item in node.body
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and item.name.startswith("test")]
    return ids


def error_line(node: ET.Element) -> str:
    """The exception's own line ("E   ModuleNotFoundError: ...") if the report has one, else its message."""
    for line in (node.text or "").splitlines():
        if line.startswith("E  "):
            return line[1:].strip()[:160]
    return first_line(node.get("message")) or first_line(node.text)


def results(xml: Path, tests: Path) -> list[tuple[str, str, str]]:
    """(outcome, test id, reason) per test in pytest's junit xml; a file that failed to import
    counts each test it defines as an error with the import's exception."""
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        if not case.get("classname") and case.get("file"):  # a collection error: the file did not import
            node = case.find("error")
            if node is None:
                node = case.find("failure")
            reason = "not collected: " + (error_line(node) if node is not None else "collection error")
            rows += [("error", test, reason) for test in defined_tests(tests / Path(case.get("file")).name)]
            continue
        # classname is "tests.test_x" or "tests.test_x.TestClass"; file is "tests/test_x.py"
        parts = case.get("classname", "").split(".")
        module = next((i for i, part in enumerate(parts) if part.startswith("test_")), len(parts) - 1)
        test = "::".join([f"{parts[module]}.py", *parts[module + 1:], case.get("name", "")])
        outcome, reason = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                if tag == "skipped" and node.get("type") == "pytest.xfail":
                    outcome = "xfailed"  # nnsight marks it as a known failure of its own
                reason = error_line(node) if tag != "skipped" else first_line(node.get("message"))
                break
        rows.append((outcome, test, reason))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sdist", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--min-pass", type=int, default=100)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds for the whole pytest run")
    ap.add_argument("--kept", action="store_true", help="WORK is kept afterwards: name its log")
    args, pytest_args = ap.parse_known_args()

    work = args.work.resolve()
    tests = mapped_copy(unpack(args.sdist, work), work)
    xml = work / "results.xml"
    # a file that fails to import must not stop the others (its tests count as errors)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
           f"--junitxml={xml}", "--tb=short", "-rN", "--continue-on-collection-errors",
           *pytest_args, *(str(tests / f) for f in HUB_FREE)]
    print("running:", " ".join(cmd[1:3]), "...", " ".join(HUB_FREE), flush=True)
    start = time.monotonic()
    log = work / "pytest.log"
    with log.open("w") as fh:
        try:
            proc = subprocess.run(cmd, cwd=work, stdout=fh, stderr=subprocess.STDOUT, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"pytest ran past {args.timeout} s; see {log}")
            return 1
    took = time.monotonic() - start
    if not xml.exists():
        print(log.read_text()[-4000:])
        print(f"pytest wrote no results (exit {proc.returncode})")
        return 1

    rows = results(xml, tests)
    counts = Counter(outcome for outcome, _, _ in rows)
    by_file: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for outcome, test, reason in rows:
        if outcome != "passed":
            by_file[test.split("::", 1)[0]].append((outcome, test.split("::", 1)[1], reason))
    for name in HUB_FREE:
        file_rows = [r for r in rows if r[1].startswith(name + "::")]
        passed = sum(1 for r in file_rows if r[0] == "passed")
        print(f"\n== {name}: {passed}/{len(file_rows)} passed")
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)  # same outcome and reason: one entry
        for outcome, test, reason in by_file.get(name, []):
            groups[(outcome, reason)].append(test)
        for (outcome, reason), tests_ in groups.items():
            many = f" x{len(tests_)}" if len(tests_) > 1 else ""
            print(f"  {outcome.upper()}{many}: {reason}")
            for test in tests_:
                print(f"      {test}")
    total = len(rows)
    print(f"\nnnsight {args.sdist.name.removeprefix('nnsight-').removesuffix('.tar.gz')} hub-free suite on "
          f"glassbox, {took:.0f} s" + (f" (log: {log})" if args.kept else ""))
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, "
          f"{counts['error']} errors, {counts['xfailed']} xfailed, {total} tests")
    return 0 if counts["passed"] >= args.min_pass else 1


if __name__ == "__main__":
    sys.exit(main())
