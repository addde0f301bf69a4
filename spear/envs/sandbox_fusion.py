"""A SandboxFusion server as a code sandbox backend (``POST /run_code``, standard library only)."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

from spear.envs.sandbox_common import MEMORY_ERROR, RunResult, SandboxLimits, cap_text, last_lines

log = logging.getLogger(__name__)


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
            cap_text(run.get("stdout"), self.limits),
            cap_text(run.get("stderr"), self.limits),
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
        if MEMORY_ERROR.match(last_lines(stderr, 1)):
            return RunResult("memory", exit_code=exit_code, **base)
        if exit_code is not None and exit_code < 0:
            return RunResult("killed", signal=-exit_code, **base)
        return RunResult("error", exit_code=exit_code, **base)
