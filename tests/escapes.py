"""What a job that escaped the sandbox tries first, as raw Python for ``tests/server/raw_executor.py``
(the tests that run it against a real server: Ray replicas, the vLLM worker).

Offers:
    ESCAPES        the block: ``attempt(name, fn)`` records into ``out[name]`` "allowed" or the
                   exception's name; then reading /etc/passwd, writing WROTE, making a socket,
                   exec and fork are attempted
    ESCAPE_NAMES   the names ``out`` gets, one per attempt
    WROTE          the file the write attempt would make
"""

WROTE = "/tmp/glassbox-raw-job-wrote-here"

ESCAPES = f"""
import os, socket
def attempt(name, fn):
    try:
        fn()
        out[name] = "allowed"
    except Exception as err:
        out[name] = type(err).__name__
attempt("read_passwd", lambda: open("/etc/passwd").read())
attempt("write_tmp", lambda: open({WROTE!r}, "w").write("x"))
attempt("socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
attempt("exec", lambda: os.execv("/bin/true", ["true"]))
attempt("fork", lambda: os._exit(0) if os.fork() == 0 else None)
"""

ESCAPE_NAMES = ("read_passwd", "write_tmp", "socket", "exec", "fork")
