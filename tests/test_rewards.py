import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear.rewards import ToolBonus, assign_rewards, counted_calls, tool_call_bonus
from spear.schedules import Constant, CosineDown
from spear.types import EndReason, Episode, Sample


def sample(episode: int, turn: int = 0) -> Sample:
    ids = torch.arange(5)
    return Sample(ids, ids >= 2, torch.zeros(5), group_id=0, episode_id=episode, turn_index=turn)


def episode(
    episode_id: int = 0,
    *,
    outcome: float = 0.0,
    turns: int = 1,
    calls: int = 0,
    invalid: int = 0,
    n_samples: int = 1,
) -> Episode:
    return Episode(
        task_id="t",
        group_id=0,
        episode_id=episode_id,
        samples=[sample(episode_id, k) for k in range(n_samples)],
        end_reason=EndReason.ANSWER,
        outcome_reward=outcome,
        success=outcome > 0,
        num_turns=turns,
        num_tool_calls=calls,
        num_invalid_tool_calls=invalid,
    )


COSINE_200 = CosineDown(value=1.0, horizon=200)


def test_agent_setting_worked_values() -> None:
    # §11 (turns counted): length 4, t=100 -> min(1, 0.1 * 4) * 0.5 = 0.2
    tb = ToolBonus(alpha=0.1, cap=1.0, schedule=COSINE_200, count="turns")
    e = episode(turns=4, calls=0, outcome=10.0, n_samples=4)
    m = assign_rewards([e], 100, tb, invalid_penalty=0.0)
    assert [s.tool_bonus for s in e.samples] == pytest.approx([0.2] * 4)
    assert [s.score for s in e.samples] == pytest.approx(
        [10.2] * 4
    )  # outcome + bonus on every turn
    assert m["reward/tool_factor"] == pytest.approx(0.5)
    # §11: length 37, t=0 -> min(1, 3.7) * 1 = 1.0
    e = episode(turns=37)
    assign_rewards([e], 0, tb, invalid_penalty=0.0)
    assert e.samples[0].tool_bonus == pytest.approx(1.0)


def test_math_setting_counts_valid_tool_calls_not_turns() -> None:
    tb = ToolBonus(alpha=0.1, cap=1.0, schedule=COSINE_200, count="tool_calls")
    e = episode(turns=6, calls=3, outcome=-1.0)
    assign_rewards([e], 0, tb, invalid_penalty=0.0)
    # min(1, 0.1 * 3) * phi(0)=1 -> 0.3; wrong answers get the bonus too: -1 + 0.3
    assert e.samples[0].tool_bonus == pytest.approx(0.3)
    assert e.samples[0].score == pytest.approx(-0.7)
    assert counted_calls(e, "turns") == 6 and counted_calls(e, "tool_calls") == 3


def test_modes_as_schedules() -> None:
    e = episode(calls=5)
    none = ToolBonus(alpha=0.1, cap=1.0, schedule=Constant(0.0), count="tool_calls")
    assign_rewards([e], 7, none, invalid_penalty=0.0)
    assert e.samples[0].tool_bonus == 0.0
    constant = ToolBonus(alpha=0.1, cap=1.0, schedule=Constant(1.0), count="tool_calls")
    assign_rewards([e], 250, constant, invalid_penalty=0.0)
    assert e.samples[0].tool_bonus == pytest.approx(0.5)  # no decay: min(1, 0.5) * 1
    cosine = ToolBonus(alpha=0.1, cap=1.0, schedule=COSINE_200, count="tool_calls")
    assign_rewards([e], 250, cosine, invalid_penalty=0.0)
    assert e.samples[0].tool_bonus == 0.0  # faded out after T


def test_penalty_and_score_and_metrics() -> None:
    tb = ToolBonus(alpha=0.25, cap=1.0, schedule=Constant(1.0), count="tool_calls")
    a = episode(0, outcome=1.0, calls=2, invalid=3)  # bonus min(1, 0.5) = 0.5, penalty 0.1*3 = 0.3
    b = episode(1, outcome=0.0, calls=8, invalid=0, n_samples=2)  # bonus min(1, 2.0) = 1, penalty 0
    m = assign_rewards([a, b], 3, tb, invalid_penalty=0.1)
    s = a.samples[0]
    assert (s.outcome_reward, s.tool_bonus, s.penalty) == pytest.approx((1.0, 0.5, 0.3))
    assert s.score == pytest.approx(1.0 + 0.5 - 0.3)
    assert [x.score for x in b.samples] == pytest.approx([1.0, 1.0])
    assert m == pytest.approx(
        {
            "reward/outcome": 0.5,  # (1 + 0) / 2
            "reward/tool_bonus": 0.75,  # (0.5 + 1) / 2
            "reward/penalty": 0.15,  # (0.3 + 0) / 2
            "reward/score": 1.1,  # (1.2 + 1.0) / 2
            "reward/tool_factor": 1.0,
            "reward/counted_calls": 5.0,  # (2 + 8) / 2
            "reward/bonus_capped_frac": 0.5,  # only b reaches the cap
        }
    )


def test_a_turn_penalty_is_paid_by_its_own_sample_only() -> None:
    # turn layout: 3 turn samples of one episode (outcome 1, bonus 0); turn 1 was inadmissible
    tb = ToolBonus(alpha=0.0, cap=1.0, schedule=Constant(1.0), count="turns")
    e = episode(0, outcome=1.0, turns=3, n_samples=3)
    e.samples[1].turn_penalty = 0.1
    m = assign_rewards([e], 3, tb, invalid_penalty=0.0)
    assert [s.score for s in e.samples] == pytest.approx([1.0, 0.9, 1.0])
    assert [s.penalty for s in e.samples] == pytest.approx([0.0, 0.1, 0.0])
    assert [s.outcome_reward for s in e.samples] == [1.0, 1.0, 1.0]  # not in the outcome
    assert m["reward/penalty"] == pytest.approx(0.1) and m["reward/score"] == pytest.approx(0.9)
    # with invalid_call_penalty as well, every sample pays the episode's and its own turn's
    f = episode(0, outcome=1.0, invalid=1, n_samples=2)
    f.samples[0].turn_penalty = 0.1
    assign_rewards([f], 3, tb, invalid_penalty=0.2)
    assert [s.score for s in f.samples] == pytest.approx([0.7, 0.8])


def test_no_episodes() -> None:
    tb = ToolBonus(alpha=0.1, cap=1.0, schedule=COSINE_200, count="turns")
    m = assign_rewards([], 100, tb, invalid_penalty=0.0)
    assert m["reward/tool_factor"] == pytest.approx(0.5)
    assert math.isnan(m["reward/outcome"])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"alpha": -0.1}, "alpha"),
        ({"cap": math.inf}, "cap"),
        ({"count": "calls"}, "count"),
        ({"schedule": 1.0}, "schedule"),
    ],
)
def test_tool_bonus_validation(kwargs: dict, needle: str) -> None:
    base = {"alpha": 0.1, "cap": 1.0, "schedule": COSINE_200, "count": "turns"}
    with pytest.raises(ValueError, match=needle):
        ToolBonus(**{**base, **kwargs})


def test_bad_inputs_to_assign_rewards() -> None:
    tb = ToolBonus(alpha=0.1, cap=1.0, schedule=COSINE_200, count="turns")
    with pytest.raises(ValueError, match="invalid_penalty"):
        assign_rewards([episode()], 1, tb, invalid_penalty=-1.0)
    with pytest.raises(ValueError, match="outcome_reward"):
        assign_rewards([episode(outcome=math.nan)], 1, tb, invalid_penalty=0.0)
    with pytest.raises(ValueError, match="step"):
        assign_rewards([episode()], -1, tb, invalid_penalty=0.0)


def test_negative_or_nonfinite_phi_is_reported_not_clipped() -> None:
    # a schedule that goes below 0 would turn the bonus into a penalty: say so at that step
    from spear.schedules import Linear

    tb = ToolBonus(alpha=0.1, cap=1.0, schedule=Linear(1.0, -1.0, 10), count="turns")
    assign_rewards([episode(turns=3)], 5, tb, invalid_penalty=0.0)  # phi(5) = 0: fine
    with pytest.raises(ValueError, match=r"phi\(6\)"):
        assign_rewards([episode(turns=3)], 6, tb, invalid_penalty=0.0)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(0, 100),
    alpha=st.floats(0, 2),
    cap=st.floats(0, 5),
    phi=st.floats(0, 1),
)
def test_bonus_bounded_and_monotone(n: int, alpha: float, cap: float, phi: float) -> None:
    b = tool_call_bonus(torch.tensor([n, n + 1]), alpha, cap, phi)
    assert 0.0 <= float(b[0]) <= cap * phi + 1e-12
    assert float(b[1]) >= float(b[0])
