"""Confine the process that runs untrusted user code (a server worker) with the kernel's help.

Offers:
    confine_worker(*, read_paths, write_paths=(), allow_fork=True, require=True) -> Confinement
                          once, in the worker process, after the models are loaded and before any
                          user code runs: no_new_privs, Landlock, a seccomp filter; ``write_paths``:
                          folders the worker itself still writes (offload folders of models it
                          loads on demand), never a job
    confine_job(*, require=True)
                          in a forked per-job child of a confined worker: no new processes from now
                          on (a second seccomp filter, stacked on the worker's), no writes anywhere
                          (the worker's ``write_paths`` included) and no signals to the worker or
                          other jobs (a Landlock domain of its own; signals from ABI >= 6)
    available() -> dict   what this kernel offers: {"landlock_abi": N, "seccomp": bool}; never raises
    Confinement           what was applied; ``describe()`` is one line for the server log
    ConfinementUnavailable  ``require=True`` and a layer is missing or cannot cover the process

What each layer stops, and what it does not:
    no_new_privs  execve can never gain privileges (setuid binaries, file capabilities); both
                  layers below need it. Stops nothing by itself.
    Landlock      stops opening any file outside ``read_paths`` (plus /dev/null, /dev/urandom),
                  writing, creating, removing, renaming or truncating anything anywhere, executing
                  files, TCP bind/connect (ABI >= 4), reaching abstract unix sockets and signalling
                  processes outside the sandbox (ABI >= 6). Does NOT stop: stat/access/chdir/readlink
                  (whether a path exists, its size and owner stay visible), file descriptors opened
                  before confinement (the pipe to the API process; the worker keeps using it),
                  chmod/chown/xattr/utime (seccomp denies those), protocols other than TCP (seccomp
                  denies socket()), and, below ABI 8, threads that existed before (see Threads).
    seccomp       stops execve/execveat, reading or writing other processes (ptrace,
                  process_vm_*), creating any socket, connect/bind/listen/accept on inherited ones,
                  the kernel's riskier interfaces (bpf, io_uring, userfaultfd, perf, keys, modules,
                  mount and namespaces), chmod/chown/xattr/utime, and with ``allow_fork=False`` or
                  after ``confine_job`` any new process (threads still work). Syscalls of another
                  ABI (i386 ``int 0x80``, x32) kill the process. Does NOT stop: reading or writing
                  this process's own memory (the models are there by design), allowed syscalls on
                  descriptors already open (the untrusted code can still write frames to the API
                  process's pipe: the parent must treat what it reads as untrusted), CPU and memory
                  exhaustion (the feeder's deadlines and RLIMIT_DATA in child.py handle those).

Threads: Landlock restricts the calling thread and the threads it starts afterwards; the seccomp
filter is installed with TSYNC, so it covers every thread. Threads that already exist when
``confine_worker`` runs (numpy's OpenBLAS server starts at ``import numpy``, which torch imports;
torch's OpenMP pool starts at the first parallel op; Python threads) keep full filesystem access
unless the kernel has Landlock ABI 8 (LANDLOCK_RESTRICT_SELF_TSYNC, Linux 6.19). Raw Python can make
such a thread do its bidding (replace a function that thread calls), so an unconfined thread is a
hole, not a detail: below ABI 8 ``require=True`` refuses to confine a process that has other
threads. Start the worker with OPENBLAS_NUM_THREADS=1, keep ``torch.set_num_threads(1)`` while
loading, start Python threads after confining; set the thread count you want after
``confine_worker`` (those threads are started by the confined thread, so they are confined).

Why ctypes for Landlock and not the ``landlock`` PyPI package: its only release is a development
one (1.0.0.dev5); the three syscalls and two structs are a few lines. Why ``pyseccomp`` for seccomp
(a thin ctypes wrapper over the system's libseccomp, API-compatible with libseccomp's own bindings):
libseccomp writes the BPF, including the architecture and x32 checks that a hand-written filter
gets wrong most easily.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import sys
import threading
from dataclasses import dataclass

__all__ = ["Confinement", "ConfinementUnavailable", "available", "confine_job", "confine_worker"]

_PR_GET_SECCOMP = 21
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39

# Landlock syscalls have the same numbers on every architecture (added after the syscall tables
# were unified).
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_RESTRICT_SELF_TSYNC = 1 << 3  # ABI 8: apply to every thread of the process
_KNOWN_ABI = 8  # newer kernels may handle rights this module does not know: they stay unhandled

_FS_EXECUTE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 2, 1 << 3
# Every filesystem right an ABI can handle. A right the ruleset handles and no rule grants is denied.
_FS_RIGHTS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_RIGHTS = 0b11  # ABI 4: BIND_TCP, CONNECT_TCP; no rule grants them, so every port is denied
_SCOPES = 0b11  # ABI 6: ABSTRACT_UNIX_SOCKET, SIGNAL

_CLONE_THREAD = 0x00010000
# Always readable: harmless devices that libraries open by name.
_DEVICE_PATHS = ("/dev/null", "/dev/urandom")

# seccomp: these return EPERM. Names the native architecture lacks (fork on aarch64, say) are skipped.
_DENIED = (
    # run other programs; reach into other processes
    "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
    "process_madvise", "kcmp",
    # the network: no new socket of any kind (torch on CPU needs none), nothing on inherited ones
    "socket", "connect", "bind", "listen", "accept", "accept4",
    # mounts, namespaces, root changes
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "move_mount", "open_tree",
    "fsopen", "fsmount", "fspick", "mount_setattr",
    # kernel attack surface nobody running a model needs
    "kexec_load", "kexec_file_load", "bpf", "perf_event_open", "keyctl", "add_key", "request_key",
    "personality", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "open_by_handle_at", "name_to_handle_at",
    "fanotify_init", "iopl", "ioperm", "swapon", "swapoff", "reboot", "acct", "quotactl", "syslog",
    # metadata changes that Landlock does not cover (they take a path, not an opened file)
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "utime", "utimes", "futimesat", "utimensat",
)


class ConfinementUnavailable(RuntimeError):
    """``require=True`` and the kernel (or libseccomp) cannot confine this process fully."""


@dataclass(frozen=True)
class Confinement:
    landlock_abi: int = 0  # the ABI whose rights were handled; 0: no Landlock
    seccomp: bool = False
    no_new_privs: bool = False
    allow_fork: bool = True
    read_paths: tuple[str, ...] = ()  # readable beneath, as applied (missing paths dropped)
    write_paths: tuple[str, ...] = ()  # writable beneath (by the worker; its jobs may not)
    denied_syscalls: tuple[str, ...] = ()
    unconfined_threads: int = 0  # threads Landlock could not reach (existed before, ABI < 8)
    notes: tuple[str, ...] = ()  # what could not be applied, and why

    def describe(self) -> str:
        parts = []
        if self.landlock_abi:
            extra = (", no TCP" if self.landlock_abi >= 4 else "") + (
                ", scoped signals/abstract sockets" if self.landlock_abi >= 6 else "")
            writes = f", the worker writes beneath {len(self.write_paths)}" if self.write_paths else ""
            parts.append(f"landlock ABI {self.landlock_abi} (read-only beneath {len(self.read_paths)} "
                         f"paths{writes}{extra})")
        if self.seccomp:
            parts.append(f"seccomp ({len(self.denied_syscalls)} syscalls denied, "
                         f"{'forks allowed' if self.allow_fork else 'no new processes'})")
        if self.no_new_privs:
            parts.append("no_new_privs")
        text = ("confined: " + ", ".join(parts)) if parts else "NOT confined"
        return text + "".join(f"; {note}" for note in self.notes)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in linux/landlock.h
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _syscall(number: int, *args: object) -> int:
    # Every argument as a C long (or pointer): the syscall() varargs are read as longs.
    converted = [arg if not isinstance(arg, int) else ctypes.c_long(arg) for arg in args]
    return _libc.syscall(ctypes.c_long(number), *converted)


def _prctl(option: int, arg: int = 0) -> int:
    return _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0))


def _oserror(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def _landlock_abi() -> int:
    abi = _syscall(_SYS_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION)
    return max(int(abi), 0)  # -1: ENOSYS (not built) or EOPNOTSUPP (built, not enabled at boot)


def _pyseccomp():  # -> the pyseccomp module, or None without it or libseccomp
    try:
        import pyseccomp
    except (ImportError, RuntimeError, OSError):  # RuntimeError: "Unable to find libseccomp"
        return None
    return pyseccomp


def _seccomp_available() -> bool:
    lib = _pyseccomp()
    # PR_GET_SECCOMP fails without CONFIG_SECCOMP; API level 2 means the seccomp() syscall and TSYNC.
    return lib is not None and _prctl(_PR_GET_SECCOMP) >= 0 and lib.get_api() >= 2


def available() -> dict:
    """What this kernel offers: ``{"landlock_abi": N (0: none), "seccomp": bool}``. Never raises."""
    try:
        abi = _landlock_abi()
    except Exception:
        abi = 0
    try:
        seccomp = _seccomp_available()
    except Exception:
        seccomp = False
    return {"landlock_abi": abi, "seccomp": seccomp}


def _other_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task")) - 1
    except OSError:  # no /proc: Python's own count is a lower bound
        return threading.active_count() - 1


def _warm_torch() -> None:
    """Run torch's lazy initialisers that read /proc or /sys while they still can. Measured: the
    first op after confinement otherwise fails to parse /proc/cpuinfo ("Error in cpuinfo"), and torch
    silently falls back to its unvectorised kernels (capability DEFAULT instead of AVX512) and NNPACK
    refuses to start. cpuinfo initialises once per process; what it learnt stays."""
    torch = sys.modules.get("torch")
    capability = getattr(getattr(getattr(torch, "backends", None), "cpu", None), "get_cpu_capability", None)
    if capability is not None:
        capability()


def _fs_rights(used: int) -> int:
    """Every filesystem right Landlock ABI ``used`` knows."""
    return _FS_RIGHTS[max(k for k in _FS_RIGHTS if k <= used)]


def _landlock(abi: int, read_paths: list[str],
              write_paths: list[str] = ()) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
    """Restrict this thread (every thread on ABI >= 8); returns the ABI handled and the paths granted
    for reading, and for writing (every file right but executing, beneath each)."""
    used = min(abi, _KNOWN_ABI)
    attr = _RulesetAttr(handled_access_fs=_fs_rights(used),
                        handled_access_net=_NET_RIGHTS if used >= 4 else 0,
                        scoped=_SCOPES if used >= 6 else 0)
    # The struct grew with the ABI: older kernels reject a size with fields they do not know.
    size = 8 if used < 4 else 16 if used < 6 else 24
    ruleset = _syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        raise _oserror("landlock_create_ruleset")
    granted: list[str] = []
    writable: list[str] = []
    try:
        for path in dict.fromkeys(os.path.realpath(p) for p in write_paths):
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)  # must exist: made before
            try:
                rule = _PathBeneathAttr(_fs_rights(used) & ~_FS_EXECUTE, fd)
                if _syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) < 0:
                    raise _oserror(f"landlock_add_rule {path} (write)")
            finally:
                os.close(fd)
            writable.append(path)
        for path in dict.fromkeys(os.path.realpath(p) for p in [*read_paths, *_DEVICE_PATHS]):
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # e.g. a base_prefix that is not there: nothing to read beneath it
            try:
                # A rule on a file may only carry file rights; directories also get READ_DIR.
                is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
                rule = _PathBeneathAttr(_FS_READ_FILE | (_FS_READ_DIR if is_dir else 0), fd)
                if _syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0) < 0:
                    raise _oserror(f"landlock_add_rule {path}")
            finally:
                os.close(fd)
            granted.append(path)
        if _syscall(_SYS_RESTRICT_SELF, ruleset, _RESTRICT_SELF_TSYNC if used >= 8 else 0) < 0:
            raise _oserror("landlock_restrict_self")
    finally:
        os.close(ruleset)
    return used, tuple(granted), tuple(writable)


def _seccomp(names: tuple[str, ...], no_processes: bool) -> tuple[str, ...]:
    """Install one filter (default allow) on every thread; returns the syscalls it denies."""
    lib = _pyseccomp()
    assert lib is not None
    if no_processes and lib.system_arch() not in (lib.Arch.X86_64, lib.Arch.AARCH64):
        # clone's flags are argument 0 on these two; elsewhere (s390) they are not: refuse to guess.
        raise ConfinementUnavailable("no-new-processes rule: clone's flags argument not known on this arch")
    flt = lib.SyscallFilter(lib.ALLOW)
    flt.set_attr(lib.Attr.CTL_TSYNC, 1)  # every thread, not only this one
    with contextlib.suppress(OSError):  # kernels before 4.14 kill the thread (the default) instead
        flt.set_attr(lib.Attr.ACT_BADARCH, lib.KILL_PROCESS)  # int 0x80, x32: no way around the filter
    denied = []
    for name in names:
        if lib.resolve_syscall(lib.Arch.NATIVE, name) >= 0:
            flt.add_rule(lib.ERRNO(errno.EPERM), name)
            denied.append(name)
    if no_processes:
        for name in ("fork", "vfork"):
            if lib.resolve_syscall(lib.Arch.NATIVE, name) >= 0:
                flt.add_rule(lib.ERRNO(errno.EPERM), name)
                denied.append(name)
        # A clone without CLONE_THREAD makes a process; with it, a thread (which shares the memory
        # and the filters). clone3 passes its flags in memory, where seccomp cannot look: ENOSYS makes
        # glibc's pthread_create fall back to clone.
        flt.add_rule(lib.ERRNO(errno.EPERM), "clone", lib.Arg(0, lib.MASKED_EQ, _CLONE_THREAD, 0))
        flt.add_rule(lib.ERRNO(errno.ENOSYS), "clone3")
        denied += ["clone (no CLONE_THREAD)", "clone3 (ENOSYS)"]
    flt.load()
    return tuple(denied)


def confine_worker(*, read_paths: list[str], write_paths: list[str] = (), allow_fork: bool = True,
                   require: bool = True) -> Confinement:
    """Confine this process for good: read-only beneath ``read_paths``, no writes but beneath
    ``write_paths`` (existing folders), no network, no exec (see the module docstring).
    ``require=True``: raise ``ConfinementUnavailable`` unless every layer applies to every thread,
    checked before anything is applied; a failure after that (rare: a syscall refusing) also raises,
    and the process, possibly half confined, should exit.
    ``require=False``: apply what can be, and say in the result what was not."""
    offered = available()
    abi, has_seccomp = offered["landlock_abi"], offered["seccomp"]
    others = _other_threads() if abi < 8 else 0
    notes: list[str] = []
    if not abi:
        notes.append("Landlock unavailable (kernel too old, or not in the lsm= boot list)")
    if not has_seccomp:
        notes.append("seccomp unavailable (no kernel support, or no libseccomp / pyseccomp)")
    if others:
        notes.append(f"{others} thread(s) started before confining keep filesystem access "
                     "(Landlock ABI < 8 restricts only the calling thread)")
    if require and notes:
        raise ConfinementUnavailable("; ".join(notes))

    _warm_torch()
    nnp = _prctl(_PR_SET_NO_NEW_PRIVS, 1) == 0 and _prctl(_PR_GET_NO_NEW_PRIVS) == 1
    if not nnp:
        if require:
            raise ConfinementUnavailable(f"{_oserror('PR_SET_NO_NEW_PRIVS')}")
        notes.append("PR_SET_NO_NEW_PRIVS failed: no Landlock without it")
    applied_abi, granted, writable, denied = 0, (), (), ()
    if abi and nnp:
        try:
            applied_abi, granted, writable = _landlock(abi, read_paths, list(write_paths))
        except OSError as err:
            if require:
                raise ConfinementUnavailable(f"Landlock: {err}") from err
            notes.append(f"Landlock failed: {err}")
    if has_seccomp:
        try:
            denied = _seccomp(_DENIED, no_processes=not allow_fork)
        except (OSError, ConfinementUnavailable) as err:
            if require:
                raise ConfinementUnavailable(f"seccomp: {err}") from err
            notes.append(f"seccomp failed: {err}")
    return Confinement(landlock_abi=applied_abi, seccomp=bool(denied), no_new_privs=nnp,
                       allow_fork=allow_fork, read_paths=granted, write_paths=writable,
                       denied_syscalls=denied,
                       unconfined_threads=others if applied_abi else 0, notes=tuple(notes))


def confine_job(*, require: bool = True) -> None:
    """In a per-job child forked from a confined worker: no new processes from now on (fork, vfork,
    clone without CLONE_THREAD; clone3 says ENOSYS). Threads still start. The filter stacks on the
    worker's; the worker's Landlock domain came with the fork."""
    if not _seccomp_available():
        if require:
            raise ConfinementUnavailable("seccomp unavailable: cannot stop this job from forking")
        return
    try:
        _seccomp((), no_processes=True)
    except (OSError, ConfinementUnavailable) as err:
        if require:
            raise ConfinementUnavailable(f"seccomp: {err}") from err
    try:
        _scope_job()
    except OSError as err:
        if require:
            raise ConfinementUnavailable(f"landlock scope: {err}") from err


def _scope_job() -> None:
    """A Landlock domain of the job's own, stacked on the worker's: no file may be written, made,
    removed or truncated anywhere (the worker may still write its ``write_paths``: offload folders
    of models loaded on demand; a job must never), and (ABI >= 6) signals and abstract unix sockets
    are scoped: the job can no longer signal the worker that forked it (a SIGKILL there would make
    every tenant wait for the models to load again) or its siblings. Reading is left to the
    worker's domain, inherited."""
    abi = min(_landlock_abi(), _KNOWN_ABI)
    if abi < 1:
        return
    attr = _RulesetAttr(handled_access_fs=_fs_rights(abi) & ~(_FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR),
                        handled_access_net=0, scoped=_SCOPES if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        raise _oserror("landlock_create_ruleset (job)")
    try:
        if _syscall(_SYS_RESTRICT_SELF, ruleset, 0) < 0:
            raise _oserror("landlock_restrict_self (job)")
    finally:
        os.close(ruleset)
