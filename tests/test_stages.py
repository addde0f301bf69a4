"""spear/stages.py: pass@k (the unbiased estimator) and mean@n of sampled held-out episodes;
the advantage stage, with hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from spear.config import ConfigError, load_config
from spear.stages import compute_advantages, pass_at_k, sampled_metrics
from spear.types import EndReason, Episode, Sample


@pytest.mark.parametrize(
    ("n", "c", "k", "expect"),
    [
        (4, 1, 1, 0.25),  # pass@1 is c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 2, 2, 1 - 1 / 6),  # 1 - C(2,2)/C(4,2)
        (3, 2, 2, 1.0),  # only one failure: any 2 samples include a success
        (6, 0, 3, 0.0),
        (6, 6, 6, 1.0),
    ],
)
def test_pass_at_k_hand_derived(n: int, c: int, k: int, expect: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expect)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="need 0 <= c <= n"):
        pass_at_k(n, c, k)


def _ep(group: int, success: bool) -> Episode:
    return Episode("t", group, 0, [], EndReason.ANSWER, float(success), success, 1, 0, 0)


def test_sampled_metrics_average_over_tasks() -> None:
    # task 0: 1 of 4 right; task 1: 2 of 4 right
    eps = [_ep(0, s) for s in (True, False, False, False)] + [
        _ep(1, s) for s in (True, True, False, False)
    ]
    got = sampled_metrics(eps, 4, [1, 2, 4], "eval")
    assert got == {
        "eval/pass@1": pytest.approx((0.25 + 0.5) / 2),
        "eval/pass@2": pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2),
        "eval/pass@4": pytest.approx(1.0),
        "eval/mean@4": pytest.approx(3 / 8),
    }
    with pytest.raises(ValueError, match="exactly 4 sampled episodes"):
        sampled_metrics(eps[:-1], 4, [1], "eval")


def test_eval_sampling_config() -> None:
    assert load_config().eval.ks == []
    assert load_config(overrides=["eval.samples=8"]).eval.ks == [1, 8]
    assert load_config(overrides=["eval.samples=8", "eval.pass_at=[4,2,4]"]).eval.ks == [2, 4]
    with pytest.raises(ConfigError, match=r"eval.pass_at=\[9\] must lie in 1..eval.samples=8"):
        load_config(overrides=["eval.samples=8", "eval.pass_at=[9]"])
    with pytest.raises(ConfigError, match=r"eval\.pass_at needs eval\.samples"):
        load_config(overrides=["eval.pass_at=[1]"])


# ----------------------------------------------------------------------------------------------
# compute_advantages


def _sample(group: int, episode: int, score: float, **kw: object) -> Sample:
    return Sample(
        input_ids=torch.tensor([1, 2, 3]),
        loss_mask=torch.tensor([False, True, True]),
        behavior_logprobs=torch.zeros(3),
        group_id=group,
        episode_id=episode,
        score=score,
        **kw,  # type: ignore[arg-type]
    )


def test_grpo_groups_by_id_and_zeroes_filtered_and_lone_samples() -> None:
    # group 0: scores 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 1/sqrt(3), so
    # A = +-0.5 sqrt(3) = +-0.8660; its 4th sample is response-filtered: in the statistics, A 0.
    # group 1: scores 2, 2 -> std 0 -> A = 0 / (0 + eps) = 0. group 2: one sample -> A = 0.
    # Rows interleave the groups: grouping is by id, never by position.
    samples = [
        _sample(0, 0, 1.0), _sample(1, 4, 2.0), _sample(0, 1, 0.0), _sample(2, 6, 5.0),
        _sample(0, 2, 0.0), _sample(1, 5, 2.0), _sample(0, 3, 1.0, filtered_by=("overlong",)),
    ]  # fmt: skip
    m = compute_advantages(samples, load_config(overrides=["advantage.estimator=grpo"]))
    a = 0.5 / (1 / math.sqrt(3) + 1e-6)  # eps = advantage.eps
    assert [s.advantage for s in samples] == pytest.approx([a, 0, -a, 0, -a, 0, 0], abs=1e-9)
    # statistics over all 7 samples: mean -a/7, |A| mean 3a/7, one positive
    assert float(m["adv/mean"]) == pytest.approx(-a / 7, abs=1e-9)
    assert float(m["adv/abs_mean"]) == pytest.approx(3 * a / 7, abs=1e-9)
    assert float(m["adv/positive_frac"]) == pytest.approx(1 / 7)


def test_the_estimator_and_its_options_come_from_the_config() -> None:
    samples = [_sample(0, 0, 3.0), _sample(0, 1, 1.0)]  # mean 2, std sqrt(2)
    compute_advantages(samples, load_config(overrides=["advantage.estimator=drgrpo"]))
    assert [s.advantage for s in samples] == [1.0, -1.0]  # R - mean, never / std
    compute_advantages(samples, load_config(overrides=["advantage.norm_by_std=false"]))
    assert [s.advantage for s in samples] == [1.0, -1.0]  # grpo without std
    compute_advantages(samples, load_config(overrides=["advantage.eps=1.0"]))
    want = 1 / (math.sqrt(2) + 1.0)
    assert [s.advantage for s in samples] == pytest.approx([want, -want], abs=1e-12)
    assert compute_advantages([], load_config()) == {}


def test_gigpo_discounts_turn_rewards_and_clusters_by_anchor() -> None:
    # one group, two episodes of two turns (turn layout). Episode term (mean_norm): episode
    # scores 1 and 0, mean 0.5 -> +0.5 / -0.5. Step returns with gamma 0.5: episode 0 turn
    # rewards (0, 1) -> G = (0 + 0.5 * 1, 1) = (0.5, 1); episode 1 (0, 0) -> (0, 0). Anchor "s0"
    # holds both first turns: returns 0.5 and 0 around mean 0.25 -> +0.25 / -0.25; "s1" and "s2"
    # are singletons -> 0. Total: 0.75, 0.5, -0.75, -0.5.
    samples = [
        _sample(0, 0, 1.0, turn_index=0, turn_reward=0.0, anchor="s0"),
        _sample(0, 0, 1.0, turn_index=1, turn_reward=1.0, anchor="s1"),
        _sample(0, 1, 0.0, turn_index=0, turn_reward=0.0, anchor="s0"),
        _sample(0, 1, 0.0, turn_index=1, turn_reward=0.0, anchor="s2"),
    ]
    gigpo = [
        "rollout.layout=turn", "advantage.estimator=gigpo", "advantage.gigpo_gamma=0.5",
        "advantage.gigpo_norm_by_std=false", "advantage.stats_over=episode",
    ]  # fmt: skip
    compute_advantages(samples, load_config(overrides=[*gigpo, "advantage.gigpo_step_weight=1"]))
    assert [s.advantage for s in samples] == pytest.approx([0.75, 0.5, -0.75, -0.5], abs=1e-12)
    # the step weight scales the step term only: 0.5 + 2 * 0.25 = 1.0 for the first turn
    compute_advantages(samples, load_config(overrides=[*gigpo, "advantage.gigpo_step_weight=2"]))
    assert [s.advantage for s in samples] == pytest.approx([1.0, 0.5, -1.0, -0.5], abs=1e-12)
