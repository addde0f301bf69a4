"""Advantage estimators: hand-derived numbers, layouts, GiGPO, discounted returns, properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear.algo.advantages import (
    ADVANTAGES,
    AdvantageInput,
    AdvantageParams,
    discounted_returns,
)
from spear.registry import UnknownNameError

SQRT3 = math.sqrt(3.0)


def params(**kw: object) -> AdvantageParams:
    base: dict[str, object] = dict(
        norm_by_std=True,
        eps=1e-6,
        stats_over="episode",
        gigpo_step_weight=1.0,
        gigpo_norm_by_std=True,
    )
    base.update(kw)
    return AdvantageParams(**base)  # type: ignore[arg-type]


def one_per_episode(
    scores: list[float], groups: list[int], valid: list[bool] | None = None
) -> AdvantageInput:
    n = len(scores)
    return AdvantageInput(
        scores=torch.tensor(scores, dtype=torch.float64),
        group_ids=torch.tensor(groups),
        episode_ids=torch.arange(100, 100 + n),
        valid=torch.tensor(valid if valid is not None else [True] * n),
    )


# Rows interleave two groups (B5: grouping by id, not position).
# group 0: scores 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 1/sqrt(3)
#          A = +-0.5 * sqrt(3) = +-0.866025
# group 1: scores 2, 0 -> mean 1, unbiased std sqrt((1 + 1) / 1) = sqrt(2); A = +-1/sqrt(2)
INTERLEAVED = one_per_episode([1, 2, 0, 0, 0, 1], [0, 1, 0, 0, 1, 0])


def test_grpo_std_normalised() -> None:
    a = ADVANTAGES.get("grpo")(INTERLEAVED, params(eps=1e-12))
    h, r = 0.5 * SQRT3, 1 / math.sqrt(2.0)
    torch.testing.assert_close(a, torch.tensor([h, r, -h, -h, -r, h], dtype=torch.float64))


def test_grpo_eps_is_added_to_std() -> None:
    # std of group 1 is sqrt(2); eps = 1 -> A = 1 / (sqrt(2) + 1) = 0.414214
    a = ADVANTAGES.get("grpo")(INTERLEAVED, params(eps=1.0))
    assert a[1].item() == pytest.approx(1 / (math.sqrt(2) + 1))


@pytest.mark.parametrize("name", ["grpo", "drgrpo"])
def test_mean_only(name: str) -> None:
    # no std: group 0 -> +-0.5, group 1 -> +-1. drgrpo ignores norm_by_std=True.
    a = ADVANTAGES.get(name)(INTERLEAVED, params(norm_by_std=name == "drgrpo"))
    torch.testing.assert_close(a, torch.tensor([0.5, 1, -0.5, -0.5, -1, 0.5], dtype=torch.float64))


def test_equal_scores_give_zero_not_nan() -> None:
    a = ADVANTAGES.get("grpo")(one_per_episode([1, 1, 1], [0, 0, 0]), params())
    assert torch.equal(a, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
def test_singleton_group_gets_zero(name: str) -> None:
    # verl would give R / (1 + eps) (grpo) or R (rloo) to the lone sample; we give 0.
    a = ADVANTAGES.get(name)(one_per_episode([5.0, 1.0, 0.0], [7, 3, 3]), params())
    assert a[0].item() == 0.0
    assert a[1].item() != 0.0


def test_filtered_sample_in_stats_but_zero_advantage() -> None:
    # group [1, 0, 0, 1] with the last filtered: stats unchanged (+-0.866), last gets 0
    inp = one_per_episode([1, 0, 0, 1], [0, 0, 0, 0], valid=[True, True, True, False])
    a = ADVANTAGES.get("grpo")(inp, params())
    h = 0.5 * SQRT3
    torch.testing.assert_close(
        a, torch.tensor([h, -h, -h, 0.0], dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_rloo_hand_values() -> None:
    # group 0 [1,0,0,1]: 1 - mean(0,0,1) = 2/3; 0 - mean(0,1,1) = -2/3
    # group 1 [3,1,2]: 3 - 1.5 = 1.5; 1 - 2.5 = -1.5; 2 - 2 = 0
    inp = one_per_episode([1, 3, 0, 1, 0, 2, 1], [0, 1, 0, 1, 0, 1, 0])
    a = ADVANTAGES.get("rloo")(inp, params())
    t = 2 / 3
    torch.testing.assert_close(a, torch.tensor([t, 1.5, -t, -1.5, -t, 0.0, t], dtype=torch.float64))


def turn_layout() -> AdvantageInput:
    """Group 0: episode 10 has 3 turns scored 1, episode 11 has 1 turn scored 0 (rows shuffled)."""
    return AdvantageInput(
        scores=torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64),
        group_ids=torch.tensor([0, 0, 0, 0]),
        episode_ids=torch.tensor([10, 11, 10, 10]),
        valid=torch.ones(4, dtype=torch.bool),
    )


def test_turn_layout_stats_over_episode() -> None:
    # episodes [1, 0]: mean 0.5, std sqrt(0.5) -> A = +-0.5/0.707107 = +-0.707107 for every turn
    a = ADVANTAGES.get("grpo")(turn_layout(), params(stats_over="episode"))
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(
        a, torch.tensor([s, -s, s, s], dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_turn_layout_stats_over_sample() -> None:
    # samples [1,1,1,0]: mean 0.75, std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    # A = 0.25 / 0.5 = 0.5 for episode 10's turns, -0.75 / 0.5 = -1.5 for episode 11
    a = ADVANTAGES.get("grpo")(turn_layout(), params(stats_over="sample"))
    torch.testing.assert_close(
        a, torch.tensor([0.5, -1.5, 0.5, 0.5], dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_episode_score_is_mean_of_its_turns() -> None:
    # episode 10 turn scores 1, 1, -0.2 (an invalid-action penalty) -> episode score 0.6;
    # episode 11 -> 0. No std: A = +-0.3 on every turn of the episode.
    inp = turn_layout()
    inp = AdvantageInput(
        scores=torch.tensor([1.0, 0.0, 1.0, -0.2], dtype=torch.float64),
        group_ids=inp.group_ids,
        episode_ids=inp.episode_ids,
        valid=inp.valid,
    )
    a = ADVANTAGES.get("drgrpo")(inp, params())
    torch.testing.assert_close(a, torch.tensor([0.3, -0.3, 0.3, 0.3], dtype=torch.float64))


def gigpo_input() -> AdvantageInput:
    """Group 0: episode a (score 1) visits anchors s0 then s1 with step returns 0.9, 1.0;
    episode b (score 0) visits s0 then s2 with returns 0, 0. Group 1: a lone episode c that
    also visits s0 (return 5) -- it must not join group 0's s0 cluster."""
    return AdvantageInput(
        scores=torch.tensor([1.0, 1.0, 0.0, 0.0, 3.0], dtype=torch.float64),
        group_ids=torch.tensor([0, 0, 0, 0, 1]),
        episode_ids=torch.tensor([1, 1, 2, 2, 3]),
        valid=torch.ones(5, dtype=torch.bool),
        step_returns=torch.tensor([0.9, 1.0, 0.0, 0.0, 5.0], dtype=torch.float64),
        anchor_ids=torch.tensor([0, 1, 0, 2, 0]),
    )


def test_gigpo_std_norm() -> None:
    # episode term: [1, 0] -> +-1/sqrt(2) = +-0.707107; lone group 1 -> 0
    # step term: cluster (g0, s0) = [0.9, 0.0]: mean 0.45, std sqrt(2 * 0.45^2) = 0.636396
    #   -> +-0.707107; s1, s2 and group 1's s0 are singletons -> 0
    # w = 0.5: a0 = 0.707107 + 0.353553 = 1.060660; a1 = 0.707107; b0 = -1.060660; b1 = -0.707107
    a = ADVANTAGES.get("gigpo")(gigpo_input(), params(gigpo_step_weight=0.5))
    s = 1 / math.sqrt(2)
    expected = torch.tensor([1.5 * s, s, -1.5 * s, -s, 0.0], dtype=torch.float64)
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=0)


def test_gigpo_mean_norm() -> None:
    # no std: episode +-0.5, step +-0.45 -> a0 = 0.5 + 0.45 = 0.95, a1 = 0.5, b0 = -0.95, b1 = -0.5
    a = ADVANTAGES.get("gigpo")(gigpo_input(), params(gigpo_norm_by_std=False, norm_by_std=True))
    torch.testing.assert_close(a, torch.tensor([0.95, 0.5, -0.95, -0.5, 0.0], dtype=torch.float64))


def test_gigpo_needs_step_inputs() -> None:
    with pytest.raises(ValueError, match="step_returns"):
        ADVANTAGES.get("gigpo")(INTERLEAVED, params())


def test_discounted_returns() -> None:
    # episode 5: turns 0,1,2 rewards 0,0,1, gamma 0.5 -> [0.25, 0.5, 1]
    # episode 9: turns 0 and 5 (a gap is not a missing turn): rewards 1, 2 -> [1 + 0.5*2, 2]
    ep = torch.tensor([9, 5, 9, 5, 5])
    turn = torch.tensor([5, 2, 0, 1, 0])
    rewards = torch.tensor([2.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    out = discounted_returns(rewards, ep, turn, gamma=0.5)
    torch.testing.assert_close(out, torch.tensor([2.0, 1.0, 2.0, 0.5, 0.25], dtype=torch.float64))


def test_discounted_returns_errors() -> None:
    with pytest.raises(ValueError, match="same turn_index"):
        discounted_returns(torch.zeros(2), torch.tensor([1, 1]), torch.tensor([0, 0]), 0.9)
    with pytest.raises(ValueError, match="gamma"):
        discounted_returns(torch.zeros(1), torch.tensor([1]), torch.tensor([0]), 1.5)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="group_ids"):
        AdvantageInput(
            torch.zeros(3),
            torch.zeros(2, dtype=torch.long),
            torch.arange(3),
            torch.ones(3, dtype=torch.bool),
        )
    with pytest.raises(TypeError, match="episode_ids"):
        AdvantageInput(
            torch.zeros(2),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(2),
            torch.ones(2, dtype=torch.bool),
        )
    with pytest.raises(TypeError, match="valid"):
        AdvantageInput(
            torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.arange(2), torch.ones(2)
        )
    with pytest.raises(ValueError, match="eps"):
        params(eps=0.0)
    with pytest.raises(ValueError, match="stats_over"):
        params(stats_over="turn")
    mixed = AdvantageInput(
        torch.zeros(2), torch.tensor([0, 1]), torch.tensor([4, 4]), torch.ones(2, dtype=torch.bool)
    )
    with pytest.raises(ValueError, match="episode 4"):
        ADVANTAGES.get("grpo")(mixed, params())
    with pytest.raises(UnknownNameError, match="grpo"):
        ADVANTAGES.get("gpro")


@st.composite
def grouped(draw: st.DrawFn) -> AdvantageInput:
    """Random groups of episodes of random length (turn layout), rows shuffled."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    num_eps = draw(st.integers(1, 12))
    ep_group = torch.randint(0, draw(st.integers(1, 4)), (num_eps,), generator=g)
    lengths = torch.randint(1, 4, (num_eps,), generator=g)
    ep = torch.arange(num_eps).repeat_interleave(lengths)
    perm = torch.randperm(ep.numel(), generator=g)
    ep = ep[perm]
    scores = torch.randint(0, 3, (ep.numel(),), generator=g).double()
    return AdvantageInput(
        scores, ep_group[ep] * 7 + 3, ep * 11, torch.ones(ep.numel(), dtype=torch.bool)
    )


@settings(max_examples=40, deadline=None)
@given(inp=grouped(), norm=st.booleans(), over=st.sampled_from(["episode", "sample"]))
def test_grpo_centres_each_group_on_zero(inp: AdvantageInput, norm: bool, over: str) -> None:
    a = ADVANTAGES.get("grpo")(inp, params(norm_by_std=norm, stats_over=over))
    _, gi = torch.unique(inp.group_ids, return_inverse=True)
    if over == "sample":  # sum over the group's samples
        sums = torch.zeros(int(gi.max()) + 1, dtype=a.dtype).index_add(0, gi, a)
    else:  # one value per episode, summed over the group's episodes
        _, ei = torch.unique(inp.episode_ids, return_inverse=True)
        per_ep = torch.zeros(int(ei.max()) + 1, dtype=a.dtype).index_copy(0, ei, a)
        ep_g = torch.zeros_like(per_ep, dtype=torch.long).index_copy(0, ei, gi)
        sums = torch.zeros(int(gi.max()) + 1, dtype=a.dtype).index_add(0, ep_g, per_ep)
    torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-9, rtol=0)


@settings(max_examples=25, deadline=None)
@given(inp=grouped(), name=st.sampled_from(["grpo", "drgrpo", "rloo"]), seed=st.integers(0, 1000))
def test_row_order_does_not_matter(inp: AdvantageInput, name: str, seed: int) -> None:
    perm = torch.randperm(inp.scores.numel(), generator=torch.Generator().manual_seed(seed))
    shuffled = AdvantageInput(
        inp.scores[perm], inp.group_ids[perm], inp.episode_ids[perm], inp.valid[perm]
    )
    p = params()
    torch.testing.assert_close(
        ADVANTAGES.get(name)(shuffled, p), ADVANTAGES.get(name)(inp, p)[perm]
    )


def gigpo_turn_layout() -> AdvantageInput:
    """One group: episode 10 has three turns (scores 1), episode 11 one turn (score 0); the first
    turns of both share an anchor, with step returns 0.9025 and 0."""
    return AdvantageInput(
        scores=torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64),
        group_ids=torch.tensor([0, 0, 0, 0]),
        episode_ids=torch.tensor([10, 10, 10, 11]),
        valid=torch.ones(4, dtype=torch.bool),
        step_returns=torch.tensor([0.9025, 0.95, 1.0, 0.0], dtype=torch.float64),
        anchor_ids=torch.tensor([0, 1, 2, 0]),
    )


@pytest.mark.parametrize(
    ("stats_over", "episode_term"),
    [
        # the reference (§5.2, §5.3): mean over the group's 4 turns = 0.75 -> +0.25 / -0.75
        ("sample", [0.25, 0.25, 0.25, -0.75]),
        # the option: mean over the 2 episodes' scores (1, 0) = 0.5 -> +-0.5
        ("episode", [0.5, 0.5, 0.5, -0.5]),
    ],
)
def test_gigpo_episode_term_over_turns_or_episodes(
    stats_over: str, episode_term: list[float]
) -> None:
    # step term (no std): anchor 0 holds returns 0.9025 and 0 -> mean 0.45125 -> +-0.45125;
    # the other anchors are single turns -> 0
    step = [0.45125, 0.0, 0.0, -0.45125]
    a = ADVANTAGES.get("gigpo")(
        gigpo_turn_layout(), params(stats_over=stats_over, gigpo_norm_by_std=False)
    )
    want = torch.tensor([e + s for e, s in zip(episode_term, step)], dtype=torch.float64)
    torch.testing.assert_close(a, want, atol=1e-12, rtol=0)
