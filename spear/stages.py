"""Stages of a training step that sit between the pure algorithm functions and the trainer.

Each stage takes and returns typed records (:class:`~spear.types.Sample`,
:class:`~spear.types.Episode`, :class:`~spear.types.TokenBatch`) and returns its metrics as
tensors or floats; none of them holds algorithm math of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from spear.algo.advantages import ADVANTAGES, AdvantageInput, AdvantageParams, discounted_returns
from spear.config import Config
from spear.policy import Policy
from spear.types import Episode, Sample, TokenBatch


def advantage_params(cfg: Config) -> AdvantageParams:
    a = cfg.advantage
    return AdvantageParams(
        norm_by_std=a.norm_by_std,
        eps=a.eps,
        stats_over=a.stats_over,
        gigpo_step_weight=a.gigpo_step_weight,
        gigpo_norm_by_std=a.gigpo_norm_by_std,
    )


def _anchor_ids(samples: Sequence[Sample]) -> Tensor:
    """Integer id per distinct anchor observation (samples without one get unique ids)."""
    ids: dict[str, int] = {}
    out = []
    for i, s in enumerate(samples):
        key = s.anchor if s.anchor is not None else f"\x00unique-{i}"
        out.append(ids.setdefault(key, len(ids)))
    return torch.tensor(out, dtype=torch.long)


def compute_advantages(samples: Sequence[Sample], cfg: Config) -> dict[str, Tensor]:
    """Fill ``sample.advantage`` with the configured estimator; return advantage statistics."""
    if not samples:
        return {}
    scores = torch.tensor([s.score for s in samples], dtype=torch.float64)
    episode_ids = torch.tensor([s.episode_id for s in samples], dtype=torch.long)
    step_returns = None
    if cfg.advantage.estimator == "gigpo":
        # env rewards are discounted; a turn's penalty is then charged to that turn only (§5.3)
        step_returns = discounted_returns(
            torch.tensor([s.turn_reward for s in samples], dtype=torch.float64),
            episode_ids,
            torch.tensor([s.turn_index for s in samples], dtype=torch.long),
            cfg.advantage.gigpo_gamma,
        ) - torch.tensor([s.turn_penalty for s in samples], dtype=torch.float64)
    inp = AdvantageInput(
        scores=scores,
        group_ids=torch.tensor([s.group_id for s in samples], dtype=torch.long),
        episode_ids=episode_ids,
        valid=torch.tensor([not s.is_filtered for s in samples], dtype=torch.bool),
        step_returns=step_returns,
        anchor_ids=_anchor_ids(samples) if step_returns is not None else None,
    )
    adv = ADVANTAGES.get(cfg.advantage.estimator)(inp, advantage_params(cfg))
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a
    return {
        "adv/mean": adv.mean(),
        "adv/abs_mean": adv.abs().mean(),
        "adv/positive_frac": (adv > 0).double().mean(),
    }


def response_masks(samples: Sequence[Sample], shape: torch.Size) -> Tensor:
    """Each sample's own loss mask (filtered or not), right-padded to ``shape`` ``[N, T]``."""
    out = torch.zeros(shape, dtype=torch.float32)
    for i, s in enumerate(samples):
        out[i, : s.num_tokens] = s.loss_mask.float()
    return out


def fill_old_logprobs(policy: Policy, samples: Sequence[Sample], cfg: Config) -> None:
    """Old log-probs: the current policy (before this step's update) on the collected tokens.

    Stored as the samples' behaviour log-probs, so replayed samples keep their collection-time
    values and the SIL importance ratio is a true ratio against the behaviour policy.
    """
    if not samples:
        return
    batch = TokenBatch.collate(samples, pad_id=policy.tokenizer.pad_token_id)
    # Log-probs are computed where the loss mask is set; give filtered samples (all-zero mask in
    # a collated batch) their own response mask so they get behaviour log-probs too.
    batch = replace(batch, loss_mask=response_masks(samples, batch.loss_mask.shape))
    lp = policy.batch_logprobs(
        batch, micro_batch_size=cfg.optim.micro_batch_size, temperature=cfg.rollout.temperature
    )
    set_behavior_logprobs(samples, lp)


def set_behavior_logprobs(samples: Sequence[Sample], logprobs: Tensor) -> None:
    """Row ``i`` of ``logprobs [N, T]`` becomes sample ``i``'s behaviour log-probs (0 off its
    loss mask)."""
    for i, s in enumerate(samples):
        s.behavior_logprobs = logprobs[i, : s.num_tokens] * s.loss_mask.float()


def episode_metrics(episodes: Sequence[Episode], prefix: str) -> dict[str, float]:
    """Success, reward, tool use and length statistics of a set of episodes (plain floats)."""
    n = max(1, len(episodes))
    ends: dict[str, int] = {}
    for e in episodes:
        ends[e.end_reason.value] = ends.get(e.end_reason.value, 0) + 1
    out = {
        f"{prefix}/success": sum(e.success for e in episodes) / n,
        f"{prefix}/outcome_reward": sum(e.outcome_reward for e in episodes) / n,
        f"{prefix}/tool_calls": sum(e.num_tool_calls for e in episodes) / n,
        f"{prefix}/invalid_tool_calls": sum(e.num_invalid_tool_calls for e in episodes) / n,
        f"{prefix}/tool_errors": sum(e.num_tool_errors for e in episodes) / n,
        f"{prefix}/invalid_actions": sum(e.num_invalid_actions for e in episodes) / n,
        f"{prefix}/turns": sum(e.num_turns for e in episodes) / n,
        f"{prefix}/response_tokens": sum(
            sum(s.num_response_tokens for s in e.samples) for e in episodes
        )
        / n,
        f"{prefix}/episodes": float(len(episodes)),
        # final answers scored wrong because their symbolic check hit its time or memory bound
        f"{prefix}/answer_check_timeouts": sum(
            bool(e.info.get("answer_check_bounded")) for e in episodes
        )
        / n,
    }
    out.update({f"{prefix}/end_{k}": v / n for k, v in sorted(ends.items())})
    out.update(reward_term_metrics(episodes, prefix))
    return out


def reward_term_metrics(episodes: Sequence[Episode], prefix: str) -> dict[str, float]:
    """``{prefix}/reward_<name>``: the mean of each named reward term over all ``episodes``
    (an episode without the term, e.g. one cut off before answering, counts 0)."""
    sums: dict[str, float] = {}
    for e in episodes:
        terms = e.info.get("reward_terms")
        for name, value in (terms if isinstance(terms, dict) else {}).items():
            sums[name] = sums.get(name, 0.0) + float(value)
    n = max(1, len(episodes))
    return {f"{prefix}/reward_{name}": v / n for name, v in sorted(sums.items())}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate of one task from ``n`` samples of which ``c`` succeeded:
    ``1 - C(n-c, k) / C(n, k)``, the chance that k of the n samples drawn without replacement
    include a success (Chen et al. 2021). 1 when fewer than k samples failed."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sampled_metrics(
    episodes: Sequence[Episode], n: int, ks: Sequence[int], prefix: str
) -> dict[str, float]:
    """``{prefix}/pass@k`` (the mean over tasks of :func:`pass_at_k`) for each k and
    ``{prefix}/mean@n`` (the success rate of all samples) from ``n`` episodes per task, grouped
    by ``group_id``."""
    groups: dict[int, list[bool]] = {}
    for e in episodes:
        groups.setdefault(e.group_id, []).append(e.success)
    if any(len(g) != n for g in groups.values()):
        raise ValueError(f"every task needs exactly {n} sampled episodes")
    tasks = max(1, len(groups))
    out = {
        f"{prefix}/pass@{k}": sum(pass_at_k(n, sum(g), k) for g in groups.values()) / tasks
        for k in ks
    }
    out[f"{prefix}/mean@{n}"] = sum(sum(g) for g in groups.values()) / (tasks * n)
    return out
