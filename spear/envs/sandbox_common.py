"""Shared pieces of the code sandbox: limits, the run record, the backend protocol, output
capping and the texts the model sees (see :mod:`spear.envs.sandbox`)."""

from __future__ import annotations

import logging
import math
import re
import signal
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
MEMORY_ERROR = re.compile(r"^([\w.]+\.)?_?\w*MemoryError\b")
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


def middle_truncate(text: str, limit: int, *, printed_bytes: int | None = None) -> str:
    """``text`` cut to at most ``limit`` characters, keeping head and tail around a marker that
    says how many characters were dropped, or, given ``printed_bytes`` (``text`` is already a
    capped excerpt of a longer output), how many bytes were printed in all."""
    if len(text) <= limit:
        return text

    def marker(dropped: int) -> str:
        if printed_bytes is not None:
            return f"\n...[output truncated: {printed_bytes} bytes printed in all]...\n"
        return f"\n...[{dropped} characters truncated]...\n"

    keep = max(0, limit - len(marker(len(text))))
    head, tail = keep - keep // 2, keep // 2
    return (text[:head] + marker(len(text) - keep) + (text[len(text) - tail :] if tail else ""))[
        :limit
    ]


def signal_name(sig: int) -> str:
    """``SIGKILL``, ``SIGRTMIN+6``, or ``signal 99`` (not every number is a ``signal.Signals``)."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        low, high = int(signal.SIGRTMIN), int(signal.SIGRTMAX)
        return f"SIGRTMIN+{sig - low}" if low <= sig <= high else f"signal {sig}"


def cpu_limit_s(limits: SandboxLimits) -> int:
    """The whole seconds ``RLIMIT_CPU`` is set to for ``limits.cpu_time_s`` (rounded up)."""
    return max(1, math.ceil(limits.cpu_time_s))


def last_lines(text: str, n: int) -> str:
    lines = [line for line in text.rstrip().splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def format_result(result: RunResult, limits: SandboxLimits) -> str:
    """The text the model sees for ``result`` (see the module docstring)."""
    out = result.stdout.strip("\n")
    partial = f"\nOutput before it was stopped:\n{out}" if out.strip() else ""
    last = last_lines(result.stderr, limits.error_lines)
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
            f"Timeout! The code used more than {cpu_limit_s(limits)}s of CPU time and was "
            f"stopped. Make it faster.{partial}"
        )
    elif result.outcome == "memory":
        why = f"\n{last}" if last else ""
        text = (
            f"Memory limit exceeded! The code tried to use more than {limits.memory_mb} MB "
            f"and was stopped. Use less memory.{why}"
        )
    elif result.outcome == "killed":
        name = signal_name(result.signal) if result.signal else "a signal"
        text = f"The code was killed by {name} (it may have run out of memory).{partial}"
    elif result.outcome == "rejected":
        text = f"error: {result.detail}"
    else:
        text = f"{API_FAILED} ({result.detail})" if result.detail else API_FAILED
    capped = result.stdout_bytes > len(result.stdout.encode("utf-8", errors="replace"))
    printed = result.stdout_bytes if capped else None  # the excerpt's own count would mislead
    return middle_truncate(text, limits.max_output_chars, printed_bytes=printed)


class CappedBuffer:
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


def cap_text(value: Any, limits: SandboxLimits) -> str:
    if not isinstance(value, str):
        return ""
    buf = CappedBuffer(limits.max_output_bytes)
    buf.add(value.encode("utf-8", errors="replace"))
    return buf.text()


# ----------------------------------------------------------------------------------------------
# The tool
