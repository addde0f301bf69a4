"""Environment workers as Ray actors: a pool that survives crashed and hung workers.

Each worker is a Ray actor (an :class:`EnvHost`) holding many envs, one per live episode, created
from a user ``make_env`` factory. The driver talks to the pool in two ways:

* :meth:`RayEnvPool.make_env` returns a :class:`RemoteEnv`, a drop-in :class:`~spear.envs.base.Env`
  for the agent loop (``spear.rollout.loop.run_episodes(make_env=pool.make_env, ...)``). A step
  that fails raises :class:`EnvWorkerError`; the loop ends that episode as ``ENV_ERROR``.
* :meth:`RayEnvPool.step_many` steps a batch of episodes with one remote call per worker and
  returns a :class:`~spear.envs.base.StepResult` per episode; a failed one is
  :func:`env_error_result` (terminated, reward 0, ``info["env_error"]`` says why).

Failure model. Every remote call has a deadline (``call_timeout_s`` per env call). A worker that
misses it, or whose process died, is treated as crashed: it is killed and replaced by a fresh
actor, and every episode it hosted ends as failed (their later calls fail at once with "episode
lost"). An env that raises inside a healthy worker fails only its own episode. All of it is
counted in :class:`PoolStats`.

Sizing. Actors request ``cpus_per_worker`` CPUs, which may be fractional: a 2-core machine has
only 2 whole CPUs and an actor asking for more than any node has waits forever, so the pool
checks the request against the cluster and every start waits at most ``start_timeout_s``.

Ray is imported lazily (``pip install 'spear[ray]'``); this module imports without it.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from spear.envs.base import Env, StepResult, Task
from spear.types import Message

log = logging.getLogger(__name__)

ENV_RAISED = "env raised"  # prefix of the error text of an env that raised in a healthy worker


class EnvWorkerError(RuntimeError):
    """An env call failed: the worker crashed or timed out, or the env raised. Episode failed."""


class EnvPoolError(RuntimeError):
    """The pool cannot run at all (Ray missing, workers cannot be scheduled)."""


@dataclass(frozen=True)
class EnvPoolParams:
    """``num_workers`` Ray actors of ``cpus_per_worker`` CPUs (fractions allowed), each running
    up to ``max_concurrency`` env calls at once (threads); ``call_timeout_s`` per env call,
    ``start_timeout_s`` for a new actor to answer its first ping."""

    num_workers: int
    cpus_per_worker: float
    call_timeout_s: float
    start_timeout_s: float
    max_concurrency: int

    def __post_init__(self) -> None:
        check_fields(
            self, at_least_one=("num_workers", "max_concurrency"),
            positive=("cpus_per_worker", "call_timeout_s", "start_timeout_s"),
        )  # fmt: skip


def check_fields(
    params: Any,
    *,
    at_least_one: Sequence[str] = (),
    positive: Sequence[str] = (),
    non_negative: Sequence[str] = (),
) -> None:
    """Validate a worker-parameter record's fields by name: counts ``>= 1``, finite ``> 0`` and
    finite ``>= 0`` numbers; the error names the field."""
    for name in at_least_one:
        if getattr(params, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(params, name)}")
    for name in positive:
        value = getattr(params, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be > 0 and finite, got {value}")
    for name in non_negative:
        value = getattr(params, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be >= 0 and finite, got {value}")


@dataclass
class PoolStats:
    """Counters of one pool's lifetime."""

    calls: int = 0  # remote env calls issued (reset / step / step_batch)
    crashes: int = 0  # worker processes found dead
    timeouts: int = 0  # calls that missed their deadline (the worker is then restarted)
    restarts: int = 0  # replacement actors started
    env_errors: int = 0  # env calls that raised inside a healthy worker
    failed_episodes: int = 0  # episodes lost to any of the above


@dataclass(frozen=True)
class EnvHandle:
    """One episode's env: which worker, which incarnation of it, which env on it."""

    worker: int
    generation: int
    env_id: int


def env_error_result(reason: str) -> StepResult:
    """The result standing in for a failed env call: the episode ends, unrewarded."""
    return StepResult(
        messages=[], reward=0.0, terminated=True, info={"env_error": reason, "success": False}
    )


def _env_raised(result: StepResult) -> bool:
    return str(result.info.get("env_error", "")).startswith(ENV_RAISED)


def pick_worker(loads: Sequence[int]) -> int:
    """Index of the least-loaded worker (fewest live envs; the lowest index on ties)."""
    if not loads:
        raise ValueError("loads is empty: the pool has no workers")
    return min(range(len(loads)), key=lambda i: (loads[i], i))


def check_cpu_request(cpus_per_worker: float, num_workers: int, node_cpus: Sequence[float]) -> None:
    """Raise if no node can host one worker or the cluster cannot host them all at once."""
    largest, total = max(node_cpus, default=0.0), sum(node_cpus)
    if cpus_per_worker > largest:
        raise EnvPoolError(
            f"cpus_per_worker={cpus_per_worker:g} but the largest Ray node has {largest:g} CPUs; "
            "such an actor would wait forever. Request a fraction (e.g. 0.25)."
        )
    if cpus_per_worker * num_workers > total + 1e-9:
        raise EnvPoolError(
            f"num_workers={num_workers} x cpus_per_worker={cpus_per_worker:g} exceeds the "
            f"cluster's {total:g} CPUs; lower cpus_per_worker (fractions are fine) or workers."
        )


class EnvHost:
    """The envs of one worker. Runs inside a Ray actor; a plain class, usable in-process."""

    def __init__(self, make_env: Callable[[], Env]) -> None:
        self._make_env = make_env
        self._envs: dict[int, Env] = {}
        self._lock = threading.Lock()

    def ping(self) -> int:
        return os.getpid()

    def _env(self, env_id: int) -> Env:
        with self._lock:
            env = self._envs.get(env_id)
        if env is None:
            raise KeyError(f"env {env_id} does not exist on this worker (never reset, or closed)")
        return env

    def reset(
        self, env_id: int, task: Task, seed: int | None
    ) -> tuple[list[Message], dict[str, Any]]:
        with self._lock:
            env = self._envs.get(env_id)
        if env is None:
            env = self._make_env()
            with self._lock:
                self._envs[env_id] = env
        return env.reset(task, seed=seed)

    def step(self, env_id: int, action_text: str) -> StepResult:
        return self._env(env_id).step(action_text)

    def step_batch(self, items: Sequence[tuple[int, str]]) -> list[StepResult]:
        """Step several envs in order; an env that raises gets :func:`env_error_result`."""
        out = []
        for env_id, action in items:
            try:
                out.append(self.step(env_id, action))
            except Exception as exc:
                out.append(env_error_result(f"{ENV_RAISED} {type(exc).__name__}: {exc}"))
        return out

    def close(self, env_id: int) -> None:
        with self._lock:
            env = self._envs.pop(env_id, None)
        if env is not None:
            env.close()

    def num_envs(self) -> int:
        with self._lock:
            return len(self._envs)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EnvPoolError("the Ray backend needs ray: pip install 'spear[ray]'") from None
    return ray


def await_actors(
    actors: Sequence[Any], timeout_s: float, failure: Callable[[Exception], str]
) -> None:
    """Wait until every actor answers ``ping``; otherwise kill them all and raise
    :class:`EnvPoolError` with ``failure(exc)`` as its message."""
    ray = _ray()
    try:
        ray.get([a.ping.remote() for a in actors], timeout=timeout_s)
    except Exception as exc:
        for a in actors:
            ray.kill(a, no_restart=True)
        raise EnvPoolError(failure(exc)) from None


def init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to a cluster (``address``, e.g. ``"auto"``) or start a local one of ``num_cpus``.

    Returns False when Ray was already initialised in this process (nothing done), else True
    (the caller then owns the connection and shuts it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, include_dashboard=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    return True


@dataclass
class _Slot:
    actor: Any
    generation: int
    live: set[int] = field(default_factory=set)


class RayEnvPool:
    """A pool of env-worker actors; see the module docstring for the failure model."""

    def __init__(self, make_env: Callable[[], Env], params: EnvPoolParams) -> None:
        ray = _ray()
        if not ray.is_initialized():
            raise EnvPoolError("Ray is not initialised: call spear.distributed.init_ray first")
        nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        check_cpu_request(params.cpus_per_worker, params.num_workers, nodes)
        self.params, self.stats = params, PoolStats()
        self._make_env = make_env
        self._actor_cls = ray.remote(EnvHost).options(
            num_cpus=params.cpus_per_worker, max_concurrency=params.max_concurrency, max_restarts=0
        )
        self._lock = threading.Lock()
        self._ids = itertools.count()
        actors = [self._actor_cls.remote(make_env) for _ in range(params.num_workers)]
        self._await_ready(actors)
        self._slots = [_Slot(actor=a, generation=0) for a in actors]

    # -- lifecycle ------------------------------------------------------------------------------

    def _await_ready(self, actors: Sequence[Any]) -> None:
        await_actors(
            actors,
            self.params.start_timeout_s,
            lambda exc: (
                f"{len(actors)} env worker(s) did not start within start_timeout_s="
                f"{self.params.start_timeout_s:g}s ({type(exc).__name__}); with too few free "
                "CPUs Ray queues actors forever: lower cpus_per_worker."
            ),
        )

    def _restart(self, worker: int, generation: int, kind: str, reason: str) -> None:
        """Replace worker ``worker`` if it is still incarnation ``generation``; count the loss."""
        ray = _ray()
        with self._lock:
            slot = self._slots[worker]
            if slot.generation != generation:
                return  # another thread already replaced it
            self.stats.timeouts += kind == "timeout"
            self.stats.crashes += kind == "crash"
            self.stats.failed_episodes += len(slot.live)
            log.warning(
                "env worker %d %s (%s); restarting it, %d episode(s) lost",
                worker,
                "timed out" if kind == "timeout" else "crashed",
                reason,
                len(slot.live),
            )
            ray.kill(slot.actor, no_restart=True)
            actor = self._actor_cls.remote(self._make_env)  # calls queue until it is up
            self._slots[worker] = _Slot(actor=actor, generation=generation + 1)
            self.stats.restarts += 1
        self._await_ready([actor])

    def shutdown(self) -> None:
        """Kill every worker; the pool is unusable afterwards."""
        ray = _ray()
        with self._lock:
            for slot in self._slots:
                ray.kill(slot.actor, no_restart=True)
            self._slots = []

    # -- calls ----------------------------------------------------------------------------------

    def _current(self, handle: EnvHandle) -> _Slot | None:
        with self._lock:
            slot = self._slots[handle.worker]
            return slot if slot.generation == handle.generation else None

    def _episode_failed(self, handle: EnvHandle, env_ids: Sequence[int]) -> None:
        """Count env errors of a healthy worker: those episodes are over (not live any more)."""
        with self._lock:
            self.stats.env_errors += len(env_ids)
            self.stats.failed_episodes += len(env_ids)
            slot = self._slots[handle.worker]
            if slot.generation == handle.generation:
                slot.live.difference_update(env_ids)

    def _get(self, handle: EnvHandle, ref: Any, timeout_s: float, env_ids: Sequence[int]) -> Any:
        """``ray.get`` with a deadline; crashes, timeouts and env errors become EnvWorkerError.

        ``env_ids`` are the episodes the call concerns (failed if the env raised)."""
        ray = _ray()
        errors = ray.exceptions
        try:
            return ray.get(ref, timeout=timeout_s)
        except errors.GetTimeoutError:
            self._restart(
                handle.worker, handle.generation, "timeout", f"no answer in {timeout_s:g}s"
            )
            raise EnvWorkerError(
                f"env worker {handle.worker} timed out after {timeout_s:g}s"
            ) from None
        except errors.RayActorError as exc:
            self._restart(handle.worker, handle.generation, "crash", type(exc).__name__)
            raise EnvWorkerError(
                f"env worker {handle.worker} crashed ({type(exc).__name__})"
            ) from None
        except errors.RayTaskError as exc:
            cause = getattr(exc, "cause", None) or exc
            self._episode_failed(handle, env_ids)
            raise EnvWorkerError(f"{ENV_RAISED} {type(cause).__name__}: {cause}") from None

    def reset(
        self, task: Task, seed: int | None = None, handle: EnvHandle | None = None
    ) -> tuple[EnvHandle, list[Message], dict[str, Any]]:
        """Start an episode of ``task`` (on ``handle``'s env if still alive, else a new one)."""
        with self._lock:
            if handle is None or self._slots[handle.worker].generation != handle.generation:
                worker = pick_worker([len(s.live) for s in self._slots])
                handle = EnvHandle(worker, self._slots[worker].generation, next(self._ids))
            slot = self._slots[handle.worker]
            slot.live.add(handle.env_id)
            self.stats.calls += 1
            ref = slot.actor.reset.remote(handle.env_id, task, seed)
        messages, info = self._get(handle, ref, self.params.call_timeout_s, [handle.env_id])
        return handle, messages, info

    def step(self, handle: EnvHandle, action_text: str) -> StepResult:
        """Step one episode; raises :class:`EnvWorkerError` if it failed."""
        slot = self._current(handle)
        if slot is None:
            raise EnvWorkerError(f"episode lost: env worker {handle.worker} was restarted")
        with self._lock:
            self.stats.calls += 1
        ref = slot.actor.step.remote(handle.env_id, action_text)
        result: StepResult = self._get(handle, ref, self.params.call_timeout_s, [handle.env_id])
        return result

    def step_many(self, actions: Sequence[tuple[EnvHandle, str]]) -> list[StepResult]:
        """Step many episodes, one remote call per worker; failures become env-error results."""
        out: list[StepResult | None] = [None] * len(actions)
        by_worker: dict[EnvHandle, list[int]] = {}
        with self._lock:
            for i, (h, _) in enumerate(actions):
                if self._slots[h.worker].generation != h.generation:
                    out[i] = env_error_result(f"episode lost: env worker {h.worker} was restarted")
                else:
                    by_worker.setdefault(EnvHandle(h.worker, h.generation, -1), []).append(i)
            calls = [
                (
                    key,
                    idx,
                    self._slots[key.worker].actor.step_batch.remote(
                        [(actions[i][0].env_id, actions[i][1]) for i in idx]
                    ),
                )
                for key, idx in by_worker.items()
            ]
            self.stats.calls += len(calls)
        start = time.monotonic()
        for handle, idx, ref in calls:
            budget = self.params.call_timeout_s * len(idx) - (time.monotonic() - start)
            env_ids = [actions[i][0].env_id for i in idx]
            try:
                results = self._get(handle, ref, max(budget, 0.0), env_ids)
            except EnvWorkerError as exc:
                results = [env_error_result(str(exc))] * len(idx)
            else:
                raised = [e for e, r in zip(env_ids, results) if _env_raised(r)]
                if raised:
                    self._episode_failed(handle, raised)
            for i, res in zip(idx, results):
                out[i] = res
        return [r if r is not None else env_error_result("no result") for r in out]

    def close_env(self, handle: EnvHandle) -> None:
        """Close an episode's env (a no-op if its worker was restarted meanwhile)."""
        slot = self._current(handle)
        if slot is None:
            return
        with self._lock:
            slot.live.discard(handle.env_id)
            self.stats.calls += 1
        self._get(handle, slot.actor.close.remote(handle.env_id), self.params.call_timeout_s, [])

    def make_env(self) -> RemoteEnv:
        """A drop-in :class:`~spear.envs.base.Env` whose calls run on this pool's workers."""
        return RemoteEnv(self)

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for diagnostics and tests)."""
        ray = _ray()
        with self._lock:
            actors = [s.actor for s in self._slots]
        return list(ray.get([a.ping.remote() for a in actors], timeout=self.params.call_timeout_s))

    def actor(self, worker: int) -> Any:
        """The Ray actor handle of worker ``worker`` (for diagnostics and fault injection)."""
        with self._lock:
            return self._slots[worker].actor


class RemoteEnv:
    """An :class:`~spear.envs.base.Env` living on a :class:`RayEnvPool` worker."""

    def __init__(self, pool: RayEnvPool) -> None:
        self._pool = pool
        self.handle: EnvHandle | None = None

    def reset(self, task: Task, *, seed: int | None = None) -> tuple[list[Message], dict[str, Any]]:
        self.handle, messages, info = self._pool.reset(task, seed, self.handle)
        return messages, info

    def step(self, action_text: str) -> StepResult:
        if self.handle is None:
            raise EnvWorkerError("step before reset")
        return self._pool.step(self.handle, action_text)

    def close(self) -> None:
        if self.handle is not None:
            self._pool.close_env(self.handle)
            self.handle = None
