"""The sandboxed code interpreter: outputs, limits and containment on this machine."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spear.envs.base import Tool, tool_schema
from spear.envs.sandbox import (
    API_FAILED,
    DEFAULT_LIMITS,
    EMPTY_STDOUT,
    ERRORS_HINT,
    MATH_PREAMBLE,
    CodeInterpreter,
    LocalSandbox,
    SandboxFusionClient,
    SandboxLimits,
    middle_truncate,
    strip_code_fences,
)
from spear.envs.sandbox_common import CappedBuffer
from spear.envs.sandbox_local import _count_tasks

LIMITS = dataclasses.replace(
    DEFAULT_LIMITS,
    wall_time_s=2.0,
    cpu_time_s=2.0,
    max_processes=8,
    max_output_chars=2000,
    max_output_bytes=1 << 16,
)


@pytest.fixture(scope="module")
def sandbox() -> LocalSandbox:
    # where only the unisolated fallback works these tests still run it (they check limits)
    return LocalSandbox(LIMITS, allow_unsafe=True)


@pytest.fixture(scope="module")
def tool(sandbox: LocalSandbox) -> CodeInterpreter:
    return CodeInterpreter(sandbox)


def _nproc_enforced(sb: LocalSandbox) -> bool:
    return sb.isolation != "rlimits" or sb.run_as_uid is not None or os.geteuid() != 0


# ---------------------------------------------------------------------------------------------
# Texts


def test_is_a_tool_with_the_reference_schema(tool: CodeInterpreter) -> None:
    assert isinstance(tool, Tool)
    schema = tool_schema(tool)["function"]
    assert schema["name"] == "code_interpreter"
    assert schema["parameters"]["required"] == ["code"]


def test_success_returns_stdout(tool: CodeInterpreter) -> None:
    assert tool(code="print(6 * 7)") == "42"


def test_exception_gives_traceback_tail_and_hint(tool: CodeInterpreter) -> None:
    text = tool(code="x = 1\ny = x / 0\n")
    assert "ZeroDivisionError: division by zero" in text
    assert "line 2" in text and "y = x / 0" in text
    assert text.endswith(ERRORS_HINT)
    assert "bootstrap" not in text and 'File "<string>"' not in text  # sandbox frames hidden


def test_output_before_an_exception_is_kept(tool: CodeInterpreter) -> None:
    text = tool(code="print('partial')\nraise ValueError('bad value')")
    assert text.startswith("partial\n") and "ValueError: bad value" in text


def test_syntax_error_and_exit_code(tool: CodeInterpreter) -> None:
    assert "SyntaxError" in tool(code="def f(:\n  pass")
    result = tool.run("import sys; sys.exit(3)")
    assert result.outcome == "error" and result.exit_code == 3
    assert tool.run("raise SystemExit(0)").outcome == "ok"


def test_empty_stdout(tool: CodeInterpreter) -> None:
    assert tool(code="x = 2 + 2") == EMPTY_STDOUT


def test_fences_are_stripped_and_preamble_runs(sandbox: LocalSandbox) -> None:
    tool = CodeInterpreter(sandbox, preamble=MATH_PREAMBLE)
    assert tool(code="```python\nprint(math.comb(10, 3))\n```") == "120"
    assert tool(code="print(Fraction(1, 3) + Fraction(1, 6))") == "1/2"


def test_bad_arguments_are_rejected_without_running(tool: CodeInterpreter) -> None:
    assert tool(code=12).startswith("error: 'code' must be a string")
    assert tool(code="   ").startswith("error: 'code' is empty")
    assert tool(source="print(1)").startswith("error: code_interpreter takes exactly one argument")
    big = "#" * (LIMITS.max_code_chars + 1)
    assert "longer than" in tool(code=big)


# ---------------------------------------------------------------------------------------------
# Containment


def test_parent_environment_is_not_visible(
    tool: CodeInterpreter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPEAR_TEST_SECRET", "hunter2-do-not-leak")
    out = tool(
        code="import os\nprint(sorted(os.environ))\nprint(open('/proc/self/environ').read())"
    )
    assert "hunter2" not in out and "SPEAR_TEST_SECRET" not in out
    assert "'PATH'" in out and "'HOME'" in out


def test_cannot_write_outside_its_directory(
    sandbox: LocalSandbox, tool: CodeInterpreter, tmp_path: Path
) -> None:
    target = tmp_path / "escaped.txt"
    repo_file = Path(__file__).resolve().parents[2] / "sandbox-escape.txt"
    code = (
        f"import os\nfor p in [{str(target)!r}, {str(repo_file)!r}]:\n"
        "    try:\n        open(p, 'w').write('x'); print('WROTE', p)\n"
        "    except OSError as e:\n        print('DENIED', type(e).__name__)\n"
        "open('inside.txt', 'w').write('ok'); print(open('inside.txt').read())"
    )
    out = tool(code=code)
    if sandbox.isolation == "rlimits" and sandbox.run_as_uid is None and os.geteuid() == 0:
        repo_file.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        pytest.skip("rlimits mode as root without a uid switch cannot protect files")
    assert "WROTE" not in out and out.count("DENIED") == 2 and out.endswith("ok")
    assert not target.exists() and not repo_file.exists()


def test_private_tmp_leaves_no_trace(sandbox: LocalSandbox, tool: CodeInterpreter) -> None:
    if sandbox.isolation == "rlimits":
        pytest.skip("no private /tmp without a mount namespace")
    name = f"/tmp/spear-escape-{os.getpid()}-{time.monotonic_ns()}"
    assert tool(code=f"open({name!r}, 'w').write('x'); print('done')") == "done"
    assert not os.path.exists(name)


def test_working_directory_is_removed(sandbox: LocalSandbox) -> None:
    before = set(os.listdir("/tmp"))
    result = sandbox.run("import os; open('f.txt', 'w').write('x'); print(os.getcwd())", "")
    assert result.outcome == "ok"
    assert not os.path.exists(result.stdout.strip()) or sandbox.isolation != "rlimits"
    assert {n for n in set(os.listdir("/tmp")) - before if n.startswith("spear-sandbox-")} == set()


def test_no_network(tool: CodeInterpreter) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.05)
    port = server.getsockname()[1]
    code = (
        "import socket\ntry:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=1); print('CONNECTED')\n"
        "except OSError as e:\n    print('BLOCKED', e)"
    )
    try:
        out = tool(code=code)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert "CONNECTED" not in out and out.startswith("BLOCKED")


def test_process_count_is_limited(sandbox: LocalSandbox) -> None:
    if not _nproc_enforced(sandbox):
        pytest.skip("RLIMIT_NPROC is not enforced for root without a uid switch")
    code = (
        "import os, time\nn = 0\nfor _ in range(100):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30); os._exit(0)\n"
        "    n += 1\nprint(n)"
    )
    result = sandbox.run(code, "")
    assert result.outcome == "ok", result
    assert 1 <= int(result.stdout) <= LIMITS.max_processes


def test_fork_bomb_is_contained_and_cleaned_up(sandbox: LocalSandbox) -> None:
    if not _nproc_enforced(sandbox):
        pytest.skip("RLIMIT_NPROC is not enforced for root without a uid switch")
    uid = sandbox.run_as_uid if sandbox.run_as_uid is not None else os.geteuid()
    before = _count_tasks(uid)
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = sandbox.run(code, "")
    assert result.outcome == "timeout"  # the wall-clock limit ended it
    deadline = time.monotonic() + 30  # killed processes are reaped a moment later (longer on load)
    while _count_tasks(uid) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _count_tasks(uid) <= before  # every process of the bomb is gone


def test_infinite_loop_times_out(tool: CodeInterpreter) -> None:
    start = time.monotonic()
    text = tool(code="print('started', flush=True)\nwhile True:\n    pass")
    elapsed = time.monotonic() - start
    assert text.startswith("Timeout!") and "2s" in text and "started" in text
    assert elapsed >= LIMITS.wall_time_s  # not cut before the limit (no upper bound: load)


def test_cpu_limit(sandbox: LocalSandbox) -> None:
    # a wall clock far above the CPU limit: on a loaded machine one CPU second can take many
    # wall seconds, and the CPU limit must still be the one that fires
    limits = dataclasses.replace(LIMITS, wall_time_s=60.0, cpu_time_s=1.0)
    result = CodeInterpreter(
        LocalSandbox(limits, isolation=sandbox.isolation, allow_unsafe=True)
    ).run("while True: pass")  # type: ignore[arg-type]
    assert result.outcome == "cpu_timeout"  # the 1 s CPU limit, not the wall clock, ended it


def test_allocating_10_gb_is_a_memory_error(tool: CodeInterpreter) -> None:
    text = tool(code="x = bytearray(10 * 1024**3)\nprint(len(x))")
    assert text.startswith("Memory limit exceeded!") and "1024 MB" in text and "MemoryError" in text


def test_printing_100_mb_is_capped(tool: CodeInterpreter) -> None:
    result = tool.run(
        "import sys\nfor _ in range(100):\n    sys.stdout.write('y' * (1 << 20))\nprint('END')"
    )
    assert result.outcome == "ok" and result.stdout_bytes == 100 * (1 << 20) + 4
    assert len(result.stdout) < 2 * LIMITS.max_output_bytes
    assert "bytes not shown" in result.stdout and result.stdout.rstrip().endswith("END")
    text = tool(code="print('z' * (50 << 20))")
    assert len(text) <= LIMITS.max_output_chars  # says how much was really printed:
    assert f"output truncated: {(50 << 20) + 1} bytes printed in all" in text


def test_invalid_utf8_output_is_replaced(tool: CodeInterpreter) -> None:
    text = tool(code="import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe end\\n')")
    assert text == "ok \ufffd\ufffd end"


def test_reported_isolation(sandbox: LocalSandbox) -> None:
    assert sandbox.isolation in ("namespaces", "userns", "rlimits")
    assert sandbox.network == ("host" if sandbox.isolation == "rlimits" else "namespace")


def test_rlimits_mode_refuses_sockets_with_the_audit_hook() -> None:
    tool = CodeInterpreter(LocalSandbox(LIMITS, isolation="rlimits", allow_unsafe=True))
    assert tool.network == "host"  # the hook guards against accidents only
    out = tool(code="import socket\nsocket.socket()")
    assert "PermissionError: sandbox: socket.__new__ is not allowed" in out
    assert "not allowed" in tool(code="import subprocess\nsubprocess.run(['true'])")


# ---------------------------------------------------------------------------------------------
# Helpers and validation


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"wall_time_s": 0}, "wall_time_s"),
        ({"cpu_time_s": float("inf")}, "cpu_time_s"),
        ({"memory_mb": 10}, "memory_mb"),
        ({"max_processes": 0}, "max_processes"),
        ({"max_output_chars": 1.5}, "max_output_chars"),
        ({"error_lines": True}, "error_lines"),
    ],
)
def test_limits_are_validated(change: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(DEFAULT_LIMITS, **change)


def test_limits_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_LIMITS.memory_mb = 1  # type: ignore[misc]
    assert isinstance(DEFAULT_LIMITS, SandboxLimits)


def test_strip_code_fences() -> None:
    assert strip_code_fences("```python\nprint(1)\n```") == "print(1)\n"
    assert strip_code_fences("text\n```py\na=1\n```\nmore\n```\nb=2\n```") == "a=1\n\nb=2\n"
    assert strip_code_fences("print(1)") == "print(1)"
    assert strip_code_fences("```python\nprint(2)") == "print(2)"  # unclosed fence


def test_middle_truncate() -> None:
    assert middle_truncate("abc", 3) == "abc"
    text = middle_truncate("a" * 500 + "b" * 500, 200)
    assert len(text) <= 200 and text.startswith("a") and text.endswith("b")
    lines = text.split("\n")
    kept = len(lines[0]) + len(lines[-1])
    assert f"[{1000 - kept} characters truncated]" in text and kept > 100


def test_capped_buffer_keeps_head_and_tail() -> None:
    buf = CappedBuffer(10)
    for chunk in (b"01234", b"56789", b"abcde", b"fghij"):
        buf.add(chunk)
    assert buf.total == 20
    assert buf.text() == "01234\n...[output truncated: 10 bytes not shown]...\nfghij"
    small = CappedBuffer(100)
    small.add(b"hello")
    assert small.text() == "hello"


# ---------------------------------------------------------------------------------------------
# SandboxFusion backend against a fake server


class _FakeFusion(http.server.BaseHTTPRequestHandler):
    requests: list[dict[str, object]] = []  # noqa: RUF012

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeFusion.requests.append({"path": self.path, **body})
        code = body["code"]
        if "SLEEP" in code:
            time.sleep(1.5)
        if "HTTP500" in code:
            self.send_response(500)
            self.end_headers()
            return
        if "NOTJSON" in code:
            reply: bytes = b"<html>oops</html>"
        else:
            reply = json.dumps(_reply_for(code)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError):  # the timeout test hangs up first
            self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


def _reply_for(code: str) -> dict[str, object]:
    def run(status: str, rc: int | None, out: str, err: str) -> dict[str, object]:
        result = {
            "status": status,
            "return_code": rc,
            "stdout": out,
            "stderr": err,
            "execution_time": 0.01,
        }
        top = "Success" if status == "Finished" and rc == 0 else "Failed"
        return {"status": top, "message": "", "compile_result": None, "run_result": result}

    if "RAISE" in code:
        return run(
            "Finished",
            1,
            "",
            "Traceback (most recent call last):\n  File \"x.py\"\nKeyError: 'k'\n",
        )
    if "OOM" in code:
        return run("Finished", 1, "", "Traceback ...\nMemoryError\n")
    if "LOOP" in code:
        return run("TimeLimitExceeded", None, "", "")
    if "BROKEN" in code:
        return {"status": "SandboxError", "message": "worker crashed", "run_result": None}
    return run("Finished", 0, "42\n", "")


@pytest.fixture(scope="module")
def fusion_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeFusion)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fusion_success_and_request_format(fusion_url: str) -> None:
    limits = dataclasses.replace(LIMITS, wall_time_s=7.0, memory_mb=512)
    tool = CodeInterpreter(SandboxFusionClient(fusion_url + "/", limits), preamble="import math")
    assert tool.isolation == "sandbox-fusion"
    assert tool(code="```python\nprint(42)\n```") == "42"
    sent = _FakeFusion.requests[-1]
    assert sent == {
        "path": "/run_code",
        "code": "import math\nprint(42)\n",
        "language": "python",
        "run_timeout": 7.0,
        "memory_limit_MB": 512,
    }


def test_fusion_outcomes_become_clear_texts(fusion_url: str) -> None:
    tool = CodeInterpreter(SandboxFusionClient(fusion_url, LIMITS))
    error = tool(code="RAISE")
    assert "KeyError: 'k'" in error and error.endswith(ERRORS_HINT)
    assert tool(code="OOM").startswith("Memory limit exceeded!")
    assert tool(code="LOOP").startswith("Timeout!")
    assert tool(code="BROKEN") == f"{API_FAILED} (SandboxFusion: worker crashed)"
    assert tool(code="HTTP500") == f"{API_FAILED} (SandboxFusion answered HTTP 500)"
    assert tool(code="NOTJSON") == f"{API_FAILED} (SandboxFusion reply is not JSON)"


def test_fusion_timeout_and_unreachable(fusion_url: str) -> None:
    limits = dataclasses.replace(LIMITS, wall_time_s=0.3)
    client = SandboxFusionClient(fusion_url, limits, request_slack_s=0.0)
    result = client.run("SLEEP", "")  # the fake server answers after 1.5 s: only a cut times out
    assert result.outcome == "timeout"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    dead = CodeInterpreter(SandboxFusionClient(f"http://127.0.0.1:{port}", LIMITS))
    assert dead(code="print(1)").startswith(f"{API_FAILED} (cannot reach SandboxFusion")
    with pytest.raises(ValueError, match="http"):
        SandboxFusionClient("localhost:8080", LIMITS)
