"""The local subprocess backend of the code sandbox (:class:`LocalSandbox`); the isolation modes
are described in :mod:`spear.envs.sandbox`."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Literal

from spear.envs.sandbox_common import (
    DEFAULT_LIMITS,
    MEMORY_ERROR,
    NOBODY_UID,
    SAFE_PATH,
    CappedBuffer,
    Isolation,
    Outcome,
    RunResult,
    SandboxLimits,
    cpu_limit_s,
    last_lines,
)

log = logging.getLogger(__name__)

_PROBE_PREAMBLE = "import json, decimal, fractions\n"  # stdlib files must be readable
_GRACE_S = 0.2  # after the sandbox's init reported, how long stray writers may keep the pipes


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
    def bind(fd, target, readonly):
        src = ("/proc/self/fd/%d" % fd).encode()
        if libc.mount(src, target.encode(), None, 4096 | 16384, None) != 0:  # MS_BIND|MS_REC
            raise OSError(ctypes.get_errno(), "cannot bind " + target)
        # MS_REMOUNT|MS_BIND|MS_RDONLY|MS_NOSUID|MS_NODEV
        if readonly and libc.mount(None, target.encode(), None, 32 | 4096 | 1 | 2 | 4, None) != 0:
            raise OSError(ctypes.get_errno(), "cannot make %s read-only" % target)
    hidden = ("/tmp", "/var/tmp", "/dev/shm")
    # The interpreter's own files may live under a directory the private tmpfs covers (a venv
    # in /tmp): keep them visible, read-only, bound back over the new tmpfs.
    needed = sorted({os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, *sys.path]
                     if p and os.path.exists(p)})
    keep = {}
    for p in needed:
        if any(p.startswith(d + "/") for d in hidden) and not any(
                p.startswith(k + "/") for k in keep):
            keep[p] = os.open(p, os.O_PATH)
    opts = ("size=%dm,mode=1777" % spec["disk_mb"]).encode()
    for d in hidden:
        if os.path.isdir(d) and libc.mount(b"tmpfs", d.encode(), b"tmpfs", 6, opts) != 0:
            raise OSError(ctypes.get_errno(), "cannot mount a tmpfs on " + d)
    for p, fd in keep.items():
        if os.path.isdir("/proc/self/fd/%d" % fd):
            os.makedirs(p, 0o755)
        else:
            os.makedirs(os.path.dirname(p), 0o755, exist_ok=True)
            open(p, "w").close()
        parts = p.split("/")
        for i in range(3, len(parts)):  # the new parents must let the unprivileged uid through
            os.chmod("/".join(parts[:i]), 0o755)
        bind(fd, p, True)
        os.close(fd)
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
                bind(fd, target, False)
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

# Audit events refused in the "rlimits" mode, where no network namespace exists: a guard
# against accidents, not a security boundary (native code, e.g. through ctypes loaded before
# the hook or _posixsubprocess, does not raise these events).
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


class SandboxUnsafe(RuntimeError):
    """No isolating sandbox mode works here and the unsafe fallback was not allowed."""


def exposure(plan: _Plan) -> str:
    """What code run under ``plan`` can reach on this machine (empty for the isolating modes)."""
    if plan.isolation != "rlimits":
        return ""
    common = (
        "the host's network (an audit hook refuses sockets and programs, but it is no security "
        "boundary: native code gets past it), the world-writable /tmp, /var/tmp and /dev/shm, "
        "and a process that calls setsid outlives the call"
    )
    if plan.uid is not None:
        return f"the code runs on the host as uid {plan.uid}: {common}"
    return (
        f"the code runs on the host as uid {os.geteuid()}, the trainer's own user: every file, "
        "process (its /proc/<pid>/environ, signals) and secret of that user, "
        + ("no process limit (root is exempt from RLIMIT_NPROC), " if os.geteuid() == 0 else "")
        + common
    )


class LocalSandbox:
    """Runs code in a fresh, limited subprocess (see the module docstring).

    ``isolation="auto"`` picks the strongest mode that works here (probed once per interpreter
    and uid); a named mode is used as given. ``uid``: the unprivileged uid the code runs as when
    this process is root (default ``nobody``). The ``rlimits`` mode isolates nothing (see
    :func:`exposure`): it is refused with :class:`SandboxUnsafe` unless ``allow_unsafe``, and
    then used with a warning that says what the code can reach.
    """

    def __init__(
        self,
        limits: SandboxLimits,
        *,
        isolation: Isolation | Literal["auto"] = "auto",
        python: str | None = None,
        uid: int = NOBODY_UID,
        allow_unsafe: bool = False,
    ) -> None:
        self.limits = limits
        self.python = python or sys.executable
        self.uid = uid
        plan = _detect(self.python, uid, None if isolation == "auto" else isolation)
        exposed = exposure(plan)
        if exposed and not allow_unsafe:
            raise SandboxUnsafe(
                "code_interpreter has no isolating sandbox here (user and mount namespaces "
                f"failed; see `spear -v` for why); {exposed}. Set "
                "task.sandbox_allow_unsafe=true to run it anyway, or task.sandbox=fusion"
            )
        if exposed:
            log.warning("UNSAFE code sandbox (task.sandbox_allow_unsafe): %s", exposed)
        self._plan = plan
        self.isolation: str = plan.isolation
        self.network: str = "namespace" if plan.isolation != "rlimits" else "host"
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
        "cpu_s": cpu_limit_s(limits),
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
    out, err = CappedBuffer(limits.max_output_bytes), CappedBuffer(limits.max_output_bytes)
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
            elif isinstance(key.data, CappedBuffer):
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
        why = feed_error or last_lines(base["stderr"], 2) or "the sandbox exited without a report"
        log.warning("sandbox failed: %s", why)
        return RunResult("sandbox_error", detail=why, **base)
    code = int(report["exit"])
    usage: dict[str, Any] = {
        "cpu_s": float(report["cpu_s"]),
        "max_rss_mb": report["max_rss_kb"] / 1024,
    }
    last = last_lines(base["stderr"], 1)
    if code < 0:
        sig = -code
        outcome: Outcome = "cpu_timeout" if sig == signal.SIGXCPU else "killed"
        return RunResult(outcome, signal=sig, **usage, **base)
    if code == 0:
        return RunResult("ok", exit_code=0, **usage, **base)
    outcome = "memory" if MEMORY_ERROR.match(last) else "error"
    return RunResult(outcome, exit_code=code, **usage, **base)


# ----------------------------------------------------------------------------------------------
# SandboxFusion backend
