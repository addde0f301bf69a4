"""Where rollouts and updates run: in this process (``local``) or scaled out (``ray``).

The trainer talks to one :class:`Backend` and never to Ray: ``trainer.backend`` names an entry of
:data:`BACKENDS`, built from the config and the run's :class:`~spear.build.Components`. The
``local`` backend is the in-process path (the trainer's engine and envs, ``policy_update``);
``ray`` lives in :mod:`spear.distributed.backend`, imported only when it is asked for, so the
default install needs no Ray.

Every backend runs the same agent loop (:func:`spear.rollout.loop.run_episodes`) and the same
update maths, and the trainer keeps the replay buffer, the schedules and every random stream in
the driver, so those behave identically whatever the backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from spear.build import Components
from spear.config import Config
from spear.envs.base import Env, Task
from spear.policy import Policy
from spear.registry import Registry
from spear.rollout.engine import RolloutEngine
from spear.rollout.loop import LoopParams, RolloutTimes, run_episodes
from spear.types import Episode, TokenBatch
from spear.update import UpdateResult, UpdateSettings, policy_update


@dataclass(frozen=True, slots=True)
class RolloutRequest:
    """One call of the agent loop: ``tasks`` x ``group_size`` episodes with these ids."""

    tasks: Sequence[Task]
    group_size: int
    params: LoopParams
    step: int
    first_group_id: int
    first_episode_id: int

    def run(
        self,
        engine: RolloutEngine,
        c: Components,
        make_env: Callable[[], Env],
        generator: torch.Generator,
        times: RolloutTimes | None,
    ) -> list[Episode]:
        """The agent loop on this request with ``engine`` and ``make_env`` (the run's tools)."""
        return run_episodes(
            engine, c.policy.tokenizer, make_env, self.tasks,
            group_size=self.group_size, params=self.params, step=self.step,
            first_group_id=self.first_group_id, first_episode_id=self.first_episode_id,
            generator=generator, tools=c.source.tools(), times=times,
        )  # fmt: skip


class Backend(Protocol):
    """Runs the trainer's rollouts and updates somewhere."""

    @property
    def fuses_old_logprobs(self) -> bool:
        """Whether :meth:`update` can take the old log-probs from its own forward pass
        (``old_from_forward``, see :mod:`spear.update`)."""
        ...

    def rollout(
        self, request: RolloutRequest, generator: torch.Generator, times: RolloutTimes | None = None
    ) -> list[Episode]:
        """The episodes of ``request``, sampled with ``generator`` (consumed in place); engine
        and env seconds are added to ``times``."""
        ...

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
        """``policy_update`` of ``policy`` on ``batch`` (``policy`` holds the result after);
        ``ref_logprobs [N, T]``: the reference policy's, for the KL term (:mod:`spear.reference`)."""
        ...

    def sync_weights(self, policy: Policy) -> None:
        """Make every rollout worker sample from ``policy``'s current weights."""
        ...

    def metrics(self) -> dict[str, float]:
        """Counters of the backend's workers (failures, restarts); empty for ``local``."""
        ...

    def close(self) -> None:
        """Stop the backend's workers."""
        ...


BACKENDS: Registry[Callable[[Config, Components], Backend]] = Registry("trainer.backend")


class LocalBackend:
    """Everything in this process: the trainer's engine shares the policy's module."""

    fuses_old_logprobs = True

    def __init__(self, components: Components) -> None:
        self.c = components

    def rollout(
        self, request: RolloutRequest, generator: torch.Generator, times: RolloutTimes | None = None
    ) -> list[Episode]:
        return request.run(self.c.engine, self.c, self.c.source.make_env, generator, times)

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
        return policy_update(
            policy,
            batch,
            settings,
            generator,
            loss_scale=loss_scale,
            old_from_forward=old_from_forward,
            ref_logprobs=ref_logprobs,
        )

    def sync_weights(self, policy: Policy) -> None:
        """Nothing to do: the engine samples from the module the optimizer updates."""

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        """Nothing to stop."""


@BACKENDS.register("local")
def _local(cfg: Config, components: Components) -> Backend:
    return LocalBackend(components)


@BACKENDS.register("ray")
def _ray(cfg: Config, components: Components) -> Backend:
    from spear.distributed.backend import RayBackend

    return RayBackend(cfg, components)


def build_backend(cfg: Config, components: Components) -> Backend:
    """The backend ``cfg.trainer.backend`` names (an unknown name raises, listing the known)."""
    return BACKENDS.get(cfg.trainer.backend)(cfg, components)
