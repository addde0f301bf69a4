"""Group-relative advantage estimators (GRPO, Dr.GRPO, RLOO, GiGPO).

One signature: ``fn(inp: AdvantageInput, params: AdvantageParams) -> Tensor  # [N]``, one scalar
advantage per sample; the caller broadcasts it over the sample's loss-mask tokens.

Samples are grouped by ``group_ids`` (the G rollouts of one task) and ``episode_ids`` (one
rollout), never by row position (B5); rows may come in any order. Two layouts are supported:
one sample per episode, and one sample per turn (every turn of an episode is its own sample).

``params.stats_over`` chooses the statistical unit of the group baseline:

* ``"sample"`` (the config's default): mean/std over all samples (turns) of the group, so long
  episodes weigh more; this is the reference agent's ``compute_mean_std_cross_all_data=True``,
  for GRPO and for GiGPO's episode term (reference §5.2, §5.3).
* ``"episode"`` (an option): an episode's score is the mean of its samples' scores; group
  mean/std are taken over the group's episodes (each episode counts once, however many turns it
  has), and every sample gets its episode's advantage. It keeps a long failing episode from
  outweighing a short success in the baseline, at the price of departing from the reference.

In the one-sample-per-episode layout both are plain GRPO.

Standard deviation (B14): one convention everywhere, the unbiased estimate (ddof=1, as
``torch.std`` in verl), and ``eps`` is added to the std before dividing, as in verl:
``A = (R - mean) / (std + eps)``. A group with a single member gets advantage 0.

Relation to verl 0.9.1 ``compute_grpo_outcome_advantage`` / ``compute_rloo_outcome_advantage``
and verl-agent's GiGPO (pinned by ``tests/algo/test_verl_agreement.py``): for every group with
at least two members the values are the same (one sample per episode, or ``stats_over="sample"``,
which is verl-agent's ``compute_mean_std_cross_all_data=True``). The one intended difference is
the singleton group: verl uses mean 0 / std 1 there, which hands the lone sample
``R / (1 + eps)`` (GRPO with std), ``R`` (without std, and RLOO); a lone sample carries no
group-relative signal, so we give it none. verl-agent's trajectory-level statistics
(``compute_mean_std_cross_steps=False``) take the score of each trajectory's first row seen;
``stats_over="episode"`` takes the mean over the episode's samples instead (equal when all turns
of an episode carry the same score).

Response-filtered samples (``valid == False``) still enter the group statistics, as in the
reference (verl multiplies by the response mask only after computing them), but get advantage 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from spear.registry import Registry

StatsOver = Literal["episode", "sample"]


@dataclass(frozen=True)
class AdvantageInput:
    """Per-sample inputs, all ``[N]``. ``step_returns``/``anchor_ids`` are for GiGPO only.

    ``anchor_ids`` are integers the caller assigns, one per distinct anchor observation (equal
    ids = identical observation); GiGPO clusters samples of the same group by them.
    """

    scores: Tensor  # [N] float
    group_ids: Tensor  # [N] long
    episode_ids: Tensor  # [N] long
    valid: Tensor  # [N] bool
    step_returns: Tensor | None = None  # [N] float
    anchor_ids: Tensor | None = None  # [N] long

    def __post_init__(self) -> None:
        if self.scores.dim() != 1:
            raise ValueError(f"scores must be [N], got shape {tuple(self.scores.shape)}")
        if not self.scores.is_floating_point():
            raise TypeError(f"scores must be a float tensor, got {self.scores.dtype}")
        n = self.scores.shape[0]
        for name in ("group_ids", "episode_ids", "valid", "step_returns", "anchor_ids"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (n,):
                raise ValueError(f"{name} must have shape ({n},) like scores, got {tuple(t.shape)}")
        for name in ("group_ids", "episode_ids", "anchor_ids"):
            t = getattr(self, name)
            if t is not None and (t.is_floating_point() or t.dtype == torch.bool):
                raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if self.valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor, got {self.valid.dtype}")
        if self.step_returns is not None and not self.step_returns.is_floating_point():
            raise TypeError(f"step_returns must be a float tensor, got {self.step_returns.dtype}")


@dataclass(frozen=True)
class AdvantageParams:
    """Estimator settings (defaults live in ``spear.config``)."""

    norm_by_std: bool  # grpo: divide by (std + eps)
    eps: float  # added to std before dividing
    stats_over: StatsOver  # statistical unit of the group baseline (module docstring)
    gigpo_step_weight: float  # weight of GiGPO's step-level term
    gigpo_norm_by_std: bool  # GiGPO "mean_std_norm" (True) vs "mean_norm" (False), both terms

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.stats_over not in ("episode", "sample"):
            raise ValueError(f"stats_over must be 'episode' or 'sample', got {self.stats_over!r}")
        if not math.isfinite(self.gigpo_step_weight):
            raise ValueError(f"gigpo_step_weight must be finite, got {self.gigpo_step_weight}")


AdvantageFn = Callable[[AdvantageInput, AdvantageParams], Tensor]

ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")


# ----------------------------------------------------------------------------------------------
# Segment statistics (vectorised over ids)


def dense_ids(ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary integer ids ``[M]`` to ``0..K-1`` (``inverse [M]``) and return ``K``."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    return inverse, int(uniq.numel())


@dataclass(frozen=True)
class SegmentStats:
    """Per-segment count, mean and unbiased std (0 for segments of size < 2). All ``[K]``."""

    count: Tensor
    mean: Tensor
    std: Tensor


def segment_stats(values: Tensor, segments: Tensor, num_segments: int) -> SegmentStats:
    """Count, mean and unbiased (ddof=1) std of ``values [M]`` per segment id ``segments [M]``."""
    zeros = values.new_zeros(num_segments)  # [K]
    count = zeros.index_add(0, segments, torch.ones_like(values))  # [K]
    mean = zeros.index_add(0, segments, values) / count.clamp(min=1)  # [K]
    sq_dev = (values - mean[segments]).square()  # [M]
    ss = zeros.index_add(0, segments, sq_dev)  # [K]
    std = (ss / (count - 1).clamp(min=1)).sqrt()  # [K]
    return SegmentStats(count=count, mean=mean, std=std)


def group_centred(
    values: Tensor, segments: Tensor, num_segments: int, *, norm_by_std: bool, eps: float
) -> Tensor:
    """``v - mean_seg`` (divided by ``std_seg + eps`` if ``norm_by_std``); 0 in singleton segments.

    ``values [M]``, ``segments [M]`` -> ``[M]``.
    """
    st = segment_stats(values, segments, num_segments)
    out = values - st.mean[segments]  # [M]
    if norm_by_std:
        out = out / (st.std[segments] + eps)
    return torch.where(st.count[segments] > 1, out, torch.zeros_like(out))


def leave_one_out(values: Tensor, segments: Tensor, num_segments: int) -> Tensor:
    """RLOO: ``v_i - mean of the other members`` = ``G/(G-1) (v_i - mean)``; 0 if ``G == 1``. [M]"""
    st = segment_stats(values, segments, num_segments)
    g = st.count[segments]  # [M]
    out = g / (g - 1).clamp(min=1) * (values - st.mean[segments])  # [M]
    return torch.where(g > 1, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------------
# Statistical units (episodes or samples)


@dataclass(frozen=True)
class _Units:
    values: Tensor  # [U] score of each unit
    groups: Tensor  # [U] dense group index of each unit
    num_groups: int
    of_sample: Tensor  # [N] unit index of each sample


def _units(inp: AdvantageInput, stats_over: StatsOver) -> _Units:
    """The statistical units of the group baseline and the sample -> unit map."""
    group_inv, num_groups = dense_ids(inp.group_ids)
    if stats_over == "sample":
        n = inp.scores.shape[0]
        arange = torch.arange(n, device=inp.scores.device)
        return _Units(inp.scores, group_inv, num_groups, arange)
    ep_inv, num_eps = dense_ids(inp.episode_ids)
    ep_scores = segment_stats(inp.scores, ep_inv, num_eps).mean  # [E]
    ep_group = torch.zeros(num_eps, dtype=group_inv.dtype, device=group_inv.device)
    ep_group = ep_group.scatter(0, ep_inv, group_inv)  # [E] (any member's group)
    mixed = ep_group[ep_inv] != group_inv  # [N]
    if bool(mixed.any()):
        bad = inp.episode_ids[mixed][0].item()
        raise ValueError(f"episode_ids: episode {bad} has samples in more than one group_ids")
    return _Units(ep_scores, ep_group, num_groups, ep_inv)


def _finish(adv: Tensor, inp: AdvantageInput) -> Tensor:
    """Zero the advantage of response-filtered samples. [N]"""
    return torch.where(inp.valid, adv, torch.zeros_like(adv))


# ----------------------------------------------------------------------------------------------
# Estimators


@ADVANTAGES.register("grpo")
def grpo_advantage(inp: AdvantageInput, params: AdvantageParams) -> Tensor:
    """GRPO: ``(R - mean_g) / (std_g + eps)`` if ``norm_by_std`` else ``R - mean_g``. [N]"""
    u = _units(inp, params.stats_over)
    adv_u = group_centred(
        u.values, u.groups, u.num_groups, norm_by_std=params.norm_by_std, eps=params.eps
    )
    return _finish(adv_u[u.of_sample], inp)


@ADVANTAGES.register("drgrpo")
def drgrpo_advantage(inp: AdvantageInput, params: AdvantageParams) -> Tensor:
    """Dr.GRPO: ``R - mean_g``, never divided by the std (``norm_by_std`` is ignored). [N]"""
    u = _units(inp, params.stats_over)
    adv_u = group_centred(u.values, u.groups, u.num_groups, norm_by_std=False, eps=params.eps)
    return _finish(adv_u[u.of_sample], inp)


@ADVANTAGES.register("rloo")
def rloo_advantage(inp: AdvantageInput, params: AdvantageParams) -> Tensor:
    """RLOO: ``R_i - mean of the group's other units`` (never std-normalised). [N]

    verl leaves a singleton group's score unchanged (advantage = R); here it is 0 (see module
    docstring).
    """
    u = _units(inp, params.stats_over)
    adv_u = leave_one_out(u.values, u.groups, u.num_groups)
    return _finish(adv_u[u.of_sample], inp)


@ADVANTAGES.register("gigpo")
def gigpo_advantage(inp: AdvantageInput, params: AdvantageParams) -> Tensor:
    """GiGPO: episode term + ``gigpo_step_weight`` * step term. [N]

    * Episode term: GRPO on the scores over ``stats_over`` units, std-normalised iff
      ``gigpo_norm_by_std``.
    * Step term: within each group, samples with equal ``anchor_ids`` form a cluster; each
      sample's ``step_returns`` is centred on its cluster's mean (and divided by the cluster's
      unbiased std + eps iff ``gigpo_norm_by_std``). A singleton cluster gives 0 (the reference
      uses its own value as mean, which is also 0).
    """
    if inp.step_returns is None or inp.anchor_ids is None:
        missing = "step_returns" if inp.step_returns is None else "anchor_ids"
        raise ValueError(f"gigpo needs AdvantageInput.{missing} (turn layout); got None")
    u = _units(inp, params.stats_over)
    episode = group_centred(
        u.values, u.groups, u.num_groups, norm_by_std=params.gigpo_norm_by_std, eps=params.eps
    )[u.of_sample]  # [N]
    group_inv, _ = dense_ids(inp.group_ids)
    anchor_inv, num_anchors = dense_ids(inp.anchor_ids)
    cluster, num_clusters = dense_ids(group_inv * num_anchors + anchor_inv)  # [N]
    step = group_centred(
        inp.step_returns.to(inp.scores.dtype),
        cluster,
        num_clusters,
        norm_by_std=params.gigpo_norm_by_std,
        eps=params.eps,
    )  # [N]
    return _finish(episode + params.gigpo_step_weight * step, inp)


# ----------------------------------------------------------------------------------------------
# GiGPO step returns


def discounted_returns(
    rewards: Tensor, episode_ids: Tensor, turn_index: Tensor, gamma: float
) -> Tensor:
    """Per-turn discounted return ``G_k = r_k + gamma * G_{k+1}`` within each episode. [N]

    ``rewards``, ``episode_ids`` and ``turn_index`` are ``[N]`` (one row per turn, any order).
    ``turn_index`` only orders the turns of an episode: the recursion runs over the turns that
    are present, so a gap in the indices is not a missing zero-reward turn. Duplicate
    ``(episode, turn_index)`` pairs are an error. The loop runs over turn positions (at most the
    longest episode's length), vectorised over episodes.
    """
    n = rewards.shape[0]
    if rewards.dim() != 1 or episode_ids.shape != (n,) or turn_index.shape != (n,):
        raise ValueError(
            "rewards, episode_ids and turn_index must all be [N]; got shapes "
            f"{tuple(rewards.shape)}, {tuple(episode_ids.shape)}, {tuple(turn_index.shape)}"
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if n == 0:
        return rewards.clone()
    ep, num_eps = dense_ids(episode_ids)
    order = torch.argsort(turn_index, stable=True)
    order = order[torch.argsort(ep[order], stable=True)]  # rows sorted by (episode, turn)
    s_ep, s_turn = ep[order], turn_index[order]
    if bool(((s_ep[1:] == s_ep[:-1]) & (s_turn[1:] == s_turn[:-1])).any()):
        raise ValueError("turn_index: an episode has two samples with the same turn_index")
    counts = torch.bincount(ep, minlength=num_eps)  # [E]
    starts = torch.cumsum(counts, 0) - counts  # [E]
    rank = torch.empty_like(ep)
    rank[order] = torch.arange(n, device=ep.device) - starts[s_ep]  # position within episode
    by_rank = torch.argsort(rank, stable=True)
    per_rank = torch.bincount(rank).tolist()
    bounds = [0, *torch.cumsum(torch.tensor(per_rank), 0).tolist()]
    out = torch.empty_like(rewards)
    carry = rewards.new_zeros(num_eps)  # G_{k+1} of each episode
    for r in reversed(range(len(per_rank))):
        rows = by_rank[bounds[r] : bounds[r + 1]]
        g = rewards[rows] + gamma * carry[ep[rows]]
        out[rows] = g
        carry[ep[rows]] = g
    return out
