"""The pure math of self-imitation replay (reference §2): per-group baseline statistics, the
median recalibration ``A = R - p50``, the keep rule, and drawing samples. Used by
:class:`spear.replay.ReplayBuffer` (whose docstring gives the lifecycle) and the filters."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Sampling = Literal["uniform", "prioritized"]
Keep = Literal["positive", "non_negative"]


def group_baseline_stats(
    scores: Tensor, group_ids: Tensor, episode_ids: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group mean and std of episode scores.

    ``scores`` [N] float, ``group_ids`` [N] long, ``episode_ids`` [N] long (one entry per sample).
    An episode's score is the mean of its samples' scores; a group's mean / std are taken over
    its episodes (std unbiased, ddof=1; 0 for a single-episode group).
    Returns ``(group_ids [G], means [G], stds [G])`` in ascending group id, float64.
    """
    if scores.numel() == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return torch.zeros(0, dtype=torch.long), empty, empty.clone()
    scores = scores.to(torch.float64)
    eps_ids, ep_of_sample = torch.unique(episode_ids, return_inverse=True)  # [E], [N]
    n_eps = eps_ids.numel()
    ep_count = torch.bincount(ep_of_sample, minlength=n_eps).to(torch.float64)  # [E]
    ep_score = (
        torch.zeros(n_eps, dtype=torch.float64).index_add_(0, ep_of_sample, scores) / ep_count
    )
    ep_group = torch.zeros(n_eps, dtype=torch.long).scatter_(0, ep_of_sample, group_ids)  # [E]
    if not torch.equal(ep_group[ep_of_sample], group_ids):
        raise ValueError("samples of one episode_id carry different group_ids")
    gids, grp_of_ep = torch.unique(ep_group, return_inverse=True)  # [G], [E]
    n_grp = gids.numel()
    count = torch.bincount(grp_of_ep, minlength=n_grp).to(torch.float64)  # [G]
    mean = torch.zeros(n_grp, dtype=torch.float64).index_add_(0, grp_of_ep, ep_score) / count
    sq = (ep_score - mean[grp_of_ep]) ** 2  # [E]
    ss = torch.zeros(n_grp, dtype=torch.float64).index_add_(0, grp_of_ep, sq)
    var = torch.where(count > 1, ss / (count - 1).clamp(min=1.0), torch.zeros_like(ss))
    return gids, mean, var.sqrt()


def median(values: Tensor) -> float:
    """50th percentile with linear interpolation (numpy's default); NaN for an empty tensor."""
    if values.numel() == 0:
        return math.nan
    return float(torch.quantile(values.to(torch.float64), 0.5).item())


def recalibrate_median(
    scores: Tensor, p50: float, s50: float, *, normalize_by_std: bool, std_eps: float
) -> Tensor:
    """``A = R - p50`` (or ``(R - p50) / (s50 + std_eps)``); ``scores`` [N] -> [N] float64."""
    adv = scores.to(torch.float64) - p50
    return adv / (s50 + std_eps) if normalize_by_std else adv


def keep_mask(advantages: Tensor, keep: Keep) -> Tensor:
    """[N] bool: ``A > 0`` for ``"positive"``, ``A >= 0`` for ``"non_negative"``."""
    return advantages > 0 if keep == "positive" else advantages >= 0


def draw_indices(
    priorities: Tensor, k: int, sampling: Sampling, generator: torch.Generator
) -> Tensor:
    """Draw ``min(k, n)`` distinct indices of ``priorities`` [n]; returns them sorted ascending.

    ``uniform`` ignores the priorities. ``prioritized`` draws proportionally to the (non-negative)
    priorities without replacement; zero-priority items are drawn uniformly only once every
    positive one has been taken. Equal priorities are fine.
    """
    n = priorities.numel()
    if k >= n:
        return torch.arange(n)
    if sampling == "uniform":
        return torch.randperm(n, generator=generator)[:k].sort().values
    weights = priorities.to(torch.float64).clamp(min=0.0)  # [n]
    positive = (weights > 0).nonzero().squeeze(1)  # [P]
    if positive.numel() >= k:
        picked = torch.multinomial(weights, k, replacement=False, generator=generator)
    else:
        zeros = (weights <= 0).nonzero().squeeze(1)
        extra = zeros[torch.randperm(zeros.numel(), generator=generator)[: k - positive.numel()]]
        picked = torch.cat([positive, extra])
    return picked.sort().values
