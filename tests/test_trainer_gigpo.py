"""A real GiGPO training step in the turn layout (one sample per turn) on the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import spear.trainer as trainer_module
from spear.config import load_config
from spear.envs.base import StepResult, Task
from spear.stages import compute_advantages, fill_old_logprobs
from spear.trainer import Trainer
from spear.types import Message, Sample
from tests.test_trainer import _cfg


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spear-cache")


class WalkingEnv:
    """A text game of ``rollout.max_turns`` moves: turn k shows "room k" (the GiGPO anchor, shared
    by the episodes of a group at the same turn) and pays 1 when the reply has an even number of
    characters, so step returns differ between episodes and clusters. It never ends early (the
    barely warmed-up tiny model would end an arithmetic episode at its first reply)."""

    def __init__(self) -> None:
        self.turn = 0

    def reset(self, task: Task, *, seed: int | None = None) -> tuple[list[Message], dict[str, Any]]:
        self.turn = 0
        return [{"role": "user", "content": task.prompt}], {"anchor": "room 0"}

    def step(self, action_text: str) -> StepResult:
        self.turn += 1
        obs: list[Message] = [{"role": "user", "content": f"You are in room {self.turn}."}]
        reward = float(len(action_text) % 2 == 0)
        return StepResult(obs, reward, terminated=False, info={"anchor": f"room {self.turn}"})

    def close(self) -> None:
        """Nothing to free."""


def _gigpo_step(
    cache_dir: Path, run_dir: Path, stats_over: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[Sample], dict[str, float], bool]:
    """One step of GiGPO (on the run config's spear preset) on the arithmetic task in the turn layout; every other
    episode (by id) is graded a success, so the groups have signal. Returns the step's samples
    (advantages filled), its metrics and whether the parameters moved."""
    real_rewards, real_adv = trainer_module.assign_rewards, trainer_module.compute_advantages
    seen: list[Sample] = []

    def assign(episodes: Any, step: int, *args: Any, **kwargs: Any) -> dict[str, float]:
        for e in episodes:
            e.outcome_reward = float(e.episode_id % 2)
        return real_rewards(episodes, step, *args, **kwargs)

    def advantages(samples: Any, cfg: Any) -> Any:
        seen.extend(samples)
        return real_adv(samples, cfg)

    monkeypatch.setattr(trainer_module, "assign_rewards", assign)
    monkeypatch.setattr(trainer_module, "compute_advantages", advantages)
    cfg = _cfg(
        cache_dir, run_dir, "advantage.estimator=gigpo", "rollout.layout=turn",
        "rollout.max_turns=3", "rollout.max_response_tokens=48", "filters.group_keep_ratio=1.0",
        f"advantage.stats_over={stats_over}", "advantage.gigpo_norm_by_std=false",
        "advantage.norm_by_std=false", "optim.lr=1e-2",
    )  # fmt: skip
    assert cfg.advantage.estimator == "gigpo" and cfg.rollout.layout == "turn"
    run_dir.mkdir(parents=True)
    t = Trainer(cfg, run_dir)
    t.c.source.make_env = WalkingEnv  # type: ignore[method-assign]
    before = [p.detach().clone() for p in t.c.policy.model.parameters()]
    m = t.train_step()
    moved = any(not torch.equal(a, b) for a, b in zip(before, t.c.policy.model.parameters()))
    t.close()
    return seen, m, moved


def test_gigpo_step_in_the_turn_layout(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples, m, moved = _gigpo_step(cache_dir, tmp_path / "sample", "sample", monkeypatch)
    assert moved and m["actor/optimizer_steps"] >= 1
    assert {s.turn_index for s in samples} == {0, 1, 2}  # 3 turns per episode: one sample each
    assert any(s.turn_reward > 0 for s in samples) and any(s.turn_reward == 0 for s in samples)
    # stats_over=sample without std (the reference's mean over all turns of a group): the
    # episode term sums to 0 over a group's turns and the step term over each anchor cluster
    for g in {s.group_id for s in samples}:
        total = sum(s.advantage for s in samples if s.group_id == g and not s.is_filtered)
        assert total == pytest.approx(0.0, abs=1e-9)
    assert any(abs(s.advantage) > 0 for s in samples)


def _turn(episode: int, turn: int, anchor: str, reward: float, penalty: float) -> Sample:
    ids = torch.arange(6)
    s = Sample(ids, ids >= 3, torch.zeros(6), group_id=0, episode_id=episode, turn_index=turn)
    s.anchor, s.turn_reward, s.turn_penalty = anchor, reward, penalty
    return s


def test_gigpo_charges_a_turn_penalty_to_its_own_step_return_only() -> None:
    """Episode 0 wins on its second turn, which was also penalised 0.1 (scores 1 and 0.9);
    episode 1 gets nothing. gamma 0.95, step weight 1, no std. Hand-derived:

    * episode term over the 4 turns: mean (1 + 0.9 + 0 + 0) / 4 = 0.475
      -> 0.525, 0.425, -0.475, -0.475
    * step returns: episode 0: G_1 = 1 - 0.1 = 0.9, G_0 = 0 + 0.95 * 1 = 0.95 (the penalty is
      not discounted back); episode 1: 0, 0. Anchor "start": {0.95, 0} -> +-0.475; anchor
      "room": {0.9, 0} -> +-0.45
    """
    samples = [
        _turn(0, 0, "start", 0.0, 0.0), _turn(0, 1, "room", 1.0, 0.1),
        _turn(1, 0, "start", 0.0, 0.0), _turn(1, 1, "room", 0.0, 0.0),
    ]  # fmt: skip
    for s, score in zip(samples, [1.0, 0.9, 0.0, 0.0]):
        s.score = score
    cfg = load_config(
        overrides=[
            "rollout.layout=turn", "advantage.estimator=gigpo", "advantage.norm_by_std=false",
            "advantage.gigpo_norm_by_std=false", "advantage.gigpo_gamma=0.95",
        ]
    )  # fmt: skip
    assert cfg.advantage.stats_over == "sample"  # the reference's default
    compute_advantages(samples, cfg)
    want = [0.525 + 0.475, 0.425 + 0.45, -0.475 - 0.475, -0.475 - 0.45]
    assert [s.advantage for s in samples] == pytest.approx(want, abs=1e-12)


def test_a_turn_layout_update_moves_each_turn_with_its_advantage(
    cache_dir: Path, tmp_path: Path
) -> None:
    """One GRPO update on a batch of turn samples raises the log-probs of the turns with a
    positive advantage and lowers those with a negative one (the replies the update trains on are
    the ones the loop sampled, in the prompts it sampled them from)."""
    cfg = _cfg(
        cache_dir, tmp_path / "run", "rollout.layout=turn", "rollout.max_turns=3",
        "rollout.max_response_tokens=48", "filters.group_keep_ratio=1.0", "optim.lr=1e-3",
    )  # fmt: skip
    (tmp_path / "run").mkdir()
    t = Trainer(cfg, tmp_path / "run")
    t.c.source.make_env = WalkingEnv  # type: ignore[method-assign]
    episodes = t._rollout(1)
    for e in episodes:  # every other episode wins: each group has signal
        e.outcome_reward = float(e.episode_id % 2)
    trainer_module.assign_rewards(episodes, 1, t.c.tool_bonus, invalid_penalty=0.0)
    samples = [s for e in episodes for s in e.samples]

    def logprobs() -> torch.Tensor:
        fill_old_logprobs(t.c.policy, samples, cfg)
        return torch.stack([s.behavior_logprobs[s.loss_mask].sum() for s in samples])

    before = logprobs()
    compute_advantages(samples, cfg)
    t._update(samples, t.c.update, 0, 1, scale=1.0, prefix="actor")
    moved = logprobs() - before
    t.close()
    adv = torch.tensor([s.advantage for s in samples])
    assert (adv > 0).any() and (adv < 0).any()
    assert moved[adv > 0].mean() > 0 > moved[adv < 0].mean()
