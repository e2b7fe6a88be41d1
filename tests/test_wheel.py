"""glassbox as an operator gets it: a wheel and an sdist built with ``python -m build`` (the wheel from
the sdist, so the sdist holds what a build needs), the wheel installed into a fresh virtualenv outside
the checkout, and everything below run from a working directory outside it too: the README tour, ``glassbox
serve`` with a catalog (health, the dashboard page, a remote trace equal to a local one), ``glassbox
keys`` and ``glassbox jobs list``.

Offline and fast: the build runs without isolation (setuptools from this environment, nothing
downloaded), and the new virtualenv sees this environment's installed dependencies (torch,
transformers, fastapi, ...) through a ``.pth`` line naming its site-packages. A plain path line adds
the directory without running the ``.pth`` files inside it, so this environment's editable glassbox
(``src/`` of the checkout) stays out; every run asserts that ``glassbox`` is the installed wheel.

The tour runs the README blocks that need no SmolLM2 (the plain ``nn.Module`` tour, the vision model,
``extract`` on tiny GPT-2); ``GLASSBOX_WHEEL_FULL_TOUR=1`` runs every block, as tests/test_readme.py does
(about two minutes more: SmolLM2, generation, a server of its own).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.doc_blocks import python_blocks

pytest.importorskip("build", reason="builds the wheel with `python -m build`: pip install -e '.[dev]'")
pytest.importorskip("fastapi", reason="serves from the installed wheel: pip install -e '.[server]'")

CHECKOUT = Path(__file__).resolve().parent.parent
README = CHECKOUT / "README.md"
# Seconds, only against hangs (a loaded CI machine is slow): the wait ends as soon as the server
# answers, or exits.
SERVER_START = 900.0


@dataclass
class Installed:
    root: Path  # the temporary directory everything lives in
    sdist: Path
    wheel: Path
    python: Path  # the new virtualenv's interpreter
    glassbox: Path  # its console script
    site_packages: Path
    work: Path  # the working directory of every command (outside the checkout)
    env: dict[str, str]

    def run(self, *command: str | Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(part) for part in command], cwd=self.work, env={**self.env, **env},
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _source_tree(to: Path) -> None:
    """What the checkout holds (tracked files and untracked ones git does not ignore), copied: the build
    writes its egg-info beside the sources, and that should not happen in the shared checkout."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=CHECKOUT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = CHECKOUT / name
        if source.is_file():  # a tracked file deleted in the working tree is listed too
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, to / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    assert CHECKOUT not in root.parents
    source, dist, venv, work = root / "source", root / "dist", root / "venv", root / "work"
    for folder in (source, work, root / "tmp"):
        folder.mkdir()
    _source_tree(source)
    # Neither --sdist nor --wheel: build makes the sdist, then the wheel from the unpacked sdist.
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist),
                            str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [sdist], [wheel] = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(subprocess.run([str(python), "-c", where], capture_output=True, text=True,
                                        check=True).stdout.strip())
    # Installed before the dependencies are visible, so pip sees no other glassbox (this environment's
    # editable one) to replace.
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                          "--no-index", "--disable-pip-version-check", str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site_packages / "zz_glassbox_test_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))

    env = {name: value for name, value in os.environ.items()
           if name not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "GLASSBOX_HOST", "GLASSBOX_API_KEY",
                           "GLASSBOX_STATE_DIR", "GLASSBOX_DB_URL"}}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               GLASSBOX_CONFIG=str(root / "no-config"), TMPDIR=str(root / "tmp"),
               OMP_NUM_THREADS="1")  # the server's worker and the client compute alike (bit-equal logits)
    return Installed(root, sdist, wheel, python, venv / "bin" / "glassbox", site_packages, work, env)


def _package_files(names: list[str], prefix: str) -> set[str]:
    return {name[len(prefix):] for name in names if name.startswith(prefix) and name.endswith(".py")}


def test_the_sdist_and_the_wheel_hold_the_whole_package(installed):
    src = CHECKOUT / "src"
    checkout = {str(path.relative_to(src)) for path in (src / "glassbox").rglob("*.py")
                if "__pycache__" not in path.parts}
    with tarfile.open(installed.sdist) as sdist:
        names = sdist.getnames()
    top = names[0].split("/")[0]
    for needed in ("PKG-INFO", "pyproject.toml", "README.md", "src/glassbox/__init__.py",
                   "src/glassbox/server/api/dashboard_page.py"):
        assert f"{top}/{needed}" in names, f"the sdist lacks {needed}"
    # Every module of the package: one without an __init__.py beside it would be left out silently.
    assert _package_files(names, f"{top}/src/") == checkout

    wheel = zipfile.ZipFile(installed.wheel)
    names = wheel.namelist()
    assert _package_files(names, "") == checkout
    assert not [name for name in names if name.split("/")[0] not in {"glassbox", f"{top}.dist-info"}], names
    metadata = wheel.read(f"{top}.dist-info/METADATA").decode()
    for extra in ("hf", "server", "ray", "postgres", "plot", "vllm"):
        assert f"Provides-Extra: {extra}" in metadata
    assert "glassbox = glassbox.cli:main" in wheel.read(f"{top}.dist-info/entry_points.txt").decode()


def test_glassbox_is_the_installed_wheel_not_the_checkout(installed):
    probe = installed.run(installed.python, "-c", textwrap.dedent("""
        import json, os, sys
        import glassbox
        from glassbox.server.config import ServerConfig
        print(json.dumps({"file": glassbox.__file__, "path": sys.path, "cwd": os.getcwd(),
                          "vllm_python": ServerConfig().vllm_interpreter(), "executable": sys.executable}))
    """))
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert Path(seen["file"]) == installed.site_packages / "glassbox" / "__init__.py"
    src = CHECKOUT / "src"
    assert not [path for path in seen["path"] if path and Path(path).resolve().is_relative_to(src)]
    assert not Path(seen["cwd"]).resolve().is_relative_to(CHECKOUT)
    # No checkout to find a .venv-vllm beside: vLLM models run on this interpreter unless told otherwise.
    assert seen["vllm_python"] == seen["executable"]
    usage = installed.run(installed.glassbox, "--help")  # the console script the wheel installed
    assert usage.returncode == 0 and "serve" in usage.stdout, usage.stderr


def _tour_blocks(full: bool) -> list[tuple[int, str]]:
    """The README's python blocks to run: all, or those that need no SmolLM2 (neither naming it nor
    reading a name that a block which does defined)."""
    blocks = python_blocks(README)
    if full:
        return list(enumerate(blocks))
    heavy: set[str] = set()
    chosen = []
    for number, source in enumerate(blocks):
        tree = ast.parse(source)
        nodes = list(ast.walk(tree))
        names = [node for node in nodes if isinstance(node, ast.Name)]
        read = {node.id for node in names if isinstance(node.ctx, ast.Load)}
        defined = {node.id for node in names if not isinstance(node.ctx, ast.Load)}
        defined |= {(alias.asname or alias.name).split(".")[0] for node in nodes
                    if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names}
        defined |= {node.name for node in nodes if isinstance(node, ast.FunctionDef | ast.ClassDef)}
        if "smollm2" in source or (read - defined) & heavy:
            heavy |= defined
        else:
            heavy -= defined
            chosen.append((number, source))
    return chosen


RUN_BLOCKS = """
import json, linecache, sys
namespace = {"__name__": "readme"}
for number, source in json.load(open(sys.argv[1])):
    filename = f"<README.md block {number}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)
print("the tour ran", len(json.load(open(sys.argv[1]))), "blocks")
"""


def test_the_readme_tour_runs_from_the_install(installed):
    full = os.environ.get("GLASSBOX_WHEEL_FULL_TOUR", "") not in ("", "0")
    blocks = _tour_blocks(full)
    assert len(blocks) >= (7 if full else 5), [number for number, _ in blocks]
    (installed.root / "blocks.json").write_text(json.dumps(blocks))
    (installed.root / "run_blocks.py").write_text(RUN_BLOCKS)
    tour = installed.run(installed.python, installed.root / "run_blocks.py", installed.root / "blocks.json",
                         timeout=900 if full else 300)
    assert tour.returncode == 0, tour.stdout[-3000:] + tour.stderr[-5000:]
    assert "Sequential" in tour.stdout and f"the tour ran {len(blocks)} blocks" in tour.stdout


REMOTE_TRACE = """
import sys
import torch
import glassbox
from glassbox import LanguageModel
from glassbox.offline import tiny_gpt2_path

assert glassbox.__file__.startswith(sys.argv[1]), glassbox.__file__
remote = LanguageModel("tiny")                  # config and tokenizer from the server
with remote.trace("The Eiffel Tower is in", remote=True, timeout=120):
    remote.transformer.h[1].output[:, -1] *= 2
    hidden = remote.transformer.h[2].output.save()
    remote_logits = remote.output.save()
local = LanguageModel(tiny_gpt2_path())
with local.trace("The Eiffel Tower is in"):
    local.transformer.h[1].output[:, -1] *= 2
    local_logits = local.output.save()
assert torch.equal(remote_logits.logits, local_logits.logits)
print("remote equals local", tuple(hidden.shape))
"""


@pytest.fixture(scope="module")
def served(installed) -> Iterator[tuple[str, str]]:
    """``glassbox serve --models-file`` from the install; yields (its URL, the state directory)."""
    import httpx

    from glassbox.cli import RunningServer, free_port
    from glassbox.offline import tiny_gpt2_path

    state = installed.root / "state"
    catalog = installed.root / "catalog.toml"
    catalog.write_text(textwrap.dedent(f"""
        [server]
        max_seconds = 120

        [models.tiny]
        path = "{tiny_gpt2_path()}"
        dtype = "float32"
    """))
    port = free_port()
    log_path = installed.root / "server.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [str(installed.glassbox), "serve", "--models-file", str(catalog), "--host", "127.0.0.1",
             "--port", str(port), "--state-dir", str(state)],
            cwd=installed.work, env=installed.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    server = RunningServer(process, f"http://127.0.0.1:{port}", str(state), str(log_path))
    try:
        deadline = time.monotonic() + SERVER_START
        while True:
            assert process.poll() is None, f"glassbox serve exited ({process.returncode}):\n{server.output()}"
            try:
                if httpx.get(server.url + "/v1/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"no answer in {SERVER_START:g} s:\n{server.output()}"
            time.sleep(0.2)
        yield server.url, str(state)
    finally:
        server.stop()


def test_a_catalog_served_from_the_install(installed, served):
    import httpx

    url, state = served
    health = httpx.get(url + "/v1/health", timeout=30)
    assert health.status_code == 200, health.text
    page = httpx.get(url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>glassbox dashboard</title>" in page.text

    created = installed.run(installed.glassbox, "keys", "create", "alice", "--state-dir", state)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    listed = installed.run(installed.glassbox, "models", "--host", url, GLASSBOX_API_KEY=key)
    assert listed.returncode == 0 and "tiny" in listed.stdout, listed.stdout + listed.stderr

    script = installed.root / "remote_trace.py"  # a file: remote=True ships the block's source
    script.write_text(REMOTE_TRACE)
    trace = installed.run(installed.python, script, installed.site_packages, GLASSBOX_HOST=url,
                          GLASSBOX_API_KEY=key)
    assert trace.returncode == 0, trace.stdout + trace.stderr[-5000:]
    assert "remote equals local (1, 7, 64)" in trace.stdout, trace.stdout

    jobs = installed.run(installed.glassbox, "jobs", "list", "--url", url, "--key", key)
    assert jobs.returncode == 0, jobs.stderr
    header, *rows = jobs.stdout.splitlines()
    assert header.split()[:3] == ["ID", "MODEL", "STATUS"]
    assert [row.split()[1:3] for row in rows] == [["tiny", "COMPLETED"]], jobs.stdout
    no_key = installed.run(installed.glassbox, "jobs", "list", "--url", url)
    assert no_key.returncode == 2 and "no API key" in no_key.stderr
