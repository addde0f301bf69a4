"""The ``ray`` trainer backend: env workers, rollout workers and train ranks as Ray actors.

Built from ``cfg.distributed`` (see :class:`~spear.config.DistributedConfig`): a count of 0 keeps
that part in the driver. The driver still runs the trainer's step, the agent loop (lockstep
turns), rewards, filters, advantages, the replay buffer and the schedules, so those behave
exactly as with the ``local`` backend; only where envs step, where tokens are sampled and where
gradients are computed changes.

* env workers: :class:`~spear.distributed.env_pool.RayEnvPool`; the loop gets its ``make_env``.
  A crashed or hung env worker is restarted; its episodes end as ``ENV_ERROR`` (failed, counted
  in ``dist/env_failed_episodes``) and training goes on.
* rollout workers: :class:`~spear.distributed.rollout.RayEngineGroup` (HF or vLLM replicas),
  used by the loop as its engine; weights are pushed after every update.
* train ranks: :class:`~spear.distributed.train_ranks.TrainGroup` (FSDP2, gloo on CPU / NCCL on
  GPU) does the on-policy and replay updates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from spear.backends import RolloutRequest
from spear.build import Components, model_dir
from spear.config import Config, DistributedConfig
from spear.distributed.env_pool import EnvPoolError, EnvPoolParams, RayEnvPool, _ray, init_ray
from spear.distributed.rollout import (
    REPLICAS,
    RayEngineGroup,
    ReplicaSpec,
    WorkerParams,
    cpu_module,
    cpu_state_dict,
)
from spear.distributed.train_ranks import RankSetup, TrainGroup
from spear.policy import Policy
from spear.rollout.loop import RolloutTimes
from spear.types import Episode, TokenBatch
from spear.update import UpdateResult, UpdateSettings, policy_update

log = logging.getLogger(__name__)


def actor_requests(d: DistributedConfig) -> list[tuple[str, int, float]]:
    """``(config field, actor count, CPUs per actor)`` of every part that runs actors."""
    parts = [
        ("env_workers", d.env_workers, d.cpus_per_env_worker),
        ("rollout_workers", d.rollout_workers, d.cpus_per_rollout_worker),
        ("train_ranks", d.train_ranks, d.cpus_per_train_rank),
    ]
    return [p for p in parts if p[1] > 0]


def check_cluster_fits(
    requests: Sequence[tuple[str, int, float]], node_cpus: Sequence[float]
) -> None:
    """Raise if one actor fits no node or all actors together exceed the cluster's CPUs."""
    largest, total = max(node_cpus, default=0.0), sum(node_cpus)
    for name, _, cpus in requests:
        if cpus > largest:
            raise EnvPoolError(
                f"distributed.{name}: {cpus:g} CPUs per actor but the largest Ray node has "
                f"{largest:g}; such an actor would wait forever. Request a fraction (e.g. 0.25)."
            )
    asked = sum(n * cpus for _, n, cpus in requests)
    if asked > total + 1e-9:
        parts = " + ".join(f"{n} {name} x {cpus:g}" for name, n, cpus in requests)
        raise EnvPoolError(
            f"{parts} = {asked:g} CPUs exceeds the Ray cluster's {total:g}; lower the "
            "distributed.cpus_per_* requests (fractions are fine) or the counts"
        )


def env_call_timeout(cfg: Config) -> float:
    """Deadline of one env call: ``distributed.call_timeout_s``, but never longer than the agent
    loop waits for a step (``rollout.env_step_timeout_s``), so a worker that hangs is replaced as
    soon as the loop gives up on it rather than blocking the episodes placed on it later."""
    return min(cfg.distributed.call_timeout_s, cfg.rollout.env_step_timeout_s)


def dist_backend(d: DistributedConfig) -> str:
    """``nccl`` when train ranks get GPUs, else ``gloo``."""
    return "nccl" if d.gpus_per_train_rank > 0 else "gloo"


def _worker_params(d: DistributedConfig, count: int, cpus: float, gpus: float) -> WorkerParams:
    return WorkerParams(
        num_workers=count, num_cpus=cpus, num_gpus=gpus, call_timeout_s=d.call_timeout_s,
        start_timeout_s=d.start_timeout_s,
    )  # fmt: skip


class RayBackend:
    """The :class:`~spear.backends.Backend` of ``trainer.backend=ray`` (module docstring)."""

    def __init__(self, cfg: Config, components: Components) -> None:
        d = cfg.distributed
        if d.rollout_engine == "vllm" and cfg.model.lora.enabled:
            raise ValueError("distributed.rollout_engine=vllm does not support model.lora yet")
        self.cfg, self.c = cfg, components
        self.env_pool: RayEnvPool | None = None
        self.engines: RayEngineGroup | None = None
        self.trainers: TrainGroup | None = None
        self._owns_ray = init_ray(d.address, d.num_cpus)
        try:
            ray = _ray()
            nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
            check_cluster_fits(actor_requests(d), nodes)
            self._start_workers(d)
        except BaseException:
            self.close()
            raise
        if d.train_ranks:
            log.warning(
                "the train ranks' optimizer moments are not checkpointed: a resumed run restarts them"
            )

    def _start_workers(self, d: DistributedConfig) -> None:
        c, cfg = self.c, self.cfg
        if d.env_workers:
            self.env_pool = RayEnvPool(
                c.make_env,
                EnvPoolParams(
                    num_workers=d.env_workers, cpus_per_worker=d.cpus_per_env_worker,
                    call_timeout_s=env_call_timeout(self.cfg), start_timeout_s=d.start_timeout_s,
                    max_concurrency=d.env_worker_concurrency,
                ),
            )  # fmt: skip
        if d.rollout_workers:
            spec = ReplicaSpec(
                model=cpu_module(c.policy.model), tokenizer=c.policy.tokenizer,
                model_path=model_dir(cfg, c.source) if d.rollout_engine == "vllm" else None,
                device="cuda" if d.gpus_per_rollout_worker > 0 else "cpu",
                num_threads=d.worker_threads, gpu_memory_utilization=d.vllm_gpu_memory_utilization,
                keep_kv_cache=cfg.rollout.keep_kv_cache,
                retain_freed_memory=cfg.trainer.retain_freed_memory,
            )  # fmt: skip
            params = _worker_params(
                d, d.rollout_workers, d.cpus_per_rollout_worker, d.gpus_per_rollout_worker
            )
            local = c.engine if d.driver_generates else None  # shares the policy's module
            self.engines = RayEngineGroup(REPLICAS.get(d.rollout_engine)(spec), params, local)
            if d.rollout_engine != "hf":  # replicas loaded weights from disk: send the current ones
                self.engines.push_state(cpu_state_dict(c.policy.model))
        if d.train_ranks:
            setup = RankSetup(
                optim=cfg.optim, total_steps=cfg.trainer.steps, dist_backend=dist_backend(d),
                num_threads=d.worker_threads, retain_memory=cfg.trainer.retain_freed_memory,
            )  # fmt: skip
            params = _worker_params(d, d.train_ranks, d.cpus_per_train_rank, d.gpus_per_train_rank)
            self.trainers = TrainGroup(c.policy, setup, params)

    def rollout(
        self, request: RolloutRequest, generator: torch.Generator, times: RolloutTimes | None = None
    ) -> list[Episode]:
        c = self.c
        engine = self.engines if self.engines is not None else c.engine
        make_env = self.env_pool.make_env if self.env_pool is not None else c.source.make_env
        return request.run(engine, c, make_env, generator, times)

    def update(
        self,
        policy: Policy,
        batch: TokenBatch,
        settings: UpdateSettings,
        generator: torch.Generator,
        *,
        loss_scale: float,
        old_from_forward: bool = False,
        ref_logprobs: Tensor | None = None,
    ) -> UpdateResult:
        if self.trainers is None:
            return policy_update(
                policy,
                batch,
                settings,
                generator,
                loss_scale=loss_scale,
                old_from_forward=old_from_forward,
                ref_logprobs=ref_logprobs,
            )
        if old_from_forward:
            raise ValueError("train ranks compute no old log-probs: recompute them on the driver")
        return self.trainers.update(
            policy, batch, settings, generator, loss_scale=loss_scale, ref_logprobs=ref_logprobs
        )

    @property
    def fuses_old_logprobs(self) -> bool:
        """The driver's own update can take old log-probs from its forward pass; ranks cannot."""
        return self.trainers is None

    def sync_weights(self, policy: Policy) -> None:
        if self.engines is not None:
            self.engines.push_state(cpu_state_dict(policy.model))

    def metrics(self) -> dict[str, float]:
        """Lifetime counters of the workers, as ``dist/...`` metrics."""
        out: dict[str, float] = {}
        if self.env_pool is not None:
            s = self.env_pool.stats
            out.update({
                "dist/env_failed_episodes": float(s.failed_episodes),
                "dist/env_crashes": float(s.crashes), "dist/env_timeouts": float(s.timeouts),
                "dist/env_restarts": float(s.restarts), "dist/env_errors": float(s.env_errors),
            })  # fmt: skip
        if self.engines is not None:
            g = self.engines.stats
            out.update({
                "dist/rollout_crashes": float(g.crashes), "dist/rollout_timeouts": float(g.timeouts),
                "dist/rollout_restarts": float(g.restarts),
            })  # fmt: skip
        if self.trainers is not None:
            out["dist/train_restarts"] = float(self.trainers.restarts)
        return out

    def close(self) -> None:
        """Stop every worker; shut Ray down if this backend started it."""
        for part in (self.env_pool, self.engines, self.trainers):
            if part is not None:
                part.shutdown()
        self.env_pool = self.engines = self.trainers = None
        if self._owns_ray:
            _ray().shutdown()
            self._owns_ray = False
