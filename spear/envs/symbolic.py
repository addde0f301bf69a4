"""Symbolic answer checking (``math-verify``) with a hard time and memory bound.

``math-verify`` hands the answer to sympy, and a final answer such as ``\\boxed{2^{2^{40}}}``
makes sympy compute a huge power: in a thread it holds the GIL (so no timeout in the trainer
fires) and ``\\boxed{(x+1)^{100000}}`` grows without bound. :class:`SymbolicChecker` therefore
runs ``math-verify`` in child processes: each has an address-space limit (``RLIMIT_AS``), and
one that does not answer within the wall-clock limit is killed and replaced. A check that hit
either bound is a wrong answer, reported as a :class:`Verdict` that says why, so the trainer
counts it (``train/answer_check_timeouts``).

Children are kept between checks (starting one imports sympy, about 2 s) and reused, one per
concurrent check; they run in their own session, so a Ctrl-C in the terminal does not reach
them, and they die with the process that started them (``PR_SET_PDEATHSIG``) or when their
stdin closes.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 60.0  # importing sympy on a loaded machine; not part of a check's clock
MAX_IDLE = 4  # children kept for reuse

# The child: limits itself, imports math-verify, then answers one JSON line per request.
_WORKER = r"""
import ctypes, json, resource, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
except Exception:
    pass
limit = int(sys.argv[1]) << 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:
    from math_verify import parse, verify
    ready = True
except ImportError:
    ready = False
print(json.dumps({"ready": ready}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    try:
        gold = parse("$" + req["truth"] + "$", parsing_timeout=None)
        answer = parse("$" + req["pred"] + "$", parsing_timeout=None)
        reply = {"equal": bool(verify(gold, answer, timeout_seconds=None))}
    except MemoryError:
        reply = {"memory": True}
    except Exception as e:  # odd LaTeX: not equal
        reply = {"equal": False, "error": "%s: %s" % (type(e).__name__, e)}
    print(json.dumps(reply), flush=True)
"""


class Verdict(enum.Enum):
    """The outcome of one symbolic check; only ``EQUAL`` counts as a right answer."""

    EQUAL = "equal"
    DIFFERENT = "different"
    TIMEOUT = "timeout"  # killed at the wall-clock limit
    MEMORY = "memory"  # hit the address-space limit (or died of it)
    UNAVAILABLE = "unavailable"  # math-verify is not installed, or no child could start

    @property
    def bounded(self) -> bool:
        """Whether a limit of the checker stopped the check."""
        return self in (Verdict.TIMEOUT, Verdict.MEMORY)


@dataclass(frozen=True, slots=True)
class CheckLimits:
    """``timeout_s``: wall clock of one check; ``memory_mb``: address space of a child."""

    timeout_s: float = 5.0
    memory_mb: int = 512

    def __post_init__(self) -> None:
        if not 0 < self.timeout_s < float("inf"):
            raise ValueError(
                f"CheckLimits.timeout_s must be a finite number > 0, got {self.timeout_s!r}"
            )
        if self.memory_mb < 256:
            raise ValueError(
                f"CheckLimits.memory_mb must be >= 256 (sympy needs it), got {self.memory_mb}"
            )


_LIVE: weakref.WeakSet[SymbolicChecker] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for checker in list(_LIVE):
        checker.close()


class _Child:
    """One ``math-verify`` child process and its line protocol."""

    def __init__(self, memory_mb: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _WORKER, str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # the terminal's Ctrl-C is the trainer's to handle
        )
        self._buf = b""

    def read_line(self, timeout_s: float) -> dict | None:
        """The next reply, or None when none came within ``timeout_s`` or the child died."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                data = os.read(fd, 1 << 16)
                if not data:
                    return None
                self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return None

    def send(self, request: dict) -> bool:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            return False
        return True

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class SymbolicChecker:
    """``math-verify`` equivalence under :class:`CheckLimits` (see the module docstring);
    safe to call from many threads at once."""

    def __init__(self, limits: CheckLimits | None = None) -> None:
        self.limits = limits or CheckLimits()
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self._unavailable = False
        _LIVE.add(self)

    def check(self, pred: str, truth: str) -> Verdict:
        """Whether ``pred`` and ``truth`` are equivalent, or which bound stopped the check."""
        child = self._checkout()
        if child is None:
            return Verdict.UNAVAILABLE
        reply = (
            child.read_line(self.limits.timeout_s)
            if child.send({"pred": pred, "truth": truth})
            else None
        )
        if reply is None or "equal" not in reply:
            died = child.proc.poll() is not None
            child.kill()
            if reply is not None or died:  # a MemoryError reply, or killed by the limit
                log.info("answer check hit the %d MB limit: %r", self.limits.memory_mb, pred[:80])
                return Verdict.MEMORY
            log.info("answer check timed out after %gs: %r", self.limits.timeout_s, pred[:80])
            return Verdict.TIMEOUT
        self._checkin(child)
        return Verdict.EQUAL if reply["equal"] else Verdict.DIFFERENT

    def _checkout(self) -> _Child | None:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            if self._unavailable:
                return None
        try:
            child = _Child(self.limits.memory_mb)
        except OSError as e:
            log.warning("cannot start the answer checker: %s", e)
            return None
        hello = child.read_line(STARTUP_TIMEOUT_S)
        if hello is None or not hello.get("ready"):
            child.kill()
            why = "math-verify is not installed" if hello else "the child did not start"
            log.warning("symbolic answer checking is off: %s", why)
            with self._lock:  # a start costs seconds: do not retry on every answer
                self._unavailable = True
            return None
        return child

    def _checkin(self, child: _Child) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(child)
                return
        child.kill()

    def close(self) -> None:
        """Stop the idle children (running checks finish and are then stopped)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            child.kill()
