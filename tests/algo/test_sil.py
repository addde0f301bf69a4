"""The pure math of self-imitation replay (spear.algo.sil), with the reference's §11 values."""

import math

import pytest
import torch

from spear.algo.sil import draw_indices, group_baseline_stats, keep_mask, median, recalibrate_median


def test_group_baseline_stats_hand_values() -> None:
    # group 7: episode 0 has two samples (scores 1, 3 -> episode score 2), episode 1 score 4
    #   -> mean (2 + 4) / 2 = 3, unbiased std sqrt(((2-3)^2 + (4-3)^2) / 1) = sqrt(2)
    # group 2: one episode (score 5) -> mean 5, std 0 (single episode)
    scores = torch.tensor([1.0, 3.0, 4.0, 5.0])
    groups = torch.tensor([7, 7, 7, 2])
    eps = torch.tensor([0, 0, 1, 9])
    gids, means, stds = group_baseline_stats(scores, groups, eps)
    assert gids.tolist() == [2, 7]
    assert means.tolist() == pytest.approx([5.0, 3.0])
    assert stds.tolist() == pytest.approx([0.0, math.sqrt(2.0)])


def test_group_baseline_stats_rejects_episode_in_two_groups() -> None:
    with pytest.raises(ValueError, match="episode_id"):
        group_baseline_stats(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), torch.tensor([5, 5]))


def test_median_worked_value() -> None:
    # §11: history means [0, 2.5, 5, 10] -> p50 = (2.5 + 5) / 2 = 3.75 (linear interpolation)
    assert median(torch.tensor([10.0, 0.0, 5.0, 2.5])) == pytest.approx(3.75)
    assert math.isnan(median(torch.zeros(0)))


def test_recalibration_worked_values() -> None:
    # §11: A = R - 3.75: 10.4 -> 6.65 (kept), 1.0 -> -2.75 (dropped);
    # with std normalisation and s50 = 2: 6.65 / (2 + 1e-6) = 3.325 (to 1e-6)
    r = torch.tensor([10.4, 1.0])
    a = recalibrate_median(r, 3.75, 2.0, normalize_by_std=False, std_eps=1e-6)
    assert a.tolist() == pytest.approx([6.65, -2.75])
    assert keep_mask(a, "positive").tolist() == [True, False]
    a_std = recalibrate_median(r, 3.75, 2.0, normalize_by_std=True, std_eps=1e-6)
    assert float(a_std[0]) == pytest.approx(3.325, abs=1e-5)


def test_draw_indices_prioritized_prefers_positive_and_handles_ties() -> None:
    g = torch.Generator().manual_seed(0)
    # only index 2 has positive priority: drawing 1 must give it
    assert draw_indices(torch.tensor([0.0, 0.0, 5.0]), 1, "prioritized", g).tolist() == [2]
    # k larger than the positives: all positives, then zeros uniformly
    out = draw_indices(torch.tensor([0.0, 3.0, 0.0, 0.0]), 2, "prioritized", g).tolist()
    assert 1 in out and len(set(out)) == 2
    # all-equal and all-zero priorities never crash
    assert len(draw_indices(torch.ones(10), 4, "prioritized", g).unique()) == 4
    assert len(draw_indices(torch.zeros(10), 4, "prioritized", g).unique()) == 4
    # k >= n takes all, in order; empty input is fine
    assert draw_indices(torch.tensor([1.0, 2.0]), 5, "uniform", g).tolist() == [0, 1]
    assert draw_indices(torch.zeros(0), 3, "prioritized", g).tolist() == []


def test_prioritized_sampling_is_proportional() -> None:
    # priorities 1 vs 9: drawing 1 of 2, index 1 must win ~90% of 2000 draws
    g = torch.Generator().manual_seed(1)
    wins = sum(
        draw_indices(torch.tensor([1.0, 9.0]), 1, "prioritized", g).item() for _ in range(2000)
    )
    assert 0.87 < wins / 2000 < 0.93
