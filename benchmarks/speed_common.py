"""Shared pieces of the speed benchmarks (``speed_stages.py``, ``speed_scaling.py``,
``trl_compare.py``): configs with the default run's budget, a step worker process driven over
stdin/stdout (so two trainers can be interleaved step by step in separate processes, each with its
own peak RSS), machine facts, and robust summaries (median, min, max of per-pair ratios).

Worker protocol (``python benchmarks/speed_common.py worker --method M [--set k=v ...]``): the
worker builds a :class:`spear.trainer.Trainer`, prints one JSON line ``{"ready": ...}``, then for
every line ``step`` on stdin runs one ``train_step`` and prints one JSON line with the step's
wall seconds, its metrics and the process's peak RSS; ``quit`` ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results" / "speed"
DEFAULT_CACHE = "/tmp/spear-cache"


def build_config(
    method: str, overrides: Sequence[str], cache_dir: str, threads: int, seed: int = 0
) -> Any:
    """The config of ``method`` with the default run's budget, built by the same rules as
    ``benchmarks/learning.py`` (its method table and budget sections), plus ``overrides``."""
    from spear.config import DEFAULT_RUN_CONFIG

    sys.path.insert(0, str(ROOT))
    import learning

    return learning.method_config(
        learning.METHODS[method], DEFAULT_RUN_CONFIG, learning.BUDGET_SECTIONS,
        learning.SPEAR_SECTIONS, [*learning.run_overrides(seed, 0, threads, cache_dir), *overrides],
    )  # fmt: skip


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    """CPU, core count, load averages and library versions, for the result files."""
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads_driver": torch.get_num_threads(),  # workers set their own (--threads)
    }


def write_result(
    out: Path,
    summary: Any,
    rows: Any,
    load_before: list[float],
    *,
    extra: dict[str, Any] | None = None,
    plot: Callable[[Path], None] | None = None,
) -> None:
    """Write a benchmark's result file (command, machine with the load average at the start,
    ``extra`` fields, summary, raw rows), draw its plot next to it (``.png``) and print the
    summary."""
    result = {
        "command": " ".join(["python", *sys.argv]),
        **(extra or {}),
        "machine": {**machine(), "loadavg_before": load_before},
        "summary": summary,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if plot is not None:
        plot(out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))


def ratio_summary(ratios: Sequence[float]) -> dict[str, float]:
    """Median, min and max of per-pair ratios."""
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "n": len(ratios),
    }


# ------------------------------------------------------------------------------ worker


class Worker:
    """A training process stepped one ``train_step`` at a time over a pipe."""

    def __init__(self, cmd: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            bufsize=1,
        )
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.proc.args} exited with {self.proc.wait()}")
            if line.startswith("{"):
                try:
                    return json.loads(line)  # type: ignore[no-any-return]
                except json.JSONDecodeError:  # other output that starts with "{" (TRL's log dicts)
                    continue

    def step(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        self.proc.wait(timeout=120)


def spear_worker_cmd(
    method: str,
    overrides: Sequence[str],
    cache_dir: str,
    threads: int,
    *,
    force_length: bool = False,
) -> list[str]:
    cmd = [sys.executable, str(ROOT / "speed_common.py"), "worker", "--method", method,
           "--cache-dir", cache_dir, "--threads", str(threads)]  # fmt: skip
    if force_length:
        cmd.append("--force-length")
    for o in overrides:
        cmd += ["--set", o]
    return cmd


class Probes:
    """Wall seconds of the untimed parts of a step (rewards, filters, advantages, replay add /
    consume), by wrapping the functions the trainer calls; benchmark-side only."""

    NAMES = ("assign_rewards", "apply_response_filters", "apply_group_filter", "compute_advantages")

    def __init__(self, trainer: Any) -> None:
        import spear.trainer as T

        self.seconds: dict[str, float] = {}
        for name in self.NAMES:
            setattr(T, name, self._wrap(name, getattr(T, name)))
        buf = trainer.c.buffer
        if buf is not None:
            buf.add = self._wrap("replay_add", buf.add)
            buf.consume = self._wrap("replay_consume", buf.consume)

    def _wrap(self, name: str, fn: Any) -> Any:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = {f"probe/{k}": v for k, v in self.seconds.items()}, {}
        return out


class CpuProbes:
    """Process CPU seconds (``time.process_time``, all threads) per stage of a step.

    CPU time counts the work a process did whatever else the machine runs, so on a shared,
    oversubscribed machine it is a much steadier measure than wall time; the workers run torch
    with one thread, so CPU seconds ~ wall seconds on an idle core. Stages: generation (the
    engine), rollout (the whole agent loop), old log-probs, the on-policy update and the SIL
    update (replay consume + its update).
    """

    def __init__(self, trainer: Any) -> None:
        import spear.trainer as T

        self.seconds: dict[str, float] = {}
        engine = trainer.c.engine
        engine.generate = self._wrap("generation", engine.generate)
        T.fill_old_logprobs = self._wrap("old_logprobs", T.fill_old_logprobs)
        trainer._rollout = self._wrap("rollout", trainer._rollout)
        trainer._self_imitation = self._wrap("sil_update", trainer._self_imitation)
        update = trainer._update

        def timed_update(*a: Any, **k: Any) -> Any:
            return self._wrap("update" if k.get("prefix") == "actor" else "sil_inner", update)(
                *a, **k
            )

        trainer._update = timed_update

    def _wrap(self, name: str, fn: Any) -> Any:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.process_time() - t0

        return timed

    def take(self) -> dict[str, float]:
        s, self.seconds = self.seconds, {}
        return {f"cpu/{k}": v for k, v in s.items() if k != "sil_inner"}


def _serve(args: argparse.Namespace) -> None:
    import torch

    from spear.trainer import Trainer

    cfg = build_config(args.method, args.set or [], args.cache_dir, args.threads)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        probes, cpu = Probes(trainer), CpuProbes(trainer)
        if args.force_length:  # no stop token: every turn samples exactly max_new_tokens
            from dataclasses import replace

            lp = trainer.c.loop_params
            trainer.c.loop_params = replace(
                lp, sampling=replace(lp.sampling, stop_token_ids=(-1,), stop_strings=None)
            )
        print(
            json.dumps({"ready": True, "method": args.method, "rss_mb": peak_rss_mb()}), flush=True
        )
        for line in sys.stdin:
            if line.strip() != "step":
                break
            t0, c0 = time.perf_counter(), time.process_time()
            m = trainer.train_step()
            wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            m.update(probes.take())
            m.update(cpu.take())
            m["cpu/step"] = cpu_s
            m["tokens"] = (
                m["throughput/tokens_per_s"] * m["time/step"]
            )  # sequence tokens of the step
            print(
                json.dumps(
                    {"wall_s": wall, "cpu_s": cpu_s, "metrics": m, "peak_rss_mb": peak_rss_mb()}
                ),
                flush=True,
            )
        trainer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--method", required=True)
    w.add_argument("--set", action="append", help="config override key=value (repeatable)")
    w.add_argument("--cache-dir", default=DEFAULT_CACHE)
    w.add_argument("--threads", type=int, default=1)
    w.add_argument(
        "--force-length", action="store_true", help="disable stop tokens (fixed-length turns)"
    )
    args = p.parse_args()
    if args.cmd == "worker":
        _serve(args)


if __name__ == "__main__":
    main()
