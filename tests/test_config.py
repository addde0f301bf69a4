"""Config tree: defaults, presets, files, overrides, and clear errors."""

import pytest

from spear.config import (
    DEFAULT_RUN_CONFIG,
    Config,
    ConfigError,
    config_to_yaml,
    load_config,
    parse_override,
    preset_names,
    validate_config,
)


def test_presets_are_the_six_reference_recipes():
    assert preset_names() == ["drbot", "drbot-gigpo", "gigpo", "grpo", "spear", "spear-gigpo"]


@pytest.mark.parametrize("name", ["drbot", "drbot-gigpo", "gigpo", "grpo", "spear", "spear-gigpo"])
def test_every_preset_validates(name):
    cfg = load_config(preset=name)
    assert cfg.preset == name


def test_spear_preset_matches_reference_agent_scripts():
    # spec §7.3 / §8.5: Dr.BoT tricks + Clip-Cov + SIL + cosine tool bonus.
    cfg = load_config(preset="spear")
    assert (cfg.loss.clip_low, cfg.loss.clip_high, cfg.loss.clip_c) == (0.2, 0.28, 10.0)
    assert cfg.loss.aggregation == "seq-mean-token-sum-norm" and cfg.loss.policy_loss == "clip_cov"
    assert (cfg.loss.clip_cov_ratio, cfg.loss.clip_cov_lb, cfg.loss.clip_cov_ub) == (
        0.0002,
        1.0,
        5.0,
    )
    assert (cfg.replay.clip_cov_ratio, cfg.replay.clip_cov_lb, cfg.replay.clip_cov_ub) == (
        0.02,
        2.0,
        60.0,
    )
    assert (cfg.replay.capacity, cfg.replay.history_size, cfg.replay.tolerate_steps) == (
        2048,
        10240,
        5,
    )
    assert cfg.replay.enabled and not cfg.advantage.norm_by_std
    assert cfg.filters.group_keep_ratio == 0.75 and cfg.reward.tool_bonus.mode == "cosine"


def test_layers_apply_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: grpo\noptim: {lr: 0.5}\ntrainer: {steps: 3}\n")
    cfg = load_config(file=f, overrides=["trainer.steps=7", "loss.clip_high=0.3"])
    assert (
        cfg.preset == "grpo"
        and cfg.optim.lr == 0.5
        and cfg.trainer.steps == 7
        and cfg.loss.clip_high == 0.3
    )


def test_unknown_key_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean 'lr'"):
        load_config(overrides=["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'rollot'.*did you mean 'rollout'"):
        load_config(overrides=["rollot.group_size=2"])


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match=r"unknown preset 'spaer'.*did you mean 'spear'"):
        load_config(preset="spaer")


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"rollout.group_size"):
        load_config(overrides=["rollout.group_size=many"])


def test_mini_batch_must_divide_batch():
    with pytest.raises(ConfigError, match=r"optim.mini_batch_size=7 must divide"):
        load_config(
            overrides=[
                "rollout.tasks_per_step=4",
                "rollout.group_size=4",
                "optim.mini_batch_size=7",
            ]
        )


def test_bad_schedule_names_the_field():
    with pytest.raises(ConfigError, match=r"replay.loss_coef"):
        load_config(overrides=["replay.loss_coef={kind: cosine_sideways, value: 1}"])


def test_override_parsing():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=[1, 2]") == {"a": [1, 2]}
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("nonsense")


def test_missing_file_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(file=tmp_path / "nope.yaml")


def test_default_run_config_and_yaml_round_trip():
    cfg = load_config(file=DEFAULT_RUN_CONFIG)
    assert cfg.preset == "spear" and cfg.task.name == "arithmetic" and cfg.replay.enabled
    import yaml

    again = validate_config(yaml.safe_load(config_to_yaml(cfg)))
    assert again == cfg


def test_defaults_have_one_home():
    # Config() with no input is valid: every field has exactly one default, here.
    assert Config().rollout.group_size == 8


def test_dr_grpo_constant_is_a_samples_response_budget() -> None:
    """Episode layout: a sample is the whole episode (max_response_tokens); turn layout: one turn
    (max_new_tokens), as the reference's per-turn max_response_length; an explicit value wins."""
    base = ["rollout.max_new_tokens=20", "rollout.max_response_tokens=160"]
    assert load_config(overrides=[*base, "rollout.layout=episode"]).dr_grpo_len == 160
    assert load_config(overrides=[*base, "rollout.layout=turn"]).dr_grpo_len == 20
    assert (
        load_config(
            overrides=[*base, "rollout.layout=turn", "loss.max_response_len=64"]
        ).dr_grpo_len
        == 64
    )
