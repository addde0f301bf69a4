"""Training ranks as Ray actors: FSDP2 data parallel over ``torch.distributed`` (gloo / NCCL).

:class:`TrainGroup` starts R :class:`TrainRank` actors, each with a copy of the driver's module,
joins them into one process group (rank 0's node address, a free port there), and shards the
module with :func:`~spear.distributed.fsdp.shard_policy`. An update puts the token batch in the
object store once; every rank reads the same whole batch and runs
:func:`~spear.distributed.fsdp.data_parallel_update`, which gives each rank its even share of
every mini-batch (on-policy and replay batches alike, any row count, any number of ranks). The
full updated weights are then gathered on rank 0 and loaded into the driver's policy, which stays
the one copy the rollouts, old log-probs and checkpoints read.

The driver's LR schedule rules: each update carries the driver optimizer's current learning
rate(s). The ranks' AdamW moments live only in the ranks (they are not checkpointed).

Failures. Every remote call has ``call_timeout_s``. A rank that misses it or dies breaks the
process group, so the whole group counts as crashed: every rank is killed, a fresh group starts
from the driver's weights (the AdamW moments start over, which is logged) and the update is
retried once. A second failure raises :class:`TrainRankError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from spear.config import OptimConfig
from spear.distributed.env_pool import EnvPoolError, _ray, check_cpu_request
from spear.distributed.rollout import WorkerParams, cpu_module, generator_from
from spear.policy import Policy, build_optimizer
from spear.runtime import retain_freed_memory
from spear.types import TokenBatch
from spear.update import UpdateResult, UpdateSettings

log = logging.getLogger(__name__)


class TrainRankError(RuntimeError):
    """The training ranks failed twice in one update."""


@dataclass(frozen=True)
class RankSetup:
    """What every rank needs besides the module: optimizer settings and where to run."""

    optim: OptimConfig
    total_steps: int
    dist_backend: str  # "gloo" (CPU) or "nccl" (GPU)
    num_threads: int
    retain_memory: bool = True  # glibc keeps freed memory (trainer.retain_freed_memory)


def load_full_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a gathered full state dict into ``model``; keys it lacks must be tied aliases of
    loaded ones (e.g. ``lm_head.weight`` tied to the embeddings)."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"gathered state has unknown keys: {result.unexpected_keys[:5]}")
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state}
    untied = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    if untied:
        raise KeyError(f"gathered state lacks weights: {untied[:5]}")


class TrainRank:
    """One FSDP2 rank. Runs inside a Ray actor."""

    def __init__(self, model: nn.Module, tokenizer: Any, setup: RankSetup) -> None:
        torch.set_num_threads(setup.num_threads)
        if setup.retain_memory:
            retain_freed_memory()
        self.setup = setup
        self.device = (
            torch.device("cuda", 0) if setup.dist_backend == "nccl" else torch.device("cpu")
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model, self.tokenizer = model.to(self.device), tokenizer
        self.policy: Any = None
        self.rank = -1

    def ping(self) -> int:
        return os.getpid()

    def rendezvous_address(self) -> str:
        """``tcp://<this node's IP>:<a free port here>`` for the process group (rank 0 only)."""
        import ray

        from spear.distributed.fsdp import free_port

        return f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"

    def join(self, rank: int, world_size: int, init_method: str, timeout_s: float) -> int:
        """Join the process group and shard the module (collective: all ranks at once)."""
        from spear.distributed.fsdp import init_distributed, shard_policy

        s = self.setup
        mesh = init_distributed(s.dist_backend, rank, world_size, init_method, timeout_s)
        opt, sched = build_optimizer(
            [p for p in self.model.parameters() if p.requires_grad], s.optim, s.total_steps
        )
        plain = Policy(
            self.model, self.tokenizer, self.device, opt, sched, share_prefix=s.optim.share_prefix
        )
        self.policy = shard_policy(
            plain, mesh, lambda p: build_optimizer(p, s.optim, s.total_steps)
        )
        self.rank = rank
        return rank

    def update(
        self,
        batch: TokenBatch,
        settings: UpdateSettings,
        generator_state: Tensor,
        loss_scale: float,
        lrs: Sequence[float],
        ref_logprobs: Tensor | None = None,
    ) -> tuple[UpdateResult, dict[str, Tensor] | None]:
        """One data-parallel update; rank 0 also returns the full updated weights.
        ``ref_logprobs [N, T]``: the KL term's reference log-probs, computed on the driver."""
        from spear.distributed.fsdp import data_parallel_update, gather_full_state_dict

        for group, lr in zip(self.policy.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        res = data_parallel_update(
            self.policy,
            batch,
            settings,
            generator_from(generator_state),
            loss_scale=loss_scale,
            ref_logprobs=ref_logprobs,
        )
        state = gather_full_state_dict(self.policy)  # collective on every rank
        return res, (state if self.rank == 0 else None)


class TrainGroup:
    """R :class:`TrainRank` actors doing the trainer's updates; see the module docstring."""

    def __init__(self, policy: Policy, setup: RankSetup, params: WorkerParams) -> None:
        ray = _ray()
        if not ray.is_initialized():
            raise EnvPoolError("Ray is not initialised: call spear.distributed.init_ray first")
        nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        check_cpu_request(params.num_cpus, params.num_workers, nodes)
        self.setup, self.params = setup, params
        self.restarts = 0
        self._cls = ray.remote(TrainRank).options(
            num_cpus=params.num_cpus, num_gpus=params.num_gpus, max_restarts=0
        )
        self._actors: list[Any] = []
        self._start(policy)

    def _start(self, policy: Policy) -> None:
        """Start R ranks from ``policy``'s current weights and join them into one group."""
        ray = _ray()
        model_ref = ray.put(cpu_module(policy.model))  # one copy for every rank
        self._actors = [
            self._cls.remote(model_ref, policy.tokenizer, self.setup)
            for _ in range(self.params.num_workers)
        ]
        try:
            ray.get([a.ping.remote() for a in self._actors], timeout=self.params.start_timeout_s)
            address = ray.get(
                self._actors[0].rendezvous_address.remote(), timeout=self.params.call_timeout_s
            )
            world = len(self._actors)
            joins = [
                a.join.remote(r, world, address, self.params.start_timeout_s)
                for r, a in enumerate(self._actors)
            ]
            ray.get(joins, timeout=self.params.start_timeout_s)
        except Exception as exc:
            self.shutdown()
            raise EnvPoolError(
                f"{self.params.num_workers} train rank(s) did not start and join within "
                f"start_timeout_s={self.params.start_timeout_s:g}s ({type(exc).__name__}: {exc})"
            ) from None

    def update(
        self,
        policy: Policy,
        batch: TokenBatch,
        settings: UpdateSettings,
        generator: torch.Generator,
        *,
        loss_scale: float,
        ref_logprobs: Tensor | None = None,
    ) -> UpdateResult:
        """The data-parallel update of ``batch``; ``policy`` holds the updated weights after.
        ``ref_logprobs [N, T]`` (the reference policy's, from the driver) travels with it."""
        ray = _ray()
        errors = ray.exceptions
        lrs = [float(g["lr"]) for g in policy.optimizer.param_groups]
        state0 = generator.get_state()
        batch_ref = ray.put(batch)  # one copy; every rank reads the whole batch
        kl_ref = ray.put(ref_logprobs) if ref_logprobs is not None else None
        for attempt in range(2):
            refs = [
                a.update.remote(batch_ref, settings, state0, loss_scale, lrs, kl_ref)
                for a in self._actors
            ]
            try:
                outs = ray.get(refs, timeout=self.params.call_timeout_s)
                break
            except (errors.GetTimeoutError, errors.RayActorError) as exc:
                if attempt == 1:
                    raise TrainRankError(
                        f"train ranks failed twice in one update ({type(exc).__name__})"
                    ) from None
                log.warning(
                    "train ranks %s (%s); restarting the group from the driver's weights (the "
                    "optimizer moments start over)",
                    "timed out" if isinstance(exc, errors.GetTimeoutError) else "crashed",
                    type(exc).__name__,
                )
                self.shutdown()
                self.restarts += 1
                self._start(policy)
        result, state = outs[0]
        load_full_state(policy.model, {k: v.to(policy.device) for k, v in state.items()})
        return result

    def shutdown(self) -> None:
        ray = _ray()
        for a in self._actors:
            ray.kill(a, no_restart=True)
        self._actors = []
