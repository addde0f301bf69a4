"""spear/build.py: every config field lands in the parameter record it configures.

Each field below is set to a value different from its default and from every other field's
value, so a field read from the wrong place (on-policy vs replay, train vs eval) shows up.
"""

from __future__ import annotations

import pytest

from spear.algo.losses import PolicyLossParams
from spear.build import (
    loop_params,
    replay_params,
    response_filter_params,
    tool_bonus,
    update_settings,
)
from spear.config import Config, load_config
from spear.replay import ReplayParams
from spear.rollout.engine import SamplingParams
from spear.rollout.loop import LoopParams
from spear.update import UpdateSettings

OVERRIDES = [
    "rollout.tasks_per_step=4", "rollout.group_size=4", "rollout.temperature=0.9",
    "rollout.top_p=0.8", "rollout.top_k=5", "rollout.max_turns=3", "rollout.max_new_tokens=20",
    "rollout.max_response_tokens=100", "rollout.max_context_tokens=400", "rollout.layout=turn",
    "rollout.history_length=1", "rollout.env_step_timeout_s=7.0", "eval.temperature=0.3",
    "loss.policy_loss=kl_cov", "loss.clip_low=0.11", "loss.clip_high=0.27", "loss.clip_c=4.5",
    "loss.aggregation=seq-mean-token-sum", "loss.entropy_coef=0.02", "loss.kl_coef=0.05",
    "loss.kl_type=k2", "loss.clip_cov_ratio=0.003", "loss.clip_cov_lb=0.7",
    "loss.clip_cov_ub=7.0", "loss.kl_cov_ratio=0.004", "loss.kl_cov_coef=0.6",
    "replay.enabled=true", "replay.policy_loss=clip_cov", "replay.clip_cov_ratio=0.03",
    "replay.clip_cov_lb=2.5", "replay.clip_cov_ub=50.0", "replay.kl_cov_ratio=0.05",
    "replay.capacity=10", "replay.history_size=90", "replay.tolerate_steps=3",
    "replay.trigger_ratio=1.2", "replay.sample_size=6", "replay.sampling=prioritized",
    "replay.recalibration=median", "replay.normalize_by_std=true", "replay.std_eps=0.001",
    "replay.keep=non_negative", "replay.decay_weight=0.4", "replay.consume=sliding",
    "replay.staleness=newest_entry",
    "optim.ppo_epochs=2", "optim.micro_batch_size=3", "optim.grad_clip=0.7",
    "reward.tool_bonus.mode=cosine", "reward.tool_bonus.alpha=0.2", "reward.tool_bonus.cap=0.5",
    "reward.tool_bonus.horizon=40", "reward.tool_bonus.count=turns",
    "filters.overlong=true", "filters.repetitive=true", "filters.ngram=7",
    "filters.ngram_repeats=3",
]  # fmt: skip


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(overrides=OVERRIDES)


def test_on_policy_update_settings(cfg: Config) -> None:
    assert update_settings(cfg, replay=False) == UpdateSettings(
        policy_loss="kl_cov",
        loss_params=PolicyLossParams(
            clip_low=0.11, clip_high=0.27, clip_c=4.5, cov_ratio=0.003, cov_lb=0.7, cov_ub=7.0,
            kl_cov_ratio=0.004, kl_cov_coef=0.6,
        ),
        aggregation="seq-mean-token-sum",
        max_response_len=20,  # turn layout: a sample's budget is one turn (max_new_tokens)
        entropy_coef=0.02, kl_coef=0.05, kl_type="k2", epochs=2,
        mini_batch_size=16,  # mini_batch_size unset: the whole batch, 4 tasks x 4
        micro_batch_size=3, grad_clip=0.7, temperature=0.9,
    )  # fmt: skip


def test_replay_update_uses_the_replay_settings_B3(cfg: Config) -> None:
    # reference defect B3: the replay Clip-Cov / KL-Cov settings were ignored (the on-policy
    # ones were used); here every replay-specific field reaches the replay update
    got = update_settings(cfg, replay=True)
    assert got.policy_loss == "clip_cov"  # replay.policy_loss
    assert got.loss_params == PolicyLossParams(
        clip_low=0.11, clip_high=0.27, clip_c=4.5, cov_ratio=0.03, cov_lb=2.5, cov_ub=50.0,
        kl_cov_ratio=0.05, kl_cov_coef=0.6,
    )  # fmt: skip
    assert got.mini_batch_size == 6  # the replay sample size
    assert got.kl_coef == 0.0  # the reference applies no KL term to replayed data
    same = ("aggregation", "max_response_len", "entropy_coef", "epochs", "micro_batch_size")
    on = update_settings(cfg, replay=False)
    assert all(getattr(got, k) == getattr(on, k) for k in same)
    # without replay.policy_loss the replay pass uses loss.policy_loss
    unset = load_config(overrides=[o for o in OVERRIDES if not o.startswith("replay.policy")])
    assert update_settings(unset, replay=True).policy_loss == "kl_cov"


def test_an_explicit_mini_batch_size_is_used_by_both_updates() -> None:
    cfg = load_config(overrides=[*OVERRIDES, "optim.mini_batch_size=8"])
    assert update_settings(cfg, replay=False).mini_batch_size == 8
    assert update_settings(cfg, replay=True).mini_batch_size == 8


def test_loop_params_train_and_eval(cfg: Config) -> None:
    def want(sampling: SamplingParams) -> LoopParams:
        return LoopParams(
            max_turns=3, max_response_tokens=100, max_context_tokens=400, layout="turn",
            history_length=1, sampling=sampling, env_step_timeout_s=7.0,
        )  # fmt: skip

    assert loop_params(cfg, evaluation=False) == want(
        SamplingParams(0.9, 0.8, 5, 20, stop_token_ids=None, stop_strings=None)
    )
    # evaluation: eval.temperature, and no top-p / top-k truncation
    assert loop_params(cfg, evaluation=True) == want(
        SamplingParams(0.3, 1.0, None, 20, stop_token_ids=None, stop_strings=None)
    )
    off = load_config(overrides=[*OVERRIDES, "rollout.top_k=0"])
    assert loop_params(off, evaluation=False).sampling.top_k is None  # 0 = off


def test_replay_params(cfg: Config) -> None:
    assert replay_params(cfg) == ReplayParams(
        capacity=10, history_size=90, tolerate_steps=3, trigger_ratio=1.2, sample_size=6,
        sampling="prioritized", recalibration="median", normalize_by_std=True, std_eps=0.001,
        keep="non_negative", decay_weight=0.4, consume="sliding", staleness="newest_entry",
    )  # fmt: skip
    unset = load_config(overrides=[o for o in OVERRIDES if not o.startswith("replay.sample")])
    assert replay_params(unset).sample_size == 10  # None = the capacity


@pytest.mark.parametrize(
    ("mode", "phi"),
    [
        ("none", [0.0, 0.0, 0.0]),
        ("constant", [1.0, 1.0, 1.0]),
        ("cosine", [1.0, 0.5, 0.0]),  # cos fade-out over horizon 40: steps 0, 20, 40
    ],
)
def test_tool_bonus(mode: str, phi: list[float]) -> None:
    cfg = load_config(overrides=[*OVERRIDES, f"reward.tool_bonus.mode={mode}"])
    tb = tool_bonus(cfg)
    assert (tb.alpha, tb.cap, tb.count) == (0.2, 0.5, "turns")
    assert [tb.schedule(t) for t in (0, 20, 40)] == pytest.approx(phi, abs=1e-12)


def test_response_filter_params(cfg: Config) -> None:
    got = response_filter_params(cfg)
    assert (set(got.enabled), got.ngram, got.ngram_repeats) == ({"overlong", "repetitive"}, 7, 3)
    drbot = response_filter_params(load_config(preset="drbot"))
    assert set(drbot.enabled) == {"overlong", "incomplete", "repetitive", "unreadable"}
