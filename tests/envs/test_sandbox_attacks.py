"""Attacks on the code sandbox, in both local modes.

The isolating mode this machine gives (``namespaces`` as root, ``userns`` otherwise) must hold
against each attack found on the fallback: reading another process's environment, signalling a
host process, forking past ``max_processes``, leaving a ``setsid`` orphan, writing the host's
``/tmp``, ``/var/tmp`` and ``/dev/shm``, running a program through ``_posixsubprocess`` (past the
audit hook) and using the network. The ``rlimits`` fallback isolates nothing: it must refuse to
start unless allowed, and then say what is exposed. Also: a virtualenv under ``/tmp`` stays
importable, and the small truths of the result texts (real-time signals, output sizes, the
CPU limit).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spear.envs.sandbox import (
    DEFAULT_LIMITS,
    CodeInterpreter,
    LocalSandbox,
    RunResult,
    SandboxUnsafe,
    format_result,
)
from spear.envs.sandbox_local import _detect, _Plan, exposure

LIMITS = dataclasses.replace(
    DEFAULT_LIMITS, wall_time_s=3.0, cpu_time_s=3.0, max_processes=8, max_output_chars=2000
)


def _isolating_mode() -> str | None:
    try:
        return LocalSandbox(LIMITS).isolation
    except SandboxUnsafe:
        return None


ISOLATING = _isolating_mode()
needs_isolation = pytest.mark.skipif(
    ISOLATING is None, reason="no namespaces here (only the unsafe fallback works)"
)


@pytest.fixture(scope="module")
def tool() -> CodeInterpreter:
    return CodeInterpreter(LocalSandbox(LIMITS))


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A host process with a secret in its environment."""
    proc = subprocess.Popen(["sleep", "60"], env={"SPEAR_SECRET": "hunter2-" + uuid.uuid4().hex})
    yield proc
    proc.kill()
    proc.wait()


# ---------------------------------------------------------------------------------------------
# Fail closed


def test_the_fallback_is_refused_unless_allowed() -> None:
    with pytest.raises(SandboxUnsafe, match=r"task\.sandbox_allow_unsafe=true") as e:
        LocalSandbox(LIMITS, isolation="rlimits")
    assert "no isolating sandbox" in str(e.value) and "\n" not in str(e.value)


def test_the_allowed_fallback_warns_what_is_exposed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="spear.envs.sandbox_local"):
        sb = LocalSandbox(LIMITS, isolation="rlimits", allow_unsafe=True)
    (warning,) = [r.getMessage() for r in caplog.records if "UNSAFE" in r.getMessage()]
    assert "network" in warning and "/tmp" in warning and "setsid" in warning
    assert "no security boundary" in warning
    assert sb.network == "host"


def test_exposure_of_the_fallback_as_the_trainers_user() -> None:
    text = exposure(_Plan("rlimits", None))
    assert f"uid {os.geteuid()}, the trainer's own user" in text
    assert "/proc/<pid>/environ" in text
    if os.geteuid() == 0:
        assert "RLIMIT_NPROC" in text
    assert exposure(_Plan("namespaces", 65534)) == ""


def test_the_math_task_refuses_an_unsafe_sandbox(monkeypatch, tmp_path: Path) -> None:
    from spear.envs import sandbox_local
    from spear.envs.math_task import MathParams, MathTasks
    from spear.envs.symbolic import CheckLimits

    monkeypatch.setattr(sandbox_local, "_detect", lambda *a: _Plan("rlimits", None))
    train = tmp_path / "t.jsonl"
    train.write_text('{"problem": "p", "answer": "1"}\n')
    args = ((str(train),), (), 5.0, 1, 512, 20, "local", None, 1024, 64, CheckLimits())
    with pytest.raises(SandboxUnsafe):
        MathTasks(MathParams(*args, sandbox_allow_unsafe=False)).tools()
    tool = MathTasks(MathParams(*args, sandbox_allow_unsafe=True)).tools()[0]
    assert tool.isolation == "rlimits"  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# The isolating mode holds against every attack


@needs_isolation
def test_cannot_read_another_process_environment(tool: CodeInterpreter, victim) -> None:
    code = (
        f"for pid in [{victim.pid}, {os.getpid()}, 1]:\n    try:\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n        print('DENIED', type(e).__name__)\n"
    )
    out = tool(code=code)
    assert "hunter2" not in out
    assert out.count("DENIED") >= 2  # the host's pids are not even visible


@needs_isolation
def test_cannot_signal_a_host_process(tool: CodeInterpreter, victim) -> None:
    out = tool(
        code=f"import os, signal\ntry:\n    os.kill({victim.pid}, signal.SIGKILL); print('KILLED')\n"
        "except OSError as e:\n    print('DENIED', type(e).__name__)"
    )
    assert out.startswith("DENIED")
    time.sleep(0.1)
    assert victim.poll() is None


@needs_isolation
def test_cannot_fork_past_the_process_limit(tool: CodeInterpreter) -> None:
    result = tool.run(
        "import os, time\nn = 0\nfor _ in range(100):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30); os._exit(0)\n"
        "    n += 1\nprint(n)"
    )
    assert result.outcome == "ok" and 1 <= int(result.stdout) <= LIMITS.max_processes


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                    if marker.encode() in fh.read():
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


@needs_isolation
def test_a_setsid_orphan_dies_with_the_call(tool: CodeInterpreter) -> None:
    marker = f"{time.monotonic_ns() % 10**6}.{os.getpid()}"  # an unusual sleep length
    out = tool(
        code="import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['/bin/sleep', {marker!r}])\n    os._exit(0)\n"
        "import time; time.sleep(0.3); print('left it running')"
    )
    assert out == "left it running"
    time.sleep(0.3)
    assert _processes_with(marker) == []


@needs_isolation
def test_cannot_write_the_hosts_shared_directories(tool: CodeInterpreter) -> None:
    name = f"spear-attack-{uuid.uuid4().hex}"
    paths = [f"{d}/{name}" for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(d)]
    out = tool(code=f"for p in {paths!r}:\n    open(p, 'w').write('x')\nprint('wrote')")
    assert out == "wrote"  # into the sandbox's private tmpfs ...
    assert [p for p in paths if os.path.exists(p)] == []  # ... never the host's


@needs_isolation
def test_a_program_it_runs_is_contained_too(tool: CodeInterpreter) -> None:
    # (the fallback's audit hook would refuse subprocess, but _posixsubprocess gets past it: the
    # isolating modes do not rely on it)
    target = Path(f"/root/spear-attack-{uuid.uuid4().hex}")
    shared = Path(f"/tmp/spear-attack-{uuid.uuid4().hex}")
    code = (
        "import subprocess\n"
        f"cmd = 'id -u; echo x > {target}; echo y > {shared}; echo done'\n"
        "print(subprocess.run(['/bin/sh', '-c', cmd], capture_output=True, text=True).stdout)"
    )
    out = tool(code=code)
    assert not target.exists() and not shared.exists()
    assert out.splitlines()[0] != "0" and out.splitlines()[-1] == "done", out


@needs_isolation
def test_no_network_even_past_the_audit_hook(tool: CodeInterpreter) -> None:
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.05)
    port = server.getsockname()[1]
    code = (
        "import _socket\ns = _socket.socket()\ntry:\n"
        f"    s.connect(('127.0.0.1', {port})); print('CONNECTED')\n"
        "except OSError as e:\n    print('BLOCKED', e)"
    )
    try:
        out = tool(code=code)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert out.startswith("BLOCKED")


# ---------------------------------------------------------------------------------------------
# The uid-switched fallback (as root): what a separate uid does protect


@pytest.mark.skipif(os.geteuid() != 0, reason="the fallback switches uid only when run as root")
def test_the_uid_switched_fallback_protects_other_processes(victim) -> None:
    try:
        plan = _detect(sys.executable, 65534, "rlimits")
    except RuntimeError as e:
        pytest.skip(f"no fallback mode here: {e}")
    if plan.uid is None:
        pytest.skip("the interpreter is unreadable for nobody: the fallback runs as root")
    tool = CodeInterpreter(LocalSandbox(LIMITS, isolation="rlimits", allow_unsafe=True))
    out = tool(
        code=f"import os\ntry:\n    print(open('/proc/{victim.pid}/environ', 'rb').read())\n"
        "except OSError as e:\n    print('DENIED', type(e).__name__)\n"
        f"try:\n    os.kill({victim.pid}, 9); print('KILLED')\n"
        "except OSError as e:\n    print('DENIED', type(e).__name__)"
    )
    assert "hunter2" not in out and out.count("DENIED") == 2
    assert victim.poll() is None


def test_non_root_run() -> None:
    if os.geteuid() != 0:
        assert _isolating_mode() in ("userns", None)
        return
    base = Path(sys.base_prefix)
    closed = [p for p in [base, *base.parents] if p.is_dir() and not p.stat().st_mode & 0o001]
    if closed:
        pytest.skip(
            f"a non-root run needs the interpreter readable by nobody; {closed[-1]} is closed"
        )
    code = "from spear.envs.sandbox import *; print(LocalSandbox(DEFAULT_LIMITS).isolation)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        user=65534,
        group=65534,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": "/"},
    )
    assert out.returncode == 0 and out.stdout.strip() == "userns", out.stderr[-500:]


# ---------------------------------------------------------------------------------------------
# A virtualenv under /tmp stays visible (read-only) in the private /tmp


@needs_isolation
def test_a_virtualenv_under_tmp_is_importable_and_read_only(tmp_path: Path) -> None:
    venv = Path(f"/tmp/spear-venv-{uuid.uuid4().hex}")
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
        )
        python = venv / "bin" / "python"
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        (Path(site) / "spear_probe.py").write_text("VALUE = 'from the venv'\n")
        tool = CodeInterpreter(LocalSandbox(LIMITS, python=str(python)))
        code = (
            "import sys, spear_probe\nprint(spear_probe.VALUE)\ntry:\n"
            "    open(sys.prefix + '/written', 'w'); print('WROTE')\n"
            "except OSError as e:\n    print('READ-ONLY', type(e).__name__)"
        )
        out = tool(code=code)
        assert out.splitlines()[0] == "from the venv", out
        assert out.splitlines()[1].startswith("READ-ONLY") and not (venv / "written").exists()
    finally:
        subprocess.run(["rm", "-rf", str(venv)], check=False)


# ---------------------------------------------------------------------------------------------
# Small truths


def test_a_real_time_signal_is_named(tool: CodeInterpreter) -> None:
    text = format_result(RunResult("killed", signal=40), LIMITS)
    assert "SIGRTMIN+" in text and "ValueError" not in text
    assert "signal 99" in format_result(RunResult("killed", signal=99), LIMITS)
    if ISOLATING is not None:
        out = tool(code="import os\nos.kill(os.getpid(), 40)")
        assert out.startswith("The code was killed by SIGRTMIN+"), out


def test_a_100_mb_print_says_how_much_was_printed(tool: CodeInterpreter) -> None:
    if ISOLATING is None:
        pytest.skip("no isolating sandbox here")
    text = tool(code="print('y' * 100_000_000)")
    assert "output truncated: 100000001 bytes printed in all" in text
    assert len(text) <= LIMITS.max_output_chars


def test_the_cpu_message_names_the_limit_in_force() -> None:
    limits = dataclasses.replace(LIMITS, wall_time_s=4.5, cpu_time_s=4.5)
    text = format_result(RunResult("cpu_timeout", signal=24), limits)
    assert "more than 5s of CPU time" in text  # RLIMIT_CPU is whole seconds, rounded up
    if ISOLATING is not None:
        quick = dataclasses.replace(LIMITS, wall_time_s=20.0, cpu_time_s=1.4)
        result = CodeInterpreter(LocalSandbox(quick)).run("while True: pass")
        # RLIMIT_CPU = 2 s (1.4 rounded up; it was rounded to 1 s before)
        assert result.outcome == "cpu_timeout" and 1.5 < (result.cpu_s or 0) < 2.5
