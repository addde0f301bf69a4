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
    directory is ``/tmp/work``, gone with the namespace) except the interpreter's own files
    (a virtualenv under ``/tmp``), which stay visible read-only, the user code runs as an unprivileged
    uid (``nobody`` by default) so it can write nothing of the host's, and ``RLIMIT_NPROC`` is
    enforced (root would bypass it). When the call ends, the PID namespace's init exits and the
    kernel kills every process left in it, even ones that called ``setsid``.
  - ``"userns"`` (not root, unprivileged user namespaces allowed): the same namespaces inside a
    new user namespace; ``RLIMIT_NPROC`` counts only the sandbox's own processes. The code keeps
    the invoking user's file permissions outside ``/tmp``.
  - ``"rlimits"`` (no namespaces, e.g. a container without ``CAP_SYS_ADMIN``): **no
    isolation**, so it is refused (:class:`SandboxUnsafe`) unless ``allow_unsafe``
    (``task.sandbox_allow_unsafe``), and then used with a warning that says what is exposed.
    Limits, a fresh session and a temporary working directory removed afterwards; as root the
    code runs as ``nobody`` where it can read the interpreter, else as the trainer's own user.
    The code shares the host's network (``network == "host"``), ``/tmp``, ``/var/tmp`` and
    ``/dev/shm``; a process that calls ``setsid`` outlives the call. An audit hook refuses
    sockets, ``subprocess``, ``os.system`` / ``exec*`` / ``posix_spawn`` and ``ctypes`` as a
    guard against accidents; it is no security boundary (native code gets past it).

* :class:`SandboxFusionClient`: a SandboxFusion server's ``POST /run_code`` API over HTTP
  (standard library only). Transport errors, HTTP errors, bad replies and timeouts become the
  same clear texts.
"""

from __future__ import annotations

import logging
from typing import Any

from spear.envs.sandbox_common import (
    API_FAILED,
    DEFAULT_LIMITS,
    EMPTY_STDOUT,
    ERRORS_HINT,
    MATH_PREAMBLE,
    Backend,
    RunResult,
    SandboxLimits,
    format_result,
    middle_truncate,
    strip_code_fences,
)
from spear.envs.sandbox_fusion import SandboxFusionClient
from spear.envs.sandbox_local import LocalSandbox, SandboxUnsafe

__all__ = [
    "API_FAILED",
    "DEFAULT_LIMITS",
    "EMPTY_STDOUT",
    "ERRORS_HINT",
    "MATH_PREAMBLE",
    "Backend",
    "CodeInterpreter",
    "LocalSandbox",
    "RunResult",
    "SandboxFusionClient",
    "SandboxLimits",
    "SandboxUnsafe",
    "format_result",
    "middle_truncate",
    "strip_code_fences",
]

log = logging.getLogger(__name__)


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
