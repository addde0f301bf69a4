"""Env-worker throughput of spear.distributed.RayEnvPool as the pool grows.

Steps ``--episodes`` episodes in lockstep rounds through ``RayEnvPool.step_many`` (one remote call
per worker per round) with 1, 2 and 4 workers, for three synthetic env profiles:

* ``cpu``: each step busy-waits ``--step-ms`` of CPU (a text game's or tool's Python work);
* ``wait``: each step sleeps ``--step-ms`` (a sandbox subprocess, an HTTP env server);
* ``noop``: each step returns at once: the per-call overhead of Ray, measured both batched
  (``step_many``) and per call (``RemoteEnv.step`` from a thread per episode, as the agent loop
  drives envs).

An in-process serial loop over the same envs (no Ray) is the baseline. Results are env steps per
second (median of ``--repeats``), with ratios against the serial loop and against the smallest
pool of the same run, printed (and written with ``--out``) as a Markdown table.

    python benchmarks/env_pool_throughput.py --workers 1 2 4 --out /tmp/env_pool_table.md

The recorded run and its reading are in ``benchmarks/env_pool_throughput.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray

from spear.distributed.env_pool import EnvHost, EnvPoolParams, RayEnvPool
from spear.envs.base import StepResult, Task


class SyntheticEnv:
    """An env whose step costs ``step_ms`` of this thread's CPU time (``busy``) or of waiting.

    CPU time, not wall time: on an oversubscribed machine a descheduled worker must still do
    all of its work, so the benchmark cannot overstate scaling."""

    def __init__(self, step_ms: float, busy: bool) -> None:
        self.step_s, self.busy = step_ms / 1000.0, busy

    def reset(self, task: Task, *, seed: int | None = None) -> tuple[list[Any], dict[str, Any]]:
        return [{"role": "user", "content": task.prompt}], {}

    def step(self, action_text: str) -> StepResult:
        if self.busy:
            end = time.thread_time() + self.step_s
            while time.thread_time() < end:
                pass
        else:
            time.sleep(self.step_s)
        return StepResult([{"role": "user", "content": action_text[::-1]}], 1.0, False)

    def close(self) -> None:
        pass


class EnvFactory:
    """A picklable ``make_env``."""

    def __init__(self, step_ms: float, busy: bool) -> None:
        self.step_ms, self.busy = step_ms, busy

    def __call__(self) -> SyntheticEnv:
        return SyntheticEnv(self.step_ms, self.busy)


def _tasks(n: int) -> list[Task]:
    return [Task(task_id=f"b{i}", prompt=f"task {i}") for i in range(n)]


def baseline(factory: EnvFactory, episodes: int, rounds: int) -> float:
    """Steps per second of a serial in-process loop over the same envs."""
    host = EnvHost(factory)
    for i, t in enumerate(_tasks(episodes)):
        host.reset(i, t, None)
    t0 = time.perf_counter()
    for _ in range(rounds):
        host.step_batch([(i, "act") for i in range(episodes)])
    return episodes * rounds / (time.perf_counter() - t0)


def pool_rate(factory: EnvFactory, workers: int, episodes: int, rounds: int, cpus: float) -> float:
    """Steps per second through a pool of ``workers`` actors (pool start-up not timed)."""
    params = EnvPoolParams(
        num_workers=workers, cpus_per_worker=cpus, call_timeout_s=60.0, start_timeout_s=120.0,
        max_concurrency=1,
    )  # fmt: skip
    pool = RayEnvPool(factory, params)
    try:
        handles = [pool.reset(t)[0] for t in _tasks(episodes)]
        pool.step_many([(h, "warm-up") for h in handles])
        t0 = time.perf_counter()
        for _ in range(rounds):
            results = pool.step_many([(h, "act") for h in handles])
            assert all("env_error" not in r.info for r in results)
        return episodes * rounds / (time.perf_counter() - t0)
    finally:
        pool.shutdown()


def per_call_rate(
    factory: EnvFactory, workers: int, episodes: int, rounds: int, cpus: float
) -> float:
    """Steps per second through ``RemoteEnv`` proxies, one thread per episode (the agent loop's
    way: one remote call per env step)."""
    params = EnvPoolParams(
        num_workers=workers, cpus_per_worker=cpus, call_timeout_s=60.0, start_timeout_s=120.0,
        max_concurrency=4,
    )  # fmt: skip
    pool = RayEnvPool(factory, params)
    try:
        envs = [pool.make_env() for _ in range(episodes)]
        for env, t in zip(envs, _tasks(episodes)):
            env.reset(t)
        with ThreadPoolExecutor(max_workers=episodes) as ex:
            list(ex.map(lambda e: e.step("warm-up"), envs))
            t0 = time.perf_counter()
            for _ in range(rounds):
                list(ex.map(lambda e: e.step("act"), envs))
            return episodes * rounds / (time.perf_counter() - t0)
    finally:
        pool.shutdown()


Row = tuple[str, str, float, float, float | None]  # profile, runner, steps/s, vs serial, vs 1st


def _measure(profile: str, factory: EnvFactory, args: argparse.Namespace, cpus: float) -> list[Row]:
    base = statistics.median(
        baseline(factory, args.episodes, args.rounds) for _ in range(args.repeats)
    )
    rows: list[Row] = [(profile, "in-process, serial", base, 1.0, None)]
    runners: list[tuple[str, Any]] = [("step_many", pool_rate)]
    if profile == "noop":
        runners.append(("RemoteEnv.step per call", per_call_rate))
    for name, fn in runners:
        first: float | None = None
        for w in args.workers:
            rate = statistics.median(
                fn(factory, w, args.episodes, args.rounds, cpus) for _ in range(args.repeats)
            )
            first = first or rate
            rows.append((profile, f"{w} worker(s), {name}", rate, rate / base, rate / first))
            print(
                f"{profile:5s} {w} workers {name}: {rate:9.1f} steps/s "
                f"(x{rate / base:.2f} serial, x{rate / first:.2f} vs {args.workers[0]} worker(s))",
                flush=True,
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    cpus_per_worker = args.cpus / max(args.workers)  # fractional: all pool sizes fit the cluster
    rows = []
    for profile, step_ms, busy in (
        ("cpu", args.step_ms, True),
        ("wait", args.step_ms, False),
        ("noop", 0.0, False),
    ):
        rows += _measure(profile, EnvFactory(step_ms, busy), args, cpus_per_worker)
    ray.shutdown()
    table = [
        f"| env profile | runner | env steps / s | vs in-process | vs {args.workers[0]} worker(s) |",
        "|---|---|---:|---:|---:|",
    ]
    table += [
        f"| {p} | {r} | {v:.1f} | {x:.2f}x | {'' if w is None else f'{w:.2f}x'} |"
        for p, r, v, x, w in rows
    ]
    text = "\n".join(table)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
