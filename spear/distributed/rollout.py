"""Rollout workers: N engine replicas as Ray actors, used in data parallel as one engine.

:class:`RayEngineGroup` implements :class:`~spear.rollout.engine.RolloutEngine`, so the agent
loop runs unchanged on the driver: each turn's prompt batch is split into at most N contiguous,
even chunks (:func:`chunk_bounds`), one remote ``generate`` per replica. After every update the
trainer's weights are pushed to all replicas (:meth:`RayEngineGroup.push_state`: the state dict
is put in the object store once, every replica reads that one copy).

Placement. With ``local`` (``distributed.driver_generates``) the driver's own engine takes the
first chunk of every call while the actors take the others, so the driver's CPU / GPU is not
idle during generation.

Randomness. Chunk 0 (replica 0, or the driver's engine) receives the caller's generator *state*
and hands back the advanced state, so with one replica the tokens and log-probs are exactly
those of an in-process engine with the same generator. Chunks 1..N-1 are seeded with numbers
drawn from the generator first (:func:`draw_seeds`). Rollouts are therefore a pure function of (weights, prompts, generator)
for a fixed replica count, but a different replica count samples different (equally valid)
tokens, because an engine samples its whole chunk from one stream.

Failures. Every remote call has ``call_timeout_s``. A replica that misses it, or whose process
died, is treated as crashed: it is killed, a fresh one starts with the latest weights, and its
chunk is generated again from the same generator state or seed (the same tokens, since a
generation is a pure function of weights, prompts and randomness). A replica that fails twice
in one call raises :class:`RolloutWorkerError`.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from spear.distributed.env_pool import (
    EnvPoolError,
    _ray,
    await_actors,
    check_cpu_request,
    check_fields,
)
from spear.registry import Registry
from spear.rollout.engine import Generation, HFEngine, KeepsTurns, RolloutEngine, SamplingParams
from spear.runtime import retain_freed_memory

log = logging.getLogger(__name__)

RandomSpec = Tensor | int  # a torch.Generator state (replica 0) or a seed (the others)


class RolloutWorkerError(RuntimeError):
    """A rollout worker failed twice in one call; the rollout cannot be completed."""


@dataclass(frozen=True)
class WorkerParams:
    """``num_workers`` actors of ``num_cpus`` CPUs and ``num_gpus`` GPUs (fractions allowed);
    ``call_timeout_s`` per remote call, ``start_timeout_s`` for a new actor to answer."""

    num_workers: int
    num_cpus: float
    num_gpus: float
    call_timeout_s: float
    start_timeout_s: float

    def __post_init__(self) -> None:
        check_fields(
            self, at_least_one=("num_workers",), non_negative=("num_gpus",),
            positive=("num_cpus", "call_timeout_s", "start_timeout_s"),
        )  # fmt: skip


@dataclass
class GroupStats:
    """Counters of one worker group's lifetime."""

    calls: int = 0  # remote generate calls issued (retries included)
    crashes: int = 0
    timeouts: int = 0
    restarts: int = 0
    weight_syncs: int = 0


# ----------------------------------------------------------------------------------------------
# Pure helpers


def chunk_bounds(n: int, workers: int) -> list[tuple[int, int]]:
    """``[start, end)`` of at most ``workers`` contiguous non-empty chunks covering ``range(n)``,
    sizes differing by at most one (the first chunks get the extra rows)."""
    if n < 0 or workers < 1:
        raise ValueError(f"need n >= 0 and workers >= 1, got n={n}, workers={workers}")
    base, extra = divmod(n, workers)
    bounds, start = [], 0
    for k in range(workers):
        size = base + (k < extra)
        if size:
            bounds.append((start, start + size))
            start += size
    return bounds


def draw_seeds(generator: torch.Generator, k: int) -> list[int]:
    """``k`` seeds drawn from ``generator`` (advancing it), for replicas 1..k."""
    if k <= 0:
        return []
    return [int(s) for s in torch.randint(0, 2**62, (k,), generator=generator).tolist()]


def generator_from(spec: RandomSpec) -> torch.Generator:
    """A CPU generator with the given state (a state tensor) or seed (an int)."""
    g = torch.Generator()
    if isinstance(spec, Tensor):
        g.set_state(spec)
    else:
        g.manual_seed(int(spec))
    return g


def cpu_module(model: nn.Module) -> nn.Module:
    """``model`` itself if it lives on the CPU, else a CPU copy (what travels to workers)."""
    if all(t.device.type == "cpu" for t in model.state_dict().values()):
        return model
    return copy.deepcopy(model).to("cpu")


def cpu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict, detached, on CPU (the payload of one weight push)."""
    return {k: v.detach().to("cpu", copy=False) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Replicas


@runtime_checkable
class EngineReplica(Protocol):
    """An engine a rollout worker holds: generates, and loads pushed weights by name."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        generator: torch.Generator | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


class HFReplica:
    """An :class:`HFEngine` over a private copy of the policy's module."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, device: str, *, keep_turns: bool = True
    ) -> None:
        self.engine = HFEngine(model.to(device), tokenizer, device=device, keep_turns=keep_turns)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        generator: torch.Generator | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        return self.engine.generate(
            prompts, params, generator=generator, max_new_tokens=max_new_tokens
        )

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.engine.model.load_state_dict(state)

    def drop_kept_rows(self) -> None:
        self.engine.drop_kept_rows()


ReplicaFactory = Callable[[], EngineReplica]


@dataclass(frozen=True)
class HFReplicaFactory:
    """Builds an :class:`HFReplica` inside a worker (picklable: the module travels once)."""

    model: nn.Module
    tokenizer: Any
    device: str
    num_threads: int
    keep_turns: bool = True  # HFEngine's KV cache kept between turns (rollout.keep_kv_cache)
    retain_memory: bool = True  # glibc keeps freed memory (trainer.retain_freed_memory)

    def __call__(self) -> EngineReplica:
        torch.set_num_threads(self.num_threads)
        if self.retain_memory:
            retain_freed_memory()
        if self.device == "cuda":
            torch.cuda.set_device(0)  # Ray exposes this worker's GPU(s) only
        return HFReplica(self.model, self.tokenizer, self.device, keep_turns=self.keep_turns)


class EngineHost:
    """One rollout worker. Runs inside a Ray actor; a plain class, usable in-process."""

    def __init__(self, factory: ReplicaFactory) -> None:
        self.replica = factory()
        self.version = 0

    def ping(self) -> int:
        return os.getpid()

    def load_weights(self, state: dict[str, Tensor], version: int) -> int:
        self.replica.load_state_dict(state)
        self.version = version
        return version

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        spec: RandomSpec,
        max_new_tokens: Sequence[int] | None,
    ) -> tuple[list[Generation], Tensor]:
        return generate_chunk(self.replica, prompts, params, spec, max_new_tokens)

    def drop_kept_rows(self) -> bool:
        """Free what the replica keeps between turns; True if it keeps anything at all."""
        if isinstance(self.replica, KeepsTurns):
            self.replica.drop_kept_rows()
            return True
        return False


def generate_chunk(
    engine: Any,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    spec: RandomSpec,
    max_new_tokens: Sequence[int] | None,
) -> tuple[list[Generation], Tensor]:
    """One chunk's generations by ``engine`` and the generator state after sampling them."""
    g = generator_from(spec)
    out = engine.generate(prompts, params, generator=g, max_new_tokens=max_new_tokens)
    return out, g.get_state()


# ----------------------------------------------------------------------------------------------
# The group


class RayEngineGroup:
    """N :class:`EngineHost` actors used as one :class:`~spear.rollout.engine.RolloutEngine`."""

    def __init__(
        self, factory: ReplicaFactory, params: WorkerParams, local: RolloutEngine | None = None
    ) -> None:
        """``local``: an in-process engine (the driver's) that takes the first chunk of every
        call next to the actors; it must sample from the current weights by itself."""
        ray = _ray()
        if not ray.is_initialized():
            raise EnvPoolError("Ray is not initialised: call spear.distributed.init_ray first")
        nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        check_cpu_request(params.num_cpus, params.num_workers, nodes)
        self.params, self.stats = params, GroupStats()
        self._factory = ray.put(factory)  # one copy of the module for every (re)start
        self._cls = ray.remote(EngineHost).options(
            num_cpus=params.num_cpus, num_gpus=params.num_gpus, max_restarts=0
        )
        self._lock = threading.Lock()
        self._local = local
        self._weights: tuple[Any, int] | None = None  # (object ref of the state, version)
        self._actors = [self._cls.remote(self._factory) for _ in range(params.num_workers)]
        self._await_ready(self._actors)

    def _await_ready(self, actors: Sequence[Any]) -> None:
        await_actors(
            actors,
            self.params.start_timeout_s,
            lambda exc: (
                f"{len(actors)} rollout worker(s) did not start within start_timeout_s="
                f"{self.params.start_timeout_s:g}s ({type(exc).__name__}: {exc}); with too few "
                "free CPUs / GPUs Ray queues actors forever: lower the per-worker request."
            ),
        )

    def _restart(self, worker: int, kind: str, reason: str) -> Any:
        """Replace worker ``worker`` by a fresh actor holding the latest weights."""
        ray = _ray()
        log.warning("rollout worker %d %s (%s); restarting it", worker, kind, reason)
        with self._lock:
            self.stats.crashes += kind == "crashed"
            self.stats.timeouts += kind == "timed out"
            ray.kill(self._actors[worker], no_restart=True)
            actor = self._cls.remote(self._factory)
            self._actors[worker] = actor
            self.stats.restarts += 1
            weights = self._weights
        self._await_ready([actor])
        if weights is not None:
            ray.get(actor.load_weights.remote(*weights), timeout=self.params.call_timeout_s)
        return actor

    def _call(self, worker: int, args: tuple[Any, ...]) -> Any:
        with self._lock:
            self.stats.calls += 1
            return self._actors[worker].generate.remote(*args)

    def _result(self, worker: int, ref: Any, deadline: float, args: tuple[Any, ...]) -> Any:
        """The answer of ``ref``; on a crash or a missed deadline, restart and retry once."""
        ray = _ray()
        errors = ray.exceptions
        for attempt in range(2):
            try:
                return ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except (errors.GetTimeoutError, errors.RayActorError) as exc:
                timed_out = isinstance(exc, errors.GetTimeoutError)
                kind = "timed out" if timed_out else "crashed"
                if attempt == 1:
                    raise RolloutWorkerError(
                        f"rollout worker {worker} {kind} twice in one call"
                    ) from None
                self._restart(worker, kind, type(exc).__name__)
                ref = self._call(worker, args)
                deadline = time.monotonic() + self.params.call_timeout_s
        raise AssertionError("unreachable")

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        generator: torch.Generator | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """See :meth:`RolloutEngine.generate` and the module docstring (randomness, failures)."""
        if not prompts:
            return []
        gen = generator
        if gen is None:
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        offset = int(self._local is not None)  # chunk k runs on actor k - offset
        bounds = chunk_bounds(len(prompts), len(self._actors) + offset)
        seeds = draw_seeds(gen, len(bounds) - 1)  # first, so chunk 0's stream starts after them
        specs: list[RandomSpec] = [gen.get_state(), *seeds]
        chunks = []
        for (a, b), spec in zip(bounds, specs):
            limits = list(max_new_tokens[a:b]) if max_new_tokens is not None else None
            chunks.append(([list(p) for p in prompts[a:b]], params, spec, limits))
        calls = [
            (k - offset, args, self._call(k - offset, args))
            for k, args in enumerate(chunks)
            if k >= offset
        ]
        results = [generate_chunk(self._local, *chunks[0])] if self._local is not None else []
        deadline = time.monotonic() + self.params.call_timeout_s  # the actors ran meanwhile
        results += [self._result(w, ref, deadline, args) for w, args, ref in calls]
        gen.set_state(results[0][1])  # chunk 0 continued the caller's stream
        return [g for gens, _ in results for g in gens]

    def push_state(self, state: dict[str, Tensor]) -> None:
        """Load ``state`` (names as the policy's ``state_dict``) into every replica."""
        ray = _ray()
        with self._lock:
            version = (self._weights[1] + 1) if self._weights is not None else 1
            self._weights = (ray.put(state), version)  # one copy in the object store
            actors = list(enumerate(self._actors))
            self.stats.weight_syncs += 1
        errors = ray.exceptions
        for k, actor in actors:
            try:
                ray.get(
                    actor.load_weights.remote(*self._weights), timeout=self.params.call_timeout_s
                )
            except (errors.GetTimeoutError, errors.RayActorError) as exc:
                kind = "timed out" if isinstance(exc, errors.GetTimeoutError) else "crashed"
                self._restart(k, kind, f"weight sync: {type(exc).__name__}")  # loads them

    def update_weights(self, model: nn.Module | None = None) -> None:
        """The :class:`RolloutEngine` hook: push ``model``'s weights (required here)."""
        if model is None:
            raise ValueError("RayEngineGroup.update_weights needs the model whose weights to push")
        self.push_state(cpu_state_dict(model))

    def drop_kept_rows(self) -> None:
        """The :class:`~spear.rollout.engine.KeepsTurns` hook: every replica (and the driver's
        engine) frees the KV caches it kept for a next turn. A worker that fails to answer is
        skipped: the next call restarts it, and a fresh replica keeps nothing."""
        ray = _ray()
        if isinstance(self._local, KeepsTurns):
            self._local.drop_kept_rows()
        with self._lock:
            refs = [a.drop_kept_rows.remote() for a in self._actors]
        errors = ray.exceptions
        for k, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=self.params.call_timeout_s)
            except (errors.GetTimeoutError, errors.RayActorError) as exc:
                log.warning("rollout worker %d did not free its kept rows (%s)", k, exc)

    def actor(self, worker: int) -> Any:
        """The Ray actor handle of worker ``worker`` (for diagnostics and fault injection)."""
        with self._lock:
            return self._actors[worker]

    def shutdown(self) -> None:
        ray = _ray()
        with self._lock:
            for a in self._actors:
                ray.kill(a, no_restart=True)
            self._actors = []


# ----------------------------------------------------------------------------------------------
# Which engine the replicas run


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica factory may use: the policy's module and tokenizer, and where to run."""

    model: nn.Module
    tokenizer: Any
    model_path: str | None  # a Hugging Face model dir holding the policy's initial weights
    device: str  # "cpu" or "cuda"
    num_threads: int
    gpu_memory_utilization: float
    keep_kv_cache: bool = True
    retain_freed_memory: bool = True


REPLICAS: Registry[Callable[[ReplicaSpec], ReplicaFactory]] = Registry("distributed.rollout_engine")


@REPLICAS.register("hf")
def _hf(spec: ReplicaSpec) -> ReplicaFactory:
    return HFReplicaFactory(
        spec.model,
        spec.tokenizer,
        spec.device,
        spec.num_threads,
        spec.keep_kv_cache,
        spec.retain_freed_memory,
    )


@REPLICAS.register("vllm")
def _vllm(spec: ReplicaSpec) -> ReplicaFactory:
    from spear.rollout.vllm_engine import VLLMEngineFactory

    if spec.model_path is None:
        raise ValueError("rollout_engine=vllm loads the model from a directory; none is known")
    return VLLMEngineFactory(spec.model_path, spec.gpu_memory_utilization, spec.num_threads)
