"""confine.py: Landlock + seccomp on a worker process, checked from raw (unsandboxed) Python.

Every confinement happens in a fresh subprocess (confinement is for the life of a process; pytest's
own must stay free). Each subprocess imports torch, confines itself, tries things, and prints what
happened as JSON. OPENBLAS_NUM_THREADS=1: numpy's OpenBLAS would otherwise start a thread at import,
which Landlock below ABI 8 cannot reach, and ``require=True`` would refuse (a test shows that too).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from glassbox.server.workers.confine import available
from waiting import HANG

OFFERED = available()
pytestmark = pytest.mark.skipif(
    not OFFERED["landlock_abi"] or not OFFERED["seccomp"],
    reason=f"the kernel does not offer Landlock and seccomp: {OFFERED}")

PRELUDE = """
import json, os, site, sys, sysconfig, threading
import torch
import glassbox
from glassbox.server.workers.confine import ConfinementUnavailable, confine_job, confine_worker

PYTHON_DIRS = [sys.prefix, sys.base_prefix, *site.getsitepackages(), sysconfig.get_paths()["stdlib"],
               sysconfig.get_paths()["platstdlib"], os.path.dirname(glassbox.__file__)]
results = {}

def attempt(name, fn):
    try:
        value = fn()
        if not isinstance(value, (int, float, str, bool, list, type(None))):
            value = repr(value)
        results[name] = {"ok": True, "value": value}
    except BaseException as err:  # what failed, and how, is the result
        results[name] = {"ok": False, "error": type(err).__name__, "errno": getattr(err, "errno", None),
                         "message": str(err)}

def read(path):
    with open(path) as f:
        return f.read()
"""


def run_confined(body: str, setup: str = "", **values: object) -> dict:
    """Run PRELUDE, setup, then body (``values`` become globals) in a fresh Python; its ``results``."""
    code = PRELUDE + setup + "".join(f"{name} = {value!r}\n" for name, value in values.items())
    code += textwrap.dedent(body) + "\nprint(json.dumps(results))\n"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=HANG)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_available_reports_landlock_and_seccomp():
    assert OFFERED["landlock_abi"] >= 1
    assert OFFERED["seccomp"] is True
    assert set(OFFERED) == {"landlock_abi", "seccomp"}


def test_files_read_only_beneath_read_paths(tmp_path: Path):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir()
    other.mkdir()
    (allowed / "data.txt").write_text("readable")
    (other / "secret.txt").write_text("secret")
    results = run_confined("""
        attempt("passwd_before", lambda: len(read("/etc/passwd")) > 0)
        results["decimal_imported_before"] = "decimal" in sys.modules
        confinement = confine_worker(read_paths=PYTHON_DIRS + [ALLOWED])
        results["describe"] = confinement.describe()
        results["abi"] = confinement.landlock_abi
        results["seccomp"] = confinement.seccomp
        results["nnp"] = confinement.no_new_privs
        attempt("passwd_after", lambda: read("/etc/passwd"))
        attempt("read_allowed", lambda: read(ALLOWED + "/data.txt"))
        attempt("read_other", lambda: read(OTHER + "/secret.txt"))
        attempt("write_other", lambda: open(OTHER + "/new.txt", "w").write("x"))
        attempt("write_allowed_new", lambda: open(ALLOWED + "/new.txt", "w").write("x"))
        attempt("append_allowed", lambda: open(ALLOWED + "/data.txt", "a").write("x"))
        attempt("remove_allowed", lambda: os.remove(ALLOWED + "/data.txt"))
        attempt("chmod_allowed", lambda: os.chmod(ALLOWED + "/data.txt", 0o777))
        attempt("listdir_root", lambda: os.listdir("/"))
        attempt("dev_null", lambda: read("/dev/null"))
        attempt("import_decimal", lambda: __import__("decimal").Decimal("1.5") * 2 == 3)
        attempt("import_glassbox_module", lambda: __import__("glassbox.server.workers.channel").__name__)
    """, ALLOWED=str(allowed), OTHER=str(other))
    assert results["passwd_before"] == {"ok": True, "value": True}
    assert results["abi"] == min(OFFERED["landlock_abi"], 8) and results["seccomp"] and results["nnp"]
    assert results["describe"].startswith("confined: landlock ABI"), results["describe"]
    assert "seccomp" in results["describe"] and "no_new_privs" in results["describe"]
    for denied in ("passwd_after", "read_other", "write_other", "write_allowed_new", "append_allowed",
                   "remove_allowed", "chmod_allowed", "listdir_root"):
        assert results[denied]["ok"] is False, (denied, results[denied])
        assert results[denied]["error"] == "PermissionError", (denied, results[denied])
    assert results["read_allowed"] == {"ok": True, "value": "readable"}
    assert results["dev_null"] == {"ok": True, "value": ""}
    assert results["decimal_imported_before"] is False  # so the import below really reads files
    assert results["import_decimal"] == {"ok": True, "value": True}
    assert results["import_glassbox_module"]["ok"], results["import_glassbox_module"]
    assert (allowed / "data.txt").read_text() == "readable"
    assert not (other / "new.txt").exists() and not (allowed / "new.txt").exists()


def test_no_network():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        results = run_confined("""
            import socket
            def connect(sock=None):
                sock = sock or socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                with sock:
                    sock.settimeout(5)
                    sock.connect(("127.0.0.1", PORT))
                    return True
            attempt("connect_before", connect)
            made_before = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            to_bind = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            confine_worker(read_paths=PYTHON_DIRS)
            attempt("connect_after", connect)
            attempt("connect_inherited_socket", lambda: connect(made_before))
            attempt("inet_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
            attempt("unix_socket", lambda: socket.socket(socket.AF_UNIX).close())
            attempt("bind_inherited_socket",
                    lambda: to_bind.bind(("127.0.0.1", 0)))
        """, PORT=server.getsockname()[1])
    assert results["connect_before"] == {"ok": True, "value": True}
    for denied in ("connect_after", "connect_inherited_socket", "inet_socket", "unix_socket",
                   "bind_inherited_socket"):
        assert results[denied]["ok"] is False, (denied, results[denied])
        assert results[denied]["error"] == "PermissionError", (denied, results[denied])


def test_no_exec():
    results = run_confined("""
        import subprocess
        attempt("run_before", lambda: subprocess.run(["/bin/true"], check=True).returncode)
        confine_worker(read_paths=PYTHON_DIRS)
        attempt("execv", lambda: os.execv("/bin/true", ["true"]))
        attempt("subprocess", lambda: subprocess.run(["/bin/true"], check=True).returncode)
        attempt("python_itself", lambda: subprocess.run([sys.executable, "-c", "pass"]).returncode)
    """)
    assert results["run_before"] == {"ok": True, "value": 0}
    assert results["execv"]["ok"] is False and results["execv"]["error"] == "PermissionError"
    for denied in ("subprocess", "python_itself"):
        assert results[denied]["ok"] is False, (denied, results[denied])
        assert results[denied]["error"] == "PermissionError", (denied, results[denied])


def test_landlock_alone_denies_tcp_and_signals():
    """The Landlock layer by itself (seccomp would stop these first, with EPERM): EACCES."""
    if OFFERED["landlock_abi"] < 6:
        pytest.skip(f"TCP rules need Landlock ABI 4 and scoping ABI 6; this kernel has {OFFERED}")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
            server.bind(("127.0.0.1", 0))
            server.listen(8)
            results = run_confined("""
                import errno, socket
                from glassbox.server.workers import confine
                assert confine._prctl(confine._PR_SET_NO_NEW_PRIVS, 1) == 0
                confine._landlock(confine.available()["landlock_abi"], PYTHON_DIRS)
                def connect():
                    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                        sock.connect(("127.0.0.1", PORT))
                attempt("connect", connect)
                attempt("signal_outside", lambda: os.kill(SLEEPER, 0))
                attempt("signal_self", lambda: os.kill(os.getpid(), 0))
            """, PORT=server.getsockname()[1], SLEEPER=sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert results["connect"]["error"] == "PermissionError" and results["connect"]["errno"] == 13
    assert results["signal_outside"]["error"] == "PermissionError"
    assert results["signal_self"] == {"ok": True, "value": None}


def _reference_forward() -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    return float(model(torch.randn(256, 64)).sum().detach())


TORCH_WORK = """
def forward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    return float(model(torch.randn(256, 64)).sum().detach())

def matmul():
    a = torch.ones(512, 512)
    return float((a @ a).sum())

def python_thread():
    seen = []
    worker = threading.Thread(target=lambda: seen.append(threading.get_ident()))
    worker.start()
    worker.join()
    return len(seen)
"""


def test_torch_runs_with_threads_after_confinement():
    results = run_confined(setup=TORCH_WORK, body="""
        confinement = confine_worker(read_paths=PYTHON_DIRS)
        results["unconfined_threads"] = confinement.unconfined_threads
        torch.set_num_threads(2)  # the OpenMP pool starts now, from the confined thread
        attempt("threads", torch.get_num_threads)
        attempt("forward", forward)
        attempt("zeros", lambda: float(torch.zeros(10**6).sum()))
        attempt("matmul", matmul)
        attempt("capability", torch.backends.cpu.get_cpu_capability)
        attempt("python_thread", python_thread)
        attempt("passwd_after", lambda: read("/etc/passwd"))
    """)
    assert results["unconfined_threads"] == 0
    assert results["threads"] == {"ok": True, "value": 2}
    assert results["forward"]["ok"] and results["forward"]["value"] == pytest.approx(_reference_forward(),
                                                                                      rel=1e-5)
    assert results["zeros"] == {"ok": True, "value": 0.0}
    assert results["matmul"] == {"ok": True, "value": 512.0**3}
    # Warmed before confining: otherwise cpuinfo cannot read /proc/cpuinfo and torch says DEFAULT.
    assert results["capability"] == {"ok": True, "value": torch.backends.cpu.get_cpu_capability()}
    assert results["python_thread"] == {"ok": True, "value": 1}
    assert results["passwd_after"]["error"] == "PermissionError"


def test_worker_forks_confined_children_and_jobs_cannot_fork():
    results = run_confined(setup=TORCH_WORK, body="""
        def fork_and_report():
            # the forked child (a job) inherits the Landlock domain and the filter
            reader, writer = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    read("/etc/passwd")
                    os.write(writer, b"read")
                except PermissionError:
                    os.write(writer, b"denied")
                os._exit(0)
            os.waitpid(pid, 0)
            return os.read(reader, 16).decode()

        confine_worker(read_paths=PYTHON_DIRS)
        attempt("worker_fork", fork_and_report)
        confine_job()
        attempt("job_fork", os.fork)
        attempt("job_subprocess", lambda: __import__("subprocess").run(["/bin/true"]).returncode)
        attempt("job_spawn", lambda: os.posix_spawn("/bin/true", ["true"], {}))
        torch.set_num_threads(2)
        attempt("job_thread", python_thread)
        attempt("job_matmul", matmul)
        attempt("job_threads", torch.get_num_threads)
    """)
    assert results["worker_fork"] == {"ok": True, "value": "denied"}
    assert results["job_fork"]["ok"] is False and results["job_fork"]["error"] == "PermissionError"
    for denied in ("job_subprocess", "job_spawn"):
        assert results[denied]["ok"] is False, (denied, results[denied])
        assert results[denied]["error"] == "PermissionError", (denied, results[denied])
    assert results["job_thread"] == {"ok": True, "value": 1}
    assert results["job_matmul"] == {"ok": True, "value": 512.0**3}
    assert results["job_threads"] == {"ok": True, "value": 2}


def test_the_worker_writes_its_write_paths_and_its_jobs_write_nothing(tmp_path: Path):
    """An offload folder of a model loaded on demand: the confined worker writes there (accelerate
    puts offloaded weights there at load), a job (after confine_job) may read it but not write,
    make, remove or truncate anything in it, and nothing elsewhere is writable to either."""
    offload, other = tmp_path / "offload", tmp_path / "other"
    offload.mkdir()
    other.mkdir()
    (offload / "weights.dat").write_text("weights")
    results = run_confined("""
        def write(path, text="x"):
            with open(path, "w") as f:
                f.write(text)
            return True

        confine_worker(read_paths=[*PYTHON_DIRS, offload], write_paths=[offload])
        attempt("worker_writes_new", lambda: write(offload + "/layer.dat"))
        attempt("worker_overwrites", lambda: write(offload + "/weights.dat", "reloaded"))
        attempt("worker_makes_dir", lambda: os.mkdir(offload + "/sub") or True)
        attempt("worker_writes_elsewhere", lambda: write(other + "/x"))
        confine_job()
        attempt("job_reads", lambda: read(offload + "/weights.dat"))
        attempt("job_overwrites", lambda: write(offload + "/weights.dat", "poisoned"))
        attempt("job_writes_new", lambda: write(offload + "/evil.dat"))
        attempt("job_removes", lambda: os.remove(offload + "/layer.dat"))
        attempt("job_truncates", lambda: os.truncate(offload + "/weights.dat", 0))
        attempt("job_renames", lambda: os.rename(offload + "/layer.dat", offload + "/sub/layer.dat"))
        attempt("job_makes_dir", lambda: os.mkdir(offload + "/evil"))
    """, offload=str(offload), other=str(other))
    for allowed in ("worker_writes_new", "worker_overwrites", "worker_makes_dir"):
        assert results[allowed] == {"ok": True, "value": True}, (allowed, results[allowed])
    assert results["worker_writes_elsewhere"]["error"] == "PermissionError"
    assert results["job_reads"] == {"ok": True, "value": "reloaded"}
    for denied in ("job_overwrites", "job_writes_new", "job_removes", "job_truncates", "job_renames",
                   "job_makes_dir"):
        assert results[denied]["ok"] is False and results[denied]["error"] == "PermissionError", (
            denied, results[denied])
    assert (offload / "weights.dat").read_text() == "reloaded" and (offload / "layer.dat").exists()


def test_worker_without_fork():
    results = run_confined(setup=TORCH_WORK, body="""
        confinement = confine_worker(read_paths=PYTHON_DIRS, allow_fork=False)
        results["describe"] = confinement.describe()
        attempt("fork", os.fork)
        torch.set_num_threads(2)
        attempt("thread", python_thread)
        attempt("matmul", matmul)
    """)
    assert "no new processes" in results["describe"]
    assert results["fork"]["ok"] is False and results["fork"]["error"] == "PermissionError"
    assert results["thread"] == {"ok": True, "value": 1}
    assert results["matmul"] == {"ok": True, "value": 512.0**3}


def test_threads_started_before_confining():
    """Below Landlock ABI 8 a thread that already exists stays outside the Landlock domain: raw
    Python can make it open files. require=True refuses; require=False says so."""
    results = run_confined("""
        import queue
        jobs, answers = queue.Queue(), queue.Queue()
        def serve():
            while True:
                fn = jobs.get()
                try:
                    answers.put(("ok", fn()))
                except Exception as err:
                    answers.put(("error", type(err).__name__))
        threading.Thread(target=serve, daemon=True).start()
        attempt("required", lambda: confine_worker(read_paths=PYTHON_DIRS))
        confinement = confine_worker(read_paths=PYTHON_DIRS, require=False)
        results["unconfined_threads"] = confinement.unconfined_threads
        results["describe"] = confinement.describe()
        attempt("main_thread", lambda: read("/etc/passwd"))
        jobs.put(lambda: len(read("/etc/passwd")) > 0)
        results["earlier_thread"] = list(answers.get(timeout=600))  # a limit only for a hang
        jobs.put(lambda: os.execv("/bin/true", ["true"]))
        results["earlier_thread_exec"] = list(answers.get(timeout=600))
    """)
    assert results["main_thread"]["error"] == "PermissionError"
    # seccomp is installed with TSYNC: every thread, earlier ones too
    assert results["earlier_thread_exec"] == ["error", "PermissionError"]
    if OFFERED["landlock_abi"] >= 8:  # TSYNC: the earlier thread is confined too
        assert results["required"]["ok"] is True
        assert results["earlier_thread"] == ["error", "PermissionError"]
    else:
        assert results["required"]["ok"] is False
        assert results["required"]["error"] == "ConfinementUnavailable"
        assert "thread" in results["required"]["message"]
        assert results["unconfined_threads"] == 1
        assert "keep filesystem access" in results["describe"]
        assert results["earlier_thread"] == ["ok", True]  # the hole require=True refuses to leave
