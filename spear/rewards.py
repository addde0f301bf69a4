"""Reward assembly: outcome + intrinsic tool-call bonus - invalid-call penalty (reference §6).

The intrinsic bonus of an episode at training step ``t`` is

    bonus = min(cap, alpha * n_calls) * phi(t)

with ``phi`` a :class:`~spear.schedules.Schedule` (the reference's modes map to schedules:
``none`` -> constant 0, ``constant`` -> constant 1, ``cosine`` -> cosine_down(1, T_tool)). What
counts as a call is configurable: ``"tool_calls"`` = parsed, valid tool calls
(``Episode.num_tool_calls``, the reference's math setting) or ``"turns"`` = environment turns
(``Episode.num_turns``, the reference's ALFWorld setting, invalid turns included). The bonus is
added whether or not the episode succeeded, as in the reference. ``phi(t)`` must be finite and
>= 0 (the reference floors it at 0); a schedule that goes negative is reported, not clipped.

Two penalties:

* ``invalid_penalty * Episode.num_invalid_tool_calls`` (``reward.invalid_call_penalty``, off by
  default; malformed or unknown tool calls, not a text game's inadmissible actions, which are
  counted apart in ``Episode.num_invalid_actions``): an Episode records only counts, so every
  sample of the episode pays it.
* ``Sample.turn_penalty``: what the env charged the sample's own turn (``info["penalty"]``, e.g.
  TextWorld's inadmissible action, :mod:`spear.envs.base`). Only that sample pays it: in the turn
  layout the offending turn's score is ``R - 0.1``, its siblings keep ``R``, as in the reference
  (§5.1). It is not in ``outcome_reward``.

So ``score = outcome + bonus - episode penalty - turn_penalty`` per sample, and
``sample.penalty`` is the sum of the two penalties it pays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from spear.schedules import Schedule
from spear.types import Episode

CallCount = Literal["tool_calls", "turns"]


def _finite_non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class ToolBonus:
    """Intrinsic tool-call reward settings (defaults: spear/config_sections.py, ``reward.tool_bonus``)."""

    alpha: float  # bonus per counted call
    cap: float  # maximum bonus before the schedule factor
    schedule: Schedule  # phi(t)
    count: CallCount

    def __post_init__(self) -> None:
        _finite_non_negative("ToolBonus.alpha", self.alpha)
        _finite_non_negative("ToolBonus.cap", self.cap)
        if not isinstance(self.schedule, Schedule):
            raise ValueError(f"ToolBonus.schedule must be a Schedule, got {self.schedule!r}")
        if self.count not in ("tool_calls", "turns"):
            raise ValueError(f"ToolBonus.count must be 'tool_calls' or 'turns', got {self.count!r}")


def tool_call_bonus(n_calls: Tensor, alpha: float, cap: float, phi: float) -> Tensor:
    """``min(cap, alpha * n) * phi`` per episode: ``n_calls`` [E] -> [E] float64."""
    return (alpha * n_calls.to(torch.float64)).clamp(max=cap) * phi


def schedule_factor(schedule: Schedule, step: int) -> float:
    """``phi(step)``; raises ``ValueError`` if it is negative or not finite."""
    phi = float(schedule(step))
    if not (math.isfinite(phi) and phi >= 0):
        raise ValueError(
            f"tool-bonus schedule {schedule!r} gives phi({step}) = {phi}; it must be finite and "
            ">= 0 (a negative factor would turn the bonus into a penalty)"
        )
    return phi


def counted_calls(episode: Episode, count: CallCount) -> int:
    """The number the bonus counts: valid tool calls or environment turns."""
    return episode.num_tool_calls if count == "tool_calls" else episode.num_turns


def _mean(values: Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def assign_rewards(
    episodes: Sequence[Episode], step: int, tool_bonus: ToolBonus, *, invalid_penalty: float
) -> dict[str, float]:
    """Set ``outcome_reward``, ``tool_bonus``, ``penalty`` and ``score`` on every sample.

    Returns metrics (means over episodes; NaN when there are none) so outcome and bonus are
    logged separately: ``reward/outcome``, ``reward/tool_bonus``, ``reward/penalty``,
    ``reward/score``, ``reward/counted_calls``, ``reward/bonus_capped_frac`` and
    ``reward/tool_factor`` (``phi(step)``, a plain number even without episodes).
    """
    penalty_coef = _finite_non_negative("invalid_penalty", invalid_penalty)
    phi = schedule_factor(tool_bonus.schedule, step)
    counts = torch.tensor([counted_calls(e, tool_bonus.count) for e in episodes], dtype=torch.long)
    if bool((counts < 0).any()):
        raise ValueError(f"episode call counts ({tool_bonus.count}) must be >= 0")
    outcome = torch.tensor([e.outcome_reward for e in episodes], dtype=torch.float64)  # [E]
    if not bool(torch.isfinite(outcome).all()):
        raise ValueError("every Episode.outcome_reward must be finite")
    bonus = tool_call_bonus(counts, tool_bonus.alpha, tool_bonus.cap, phi)  # [E]
    invalid = torch.tensor([e.num_invalid_tool_calls for e in episodes], dtype=torch.float64)
    penalty = penalty_coef * invalid  # [E] paid by every sample of the episode
    turn_penalty = torch.tensor(
        [math.fsum(s.turn_penalty for s in e.samples) for e in episodes], dtype=torch.float64
    )  # [E] each paid by its own sample only
    score = outcome + bonus - penalty  # [E] before the turn penalties
    for e, o, b, p, s in zip(
        episodes, outcome.tolist(), bonus.tolist(), penalty.tolist(), score.tolist()
    ):
        for sample in e.samples:
            sample.outcome_reward, sample.tool_bonus = o, b
            sample.penalty, sample.score = p + sample.turn_penalty, s - sample.turn_penalty
    capped = (tool_bonus.alpha * counts.to(torch.float64) >= tool_bonus.cap).to(torch.float64)
    return {
        "reward/outcome": _mean(outcome),
        "reward/tool_bonus": _mean(bonus),
        "reward/penalty": _mean(penalty + turn_penalty),  # per episode, both kinds
        "reward/score": _mean(score - turn_penalty),
        "reward/tool_factor": float(phi),
        "reward/counted_calls": _mean(counts.to(torch.float64)),
        "reward/bonus_capped_frac": _mean(capped),
    }
