"""A sandboxed Python code interpreter: the ``code_interpreter`` tool of the math task (§8.4).

:class:`CodeInterpreter` is a :class:`~spear.envs.base.Tool` with one argument, ``code``. It
strips markdown ```` ```python ```` fences from the argument, runs the code after an optional
import preamble on a backend, and turns the outcome into one clear text for the model: the
stdout; or the last lines of the traceback and "Errors occurred! Check your code."; or a
timeout, memory-limit, empty-output ("Empty stdout! ...") or sandbox-failure message.

Backends:

* :class:`LocalSandbox` (default): every call runs in a fresh ``python -I`` subprocess with
  its own working directory, a scrubbed environment (only PATH, HOME, LANG, LC_ALL, TMPDIR and
  single-thread settings for numerical libraries), and the limits of :class:`SandboxLimits`:
  wall clock (the parent kills the whole process group), CPU time (``RLIMIT_CPU``), address
  space (``RLIMIT_AS``), processes (``RLIMIT_NPROC``), file size (``RLIMIT_FSIZE``), no core
  files. stdout and stderr are read with a byte cap (head and tail kept, the middle counted and
  dropped), so printing 100 MB never holds 100 MB in memory. Isolation is detected once per
  interpreter at run time, strongest first, and exposed as ``isolation`` / ``network``:

  - ``"namespaces"`` (running as root and ``unshare`` works): new network, PID, mount and IPC
    namespaces. The network namespace has no interface up, so no connection can be made. Inside,
    a private size-limited tmpfs covers ``/tmp``, ``/var/tmp`` and ``/dev/shm`` (the working
    directory is ``/tmp/work``, gone with the namespace), the user code runs as an unprivileged
    uid (``nobody`` by default) so it can write nothing of the host's, and ``RLIMIT_NPROC`` is
    enforced (root would bypass it). When the call ends, the PID namespace's init exits and the
    kernel kills every process left in it, even ones that called ``setsid``.
  - ``"userns"`` (not root, unprivileged user namespaces allowed): the same namespaces inside a
    new user namespace; ``RLIMIT_NPROC`` counts only the sandbox's own processes. The code keeps
    the invoking user's file permissions outside ``/tmp``.
  - ``"rlimits"`` (no namespaces, e.g. a container without ``CAP_SYS_ADMIN``): limits, a fresh
    session and a temporary working directory removed afterwards; as root the code runs as
    ``nobody``. Network is refused by an audit hook (``sys.addaudithook``) that refuses socket
    creation, ``subprocess``, ``os.system`` / ``exec*`` / ``posix_spawn`` and ``ctypes``. This
    is best effort: a process that escapes its process group is not tracked.

* :class:`SandboxFusionClient`: a SandboxFusion server's ``POST /run_code`` API over HTTP
  (standard library only). Transport errors, HTTP errors, bad replies and timeouts become the
  same clear texts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

Isolation = Literal["namespaces", "userns", "rlimits"]
Outcome = Literal[
    "ok", "error", "timeout", "cpu_timeout", "memory", "killed", "rejected", "sandbox_error"
]

NOBODY_UID = 65534
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
EMPTY_STDOUT = "Empty stdout! You might forget to print the answer."
ERRORS_HINT = "Errors occurred! Check your code."
API_FAILED = "Tool API failed! Please try again."
MATH_PREAMBLE = (
    "import math, re, string, itertools, functools, collections, fractions, decimal, heapq\n"
    "import random, statistics, bisect\n"
    "from fractions import Fraction\n"
    "try:\n"
    "    import numpy as np\n"
    "except ImportError:\n"
    "    pass\n"
)
_PROBE_PREAMBLE = "import json, decimal, fractions\n"  # stdlib files must be readable
_GRACE_S = 0.2  # after the sandbox's init reported, how long stray writers may keep the pipes
_MEMORY_ERROR = re.compile(r"^([\w.]+\.)?_?\w*MemoryError\b")
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    ``wall_time_s``: wall clock before the whole run is killed; ``cpu_time_s``: CPU seconds per
    process (``RLIMIT_CPU``); ``memory_mb``: address space per process (``RLIMIT_AS``);
    ``max_processes``: processes and threads the code may add (``RLIMIT_NPROC``);
    ``max_file_mb``: largest file it may write (``RLIMIT_FSIZE``); ``disk_mb``: size of the
    private tmpfs (namespaces modes); ``max_output_bytes``: bytes kept of each of stdout and
    stderr (half head, half tail); ``max_output_chars``: longest returned text (middle-truncated
    with a marker); ``max_code_chars``: longest accepted code; ``error_lines``: traceback lines
    shown on an error.
    """

    wall_time_s: float
    cpu_time_s: float
    memory_mb: int
    max_processes: int
    max_file_mb: int
    disk_mb: int
    max_output_bytes: int
    max_output_chars: int
    max_code_chars: int
    error_lines: int

    def __post_init__(self) -> None:
        for name in ("wall_time_s", "cpu_time_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                raise ValueError(f"SandboxLimits.{name} must be a finite number > 0, got {value!r}")
        minimum = {
            "memory_mb": 64,
            "max_processes": 1,
            "max_file_mb": 1,
            "disk_mb": 1,
            "max_output_bytes": 64,
            "max_output_chars": 64,
            "max_code_chars": 1,
            "error_lines": 1,
        }
        for name, low in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"SandboxLimits.{name} must be an integer >= {low}, got {value!r}")


# Reference values (§8.4: 30 s, 1024 MB, 16384 characters); the math task shortens the clock to
# fit its tool timeout.
DEFAULT_LIMITS = SandboxLimits(
    wall_time_s=30.0,
    cpu_time_s=30.0,
    memory_mb=1024,
    max_processes=64,
    max_file_mb=16,
    disk_mb=64,
    max_output_bytes=1 << 20,
    max_output_chars=16384,
    max_code_chars=100_000,
    error_lines=4,
)


@dataclass(frozen=True, slots=True)
class RunResult:
    """What happened to one piece of code.

    ``outcome``: ok (exit 0), error (non-zero exit, traceback in ``stderr``), timeout (wall
    clock), cpu_timeout, memory, killed (by a signal), rejected (never run: bad argument),
    sandbox_error (the sandbox itself failed; ``detail`` says why). ``*_bytes`` count all bytes
    written, of which ``stdout`` / ``stderr`` keep at most the byte cap.
    """

    outcome: Outcome
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    signal: int | None = None
    wall_s: float = 0.0
    cpu_s: float | None = None
    max_rss_mb: float | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    detail: str = ""


class Backend(Protocol):
    """Runs code under limits; never raises because of the code."""

    isolation: str
    network: str
    limits: SandboxLimits

    def run(self, code: str, preamble: str) -> RunResult: ...


# ----------------------------------------------------------------------------------------------
# Text helpers


def strip_code_fences(code: str) -> str:
    """The contents of the markdown code fences in ``code`` (joined), or ``code`` itself."""
    blocks = _FENCE.findall(code)
    return "\n".join(blocks) if blocks else code


def middle_truncate(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, keeping head and tail around a marker that
    says how many characters were dropped."""
    if len(text) <= limit:
        return text
    keep = max(0, limit - len(f"\n...[{len(text)} characters truncated]...\n"))
    head, tail = keep - keep // 2, keep // 2
    marker = f"\n...[{len(text) - keep} characters truncated]...\n"
    return (text[:head] + marker + (text[len(text) - tail :] if tail else ""))[:limit]


def _last_lines(text: str, n: int) -> str:
    lines = [line for line in text.rstrip().splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def format_result(result: RunResult, limits: SandboxLimits) -> str:
    """The text the model sees for ``result`` (see the module docstring)."""
    out = result.stdout.strip("\n")
    partial = f"\nOutput before it was stopped:\n{out}" if out.strip() else ""
    last = _last_lines(result.stderr, limits.error_lines)
    if result.outcome == "ok":
        text = out if out.strip() else EMPTY_STDOUT
    elif result.outcome == "error":
        shown = f"{out}\n" if out.strip() else ""
        code = f" (exit code {result.exit_code})" if result.exit_code not in (None, 1) else ""
        text = (
            f"{shown}Error{code}:\n{last}\n{ERRORS_HINT}"
            if last
            else f"{shown}Error{code}.\n{ERRORS_HINT}"
        )
    elif result.outcome == "timeout":
        text = (
            f"Timeout! The code ran longer than {limits.wall_time_s:g}s (wall-clock limit) and "
            f"was stopped. Make it faster.{partial}"
        )
    elif result.outcome == "cpu_timeout":
        text = (
            f"Timeout! The code used more than {limits.cpu_time_s:g}s of CPU time and was "
            f"stopped. Make it faster.{partial}"
        )
    elif result.outcome == "memory":
        why = f"\n{last}" if last else ""
        text = (
            f"Memory limit exceeded! The code tried to use more than {limits.memory_mb} MB "
            f"and was stopped. Use less memory.{why}"
        )
    elif result.outcome == "killed":
        name = signal.Signals(result.signal).name if result.signal else "a signal"
        text = f"The code was killed by {name} (it may have run out of memory).{partial}"
    elif result.outcome == "rejected":
        text = f"error: {result.detail}"
    else:
        text = f"{API_FAILED} ({result.detail})" if result.detail else API_FAILED
    return middle_truncate(text, limits.max_output_chars)


# ----------------------------------------------------------------------------------------------
# Local subprocess backend

# Runs inside the sandbox as `python -I -c`. stdin: one JSON line of settings, then the code.
# As init of the sandbox (PID 1 in the namespaces modes) it prepares the working directory, forks
# the child that runs the code under its limits, reaps every process, and reports the child's
# exit status and resource use as JSON on the status pipe.
_BOOTSTRAP = r"""
import json, os, resource, signal, sys, traceback
spec = json.loads(sys.stdin.readline())
code = sys.stdin.read()
status_fd = spec["status_fd"]
if spec["private_tmp"]:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    opts = ("size=%dm,mode=1777" % spec["disk_mb"]).encode()
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d) and libc.mount(b"tmpfs", d.encode(), b"tmpfs", 6, opts) != 0:
            raise OSError(ctypes.get_errno(), "cannot mount a tmpfs on " + d)
    workdir = "/tmp/work"
    os.mkdir(workdir, 0o700)
    if spec["uid"] is not None:
        # The code will run unprivileged: where an ancestor of the interpreter's files is closed
        # to others (e.g. /root), cover it with an empty tmpfs and bind back only those files.
        needed = {os.path.realpath(p) for p in
                  [sys.executable, sys.prefix, sys.base_prefix, *sys.path] if p and os.path.exists(p)}
        blocked = {}
        for p in sorted(needed):
            parts = p.split("/")
            for i in range(2, len(parts)):
                if not os.stat("/".join(parts[:i])).st_mode & 1:
                    blocked.setdefault("/".join(parts[:i]), set()).add(parts[i])
                    break
        for top, names in blocked.items():
            fds = {n: os.open(top + "/" + n, os.O_PATH) for n in names}
            if libc.mount(b"tmpfs", top.encode(), b"tmpfs", 6, b"size=1m,mode=0755") != 0:
                raise OSError(ctypes.get_errno(), "cannot mount a tmpfs on " + top)
            for n, fd in fds.items():
                target = top + "/" + n
                if os.path.isdir("/proc/self/fd/%d" % fd):
                    os.mkdir(target)
                else:
                    open(target, "w").close()
                src = ("/proc/self/fd/%d" % fd).encode()
                if libc.mount(src, target.encode(), None, 4096 | 16384, None) != 0:
                    raise OSError(ctypes.get_errno(), "cannot bind " + target)
                os.close(fd)
else:
    workdir = spec["workdir"]
uid = spec["uid"]
path = os.path.join(workdir, "main.py")
with open(path, "w", encoding="utf-8") as f:
    f.write(code)
if uid is not None:
    os.chown(workdir, uid, uid)
    os.chown(path, uid, uid)
sys.stdout.flush()
pid = os.fork()
if pid == 0:
    os.close(status_fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(workdir)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    os.umask(0o077)
    cpu = spec["cpu_s"]
    limits = [(resource.RLIMIT_AS, spec["as_bytes"]), (resource.RLIMIT_CPU, cpu),
              (resource.RLIMIT_NPROC, spec["nproc"]), (resource.RLIMIT_FSIZE, spec["fsize"]),
              (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256)]
    for which, soft in limits:
        hard = soft + 1 if which == resource.RLIMIT_CPU else soft
        resource.setrlimit(which, (soft, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    sys.argv = [path]
    g = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    rc = 0
    try:
        if spec["preamble"]:
            exec(compile(spec["preamble"], "<preamble>", "exec"), g)
        if spec["block"]:
            import ctypes  # loaded before the hook so that numpy & co. still import
            blocked = frozenset(spec["block"])
            def _hook(event, args, blocked=blocked):
                if event in blocked:
                    raise PermissionError("sandbox: %s is not allowed (no network, no programs)"
                                          % event)
            sys.addaudithook(_hook)
        exec(compile(code, path, "exec"), g)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            rc = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            rc = 1
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        rc = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(rc & 0xFF)
report = {}
while True:
    try:
        got, status, usage = os.wait4(-1, 0)
    except ChildProcessError:
        break
    if got == pid:
        report = {"exit": os.waitstatus_to_exitcode(status),
                  "cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_kb": usage.ru_maxrss}
        break
os.write(status_fd, json.dumps(report).encode())
os._exit(0)
"""

# Audit events refused in the "rlimits" mode, where no network namespace exists.
BLOCKED_EVENTS = (
    "socket.__new__",
    "socket.connect",
    "socket.bind",
    "socket.getaddrinfo",
    "socket.sendto",
    "subprocess.Popen",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.forkpty",
    "pty.spawn",
    "ctypes.dlopen",
    "ctypes.dlsym",
)


class _CappedBuffer:
    """Keeps the first and the last ``cap // 2`` bytes written to it and counts the rest."""

    def __init__(self, cap: int) -> None:
        self.half = max(1, cap // 2)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > 2 * self.half:
                del self.tail[: len(self.tail) - self.half]

    def text(self) -> str:
        """The kept bytes as text, with a marker where bytes were dropped."""
        tail = self.tail[-self.half :] if len(self.tail) > self.half else self.tail
        dropped = self.total - len(self.head) - len(tail)
        head_text = self.head.decode("utf-8", errors="replace")
        tail_text = bytes(tail).decode("utf-8", errors="replace")
        if dropped <= 0:
            return (self.head + tail).decode("utf-8", errors="replace")
        return f"{head_text}\n...[output truncated: {dropped} bytes not shown]...\n{tail_text}"


def _sandbox_env(home: str, tmpdir: str) -> dict[str, str]:
    """The whole environment of the sandboxed process: nothing of the parent's."""
    one = "1"
    return {
        "PATH": SAFE_PATH,
        "HOME": home,
        "TMPDIR": tmpdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": one,
        "OPENBLAS_NUM_THREADS": one,
        "MKL_NUM_THREADS": one,
        "NUMEXPR_NUM_THREADS": one,
        "MPLBACKEND": "Agg",
    }


def _count_tasks(uid: int) -> int:
    """Threads of all processes owned by ``uid`` now (what ``RLIMIT_NPROC`` counts)."""
    n = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                n += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return n


def _namespace_prefix(isolation: Isolation) -> list[str]:
    flags = ["--net", "--pid", "--mount", "--ipc", "--fork", "--kill-child", "--mount-proc"]
    if isolation == "userns":
        flags = ["--user", "--map-root-user", *flags]
    return ["unshare", *flags, "--"] if isolation != "rlimits" else []


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to start a run: the isolation mode and the uid the code runs as (None: unchanged)."""

    isolation: Isolation
    uid: int | None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class LocalSandbox:
    """Runs code in a fresh, limited subprocess (see the module docstring).

    ``isolation="auto"`` picks the strongest mode that works here (probed once per interpreter
    and uid); a named mode is used as given. ``uid``: the unprivileged uid the code runs as when
    this process is root (default ``nobody``).
    """

    def __init__(
        self,
        limits: SandboxLimits,
        *,
        isolation: Isolation | Literal["auto"] = "auto",
        python: str | None = None,
        uid: int = NOBODY_UID,
    ) -> None:
        self.limits = limits
        self.python = python or sys.executable
        self.uid = uid
        plan = _detect(self.python, uid, None if isolation == "auto" else isolation)
        self._plan = plan
        self.isolation: str = plan.isolation
        self.network: str = "namespace" if plan.isolation != "rlimits" else "audit-hook"
        self.run_as_uid: int | None = plan.uid

    def run(self, code: str, preamble: str) -> RunResult:
        """Run ``preamble`` then ``code``; never raises because of the code."""
        return _run_local(self._plan, self.python, self.limits, code, preamble)


@functools.lru_cache(maxsize=8)
def _detect(python: str, uid: int, wanted: Isolation | None) -> _Plan:
    """The strongest plan (of mode ``wanted``, if given) whose probe run works."""
    root = os.geteuid() == 0
    candidates: list[_Plan] = []
    if sys.platform.startswith("linux") and shutil.which("unshare"):
        candidates.append(_Plan("namespaces", uid) if root else _Plan("userns", None))
    candidates.append(_Plan("rlimits", uid if root else None))
    if root:  # the interpreter may be unreadable for ``uid``; then the code runs as root
        candidates.append(_Plan("rlimits", None))
    if wanted is not None:
        candidates = [c for c in candidates if c.isolation == wanted]
    probe_limits = dataclasses.replace(DEFAULT_LIMITS, wall_time_s=10.0, cpu_time_s=10.0)
    for plan in candidates:
        result = _run_local(plan, python, probe_limits, "print('sandbox-ok')", _PROBE_PREAMBLE)
        if result.outcome == "ok" and result.stdout.strip() == "sandbox-ok":
            log.info("sandbox isolation: %s (code runs as uid %s)", plan.isolation, plan.uid)
            return plan
        log.info(
            "sandbox isolation %s (uid %s) unavailable: %s %s",
            plan.isolation,
            plan.uid,
            result.outcome,
            (result.detail or result.stderr)[-300:],
        )
    raise RuntimeError(
        f"sandbox isolation {wanted or 'auto'!r} does not work here with python "
        f"{python!r} (as uid {os.geteuid()})"
    )


def _spec(
    plan: _Plan, limits: SandboxLimits, workdir: str | None, status_fd: int, preamble: str
) -> dict[str, Any]:
    if plan.isolation == "userns":
        nproc = limits.max_processes + 1  # a fresh user namespace counts only its own tasks
    else:
        owner = plan.uid if plan.uid is not None else os.geteuid()
        nproc = _count_tasks(owner) + limits.max_processes
    return {
        "status_fd": status_fd,
        "private_tmp": plan.isolation != "rlimits",
        "disk_mb": limits.disk_mb,
        "workdir": workdir,
        "uid": plan.uid,
        "cpu_s": max(1, round(limits.cpu_time_s)),
        "as_bytes": limits.memory_mb << 20,
        "nproc": nproc,
        "fsize": limits.max_file_mb << 20,
        "preamble": preamble,
        "block": list(BLOCKED_EVENTS) if plan.isolation == "rlimits" else [],
    }


def _run_local(
    plan: _Plan, python: str, limits: SandboxLimits, code: str, preamble: str
) -> RunResult:
    """Start the sandbox, feed it the code, collect capped output under the wall clock."""
    workdir = None if plan.isolation != "rlimits" else tempfile.mkdtemp(prefix="spear-sandbox-")
    home = "/tmp/work" if workdir is None else workdir
    read_fd, write_fd = os.pipe()
    cmd = [*_namespace_prefix(plan.isolation), python, "-I", "-B", "-X", "utf8", "-c", _BOOTSTRAP]
    start = time.monotonic()
    try:
        spec = _spec(plan, limits, workdir, write_fd, preamble)
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(write_fd,),
                cwd="/",
                env=_sandbox_env(home, "/tmp" if workdir is None else workdir),
                start_new_session=True,
            )
        except OSError as e:
            return RunResult("sandbox_error", detail=f"cannot start the sandbox: {e}")
        finally:
            os.close(write_fd)
        try:
            return _collect(proc, read_fd, limits, start, json.dumps(spec) + "\n" + code)
        finally:
            _kill_group(proc.pid)  # the leader is not reaped yet, so its group id is still ours
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    finally:
        os.close(read_fd)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _feed(proc: subprocess.Popen[bytes], payload: str) -> str | None:
    """Write the settings and code to the sandbox's stdin; an error text if it went away."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(payload.encode("utf-8", errors="replace"))
        proc.stdin.close()
    except (BrokenPipeError, OSError, UnicodeError) as e:
        return f"could not hand the code to the sandbox: {e}"
    return None


def _collect(
    proc: subprocess.Popen[bytes], status_fd: int, limits: SandboxLimits, start: float, payload: str
) -> RunResult:
    assert proc.stdout is not None and proc.stderr is not None
    feed_error = _feed(proc, payload)
    out, err = _CappedBuffer(limits.max_output_bytes), _CappedBuffer(limits.max_output_bytes)
    status = bytearray()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ, out)
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ, err)
    sel.register(status_fd, selectors.EVENT_READ, status)
    deadline = start + limits.wall_time_s
    grace_end: float | None = None
    timed_out = False
    while sel.get_map():
        now = time.monotonic()
        end = deadline if grace_end is None else min(deadline, grace_end)
        if now >= end:
            timed_out = grace_end is None or now >= deadline
            break
        for key, _ in sel.select(end - now):
            data = os.read(key.fd, 1 << 16)
            if not data:
                sel.unregister(key.fd)
                if key.fd == status_fd:
                    grace_end = time.monotonic() + _GRACE_S
            elif isinstance(key.data, _CappedBuffer):
                key.data.add(data)
            elif len(key.data) < 4096:
                key.data.extend(data)
    sel.close()
    wall = time.monotonic() - start
    base: dict[str, Any] = {
        "stdout": out.text(),
        "stderr": err.text(),
        "wall_s": wall,
        "stdout_bytes": out.total,
        "stderr_bytes": err.total,
    }
    if timed_out and not status:
        return RunResult("timeout", **base)
    return _classify(bytes(status), base, feed_error)


def _classify(status: bytes, base: dict[str, Any], feed_error: str | None) -> RunResult:
    """The outcome from the init's report (exit status) and the child's stderr."""
    try:
        report = json.loads(status) if status else {}
    except ValueError:
        report = {}
    if "exit" not in report:
        why = feed_error or _last_lines(base["stderr"], 2) or "the sandbox exited without a report"
        log.warning("sandbox failed: %s", why)
        return RunResult("sandbox_error", detail=why, **base)
    code = int(report["exit"])
    usage: dict[str, Any] = {
        "cpu_s": float(report["cpu_s"]),
        "max_rss_mb": report["max_rss_kb"] / 1024,
    }
    last = _last_lines(base["stderr"], 1)
    if code < 0:
        sig = -code
        outcome: Outcome = "cpu_timeout" if sig == signal.SIGXCPU else "killed"
        return RunResult(outcome, signal=sig, **usage, **base)
    if code == 0:
        return RunResult("ok", exit_code=0, **usage, **base)
    outcome = "memory" if _MEMORY_ERROR.match(last) else "error"
    return RunResult(outcome, exit_code=code, **usage, **base)


# ----------------------------------------------------------------------------------------------
# SandboxFusion backend


class SandboxFusionClient:
    """A SandboxFusion server's ``POST {url}/run_code`` (language python).

    Sends ``{"code", "language": "python", "run_timeout", "memory_limit_MB"}`` and reads the
    reply ``{"status": "Success" | "Failed" | "SandboxError", "message", "run_result":
    {"status": "Finished" | "Error" | "TimeLimitExceeded", "return_code", "stdout", "stderr",
    "execution_time"}}``. The HTTP request waits ``wall_time_s + request_slack_s``; the reply is
    read with a byte cap. The preamble is prepended to the code.
    """

    isolation = "sandbox-fusion"
    network = "remote"

    def __init__(self, url: str, limits: SandboxLimits, *, request_slack_s: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"SandboxFusion url must start with http:// or https://, got {url!r}")
        if not request_slack_s >= 0:
            raise ValueError(f"request_slack_s must be >= 0, got {request_slack_s}")
        self.url = url.rstrip("/") + "/run_code"
        self.limits = limits
        self.request_slack_s = request_slack_s

    def run(self, code: str, preamble: str) -> RunResult:
        """Run ``preamble`` + ``code`` on the server; every failure becomes a RunResult."""
        full = f"{preamble.rstrip()}\n{code}" if preamble.strip() else code
        body = json.dumps(
            {
                "code": full,
                "language": "python",
                "run_timeout": self.limits.wall_time_s,
                "memory_limit_MB": self.limits.memory_mb,
            }
        ).encode()
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        start = time.monotonic()
        cap = 4 * self.limits.max_output_bytes + (1 << 16)
        try:
            with urllib.request.urlopen(
                request, timeout=self.limits.wall_time_s + self.request_slack_s
            ) as resp:
                raw = resp.read(cap + 1)
        except urllib.error.HTTPError as e:
            return RunResult(
                "sandbox_error",
                detail=f"SandboxFusion answered HTTP {e.code}",
                wall_s=time.monotonic() - start,
            )
        except TimeoutError:
            return RunResult(
                "timeout",
                wall_s=time.monotonic() - start,
                detail="no reply from SandboxFusion in time",
            )
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                return RunResult(
                    "timeout",
                    wall_s=time.monotonic() - start,
                    detail="no reply from SandboxFusion in time",
                )
            return RunResult(
                "sandbox_error",
                detail=f"cannot reach SandboxFusion: {reason}",
                wall_s=time.monotonic() - start,
            )
        wall = time.monotonic() - start
        if len(raw) > cap:
            return RunResult(
                "sandbox_error", detail=f"SandboxFusion reply is over {cap} bytes", wall_s=wall
            )
        return self._parse(raw, wall)

    def _parse(self, raw: bytes, wall: float) -> RunResult:
        try:
            reply = json.loads(raw.decode("utf-8", errors="replace"))
        except ValueError:
            return RunResult("sandbox_error", detail="SandboxFusion reply is not JSON", wall_s=wall)
        if not isinstance(reply, dict):
            return RunResult(
                "sandbox_error", detail="SandboxFusion reply is not an object", wall_s=wall
            )
        run = reply.get("run_result")
        if reply.get("status") == "SandboxError" or not isinstance(run, dict):
            message = str(reply.get("message") or "no run result")[:300]
            return RunResult("sandbox_error", detail=f"SandboxFusion: {message}", wall_s=wall)
        stdout, stderr = (
            _cap_text(run.get("stdout"), self.limits),
            _cap_text(run.get("stderr"), self.limits),
        )
        base: dict[str, Any] = {
            "stdout": stdout,
            "stderr": stderr,
            "wall_s": wall,
            "stdout_bytes": len(stdout.encode()),
            "stderr_bytes": len(stderr.encode()),
        }
        code = run.get("return_code")
        exit_code = code if isinstance(code, int) and not isinstance(code, bool) else None
        if run.get("status") == "TimeLimitExceeded":
            return RunResult("timeout", exit_code=exit_code, **base)
        if exit_code == 0 and run.get("status") == "Finished":
            return RunResult("ok", exit_code=0, **base)
        if _MEMORY_ERROR.match(_last_lines(stderr, 1)):
            return RunResult("memory", exit_code=exit_code, **base)
        if exit_code is not None and exit_code < 0:
            return RunResult("killed", signal=-exit_code, **base)
        return RunResult("error", exit_code=exit_code, **base)


def _cap_text(value: Any, limits: SandboxLimits) -> str:
    if not isinstance(value, str):
        return ""
    buf = _CappedBuffer(limits.max_output_bytes)
    buf.add(value.encode("utf-8", errors="replace"))
    return buf.text()


# ----------------------------------------------------------------------------------------------
# The tool


class CodeInterpreter:
    """The ``code_interpreter`` tool: runs Python code on a sandbox backend, returns its output.

    ``isolation`` and ``network`` say how the backend isolates the code (see the module
    docstring); ``strip_fences`` removes markdown code fences around the argument.
    """

    name = "code_interpreter"
    description = (
        "Execute Python code in a sandbox and return its standard output. Print the values you "
        "need; each call starts from scratch."
    )
    parameters: dict[str, Any] = {  # noqa: RUF012 (the Tool protocol's plain attribute)
        "type": "object",
        "properties": {"code": {"type": "string", "description": "The Python code to run."}},
        "required": ["code"],
    }

    def __init__(self, backend: Backend, *, preamble: str = "", strip_fences: bool = True) -> None:
        self.backend = backend
        self.preamble = preamble
        self.strip_fences = strip_fences

    @property
    def isolation(self) -> str:
        return self.backend.isolation

    @property
    def network(self) -> str:
        return self.backend.network

    @property
    def limits(self) -> SandboxLimits:
        return self.backend.limits

    def run(self, code: Any) -> RunResult:
        """Check and clean ``code``, then run it; a bad argument gives a ``rejected`` result."""
        if not isinstance(code, str):
            return RunResult(
                "rejected", detail=f"'code' must be a string, got {type(code).__name__}"
            )
        if self.strip_fences:
            code = strip_code_fences(code)
        if not code.strip():
            return RunResult("rejected", detail="'code' is empty")
        if len(code) > self.limits.max_code_chars:
            return RunResult(
                "rejected", detail=f"'code' is longer than {self.limits.max_code_chars} characters"
            )
        return self.backend.run(code, self.preamble)

    def __call__(self, **arguments: Any) -> str:
        extra = sorted(set(arguments) - {"code"})
        if extra or "code" not in arguments:
            return "error: code_interpreter takes exactly one argument, 'code'"
        return format_result(self.run(arguments["code"]), self.limits)
