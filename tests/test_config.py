"""Config tree: defaults, presets, files, overrides, and clear errors."""

import dataclasses

import pytest
from pydantic import BaseModel

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
from spear.config_names import REGISTRY_FIELDS, registry_of


def test_presets_are_the_six_reference_recipes():
    assert preset_names() == ["drbot", "drbot-gigpo", "gigpo", "grpo", "spear", "spear-gigpo"]


@pytest.mark.parametrize("name", ["drbot", "drbot-gigpo", "gigpo", "grpo", "spear", "spear-gigpo"])
def test_every_preset_validates(name):
    cfg = load_config(preset=name)
    assert cfg.preset == name


def test_a_preset_override_wins_over_the_files_preset(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: spear\noptim: {lr: 3.0e-4}\n")
    cfg = load_config(file=f, overrides=["preset=grpo"])
    assert cfg.preset == "grpo" and cfg.replay.enabled is False  # grpo's layer, not spear's
    assert cfg.optim.lr == 3.0e-4  # the file still applies on top of the preset
    assert load_config(file=f).preset == "spear"
    # the explicit argument (`spear train --preset`) wins over both
    assert load_config(preset="drbot", file=f, overrides=["preset=grpo"]).preset == "drbot"


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


def test_kl_type_is_checked_at_load():
    with pytest.raises(
        ConfigError, match=r"loss.kl_type: unknown KL estimator 'bogus'; known:.*k3"
    ):
        load_config(overrides=["loss.kl_type=bogus"])
    for name in ("k1", "k2", "k3", "low_var_kl", "k3+"):
        assert load_config(overrides=[f"loss.kl_type={name}"]).loss.kl_type == name


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


def _required_fields(model: type[BaseModel], where: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        if f.is_required():
            out.append(f"{where}{name}")
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            out += _required_fields(f.annotation, f"{where}{name}.")
    return out


def test_defaults_have_one_home():
    """B16: every config field, at every depth, has its default in spear/config_sections.py, and none of
    the records that spear/build.py (and the tasks) map the config onto declares a default of
    its own, so a setting can only come from the config."""
    assert _required_fields(Config) == []
    assert Config() == validate_config({})  # the defaults alone make a valid config
    from spear.algo.advantages import AdvantageParams
    from spear.algo.losses import PolicyLossParams
    from spear.envs.arithmetic import ArithmeticParams
    from spear.envs.math_task import MathParams
    from spear.envs.textworld_env import TextWorldParams
    from spear.filters import ResponseFilterParams
    from spear.models.warmstart import WarmStartParams
    from spear.replay import ReplayParams
    from spear.rewards import ToolBonus
    from spear.rollout.engine import SamplingParams
    from spear.rollout.loop import LoopParams
    from spear.update import UpdateSettings

    records = [
        AdvantageParams, ArithmeticParams, LoopParams, MathParams, PolicyLossParams,
        ReplayParams, ResponseFilterParams, SamplingParams, TextWorldParams, ToolBonus,
        UpdateSettings, WarmStartParams,
    ]  # fmt: skip
    defaulted = [
        f"{r.__name__}.{f.name}"
        for r in records
        for f in dataclasses.fields(r)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert defaulted == []


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


@pytest.mark.parametrize("field", sorted(REGISTRY_FIELDS))
def test_every_registry_name_is_checked_when_the_config_loads(field: str) -> None:
    section, key = field.split(".")
    assert key in Config.model_fields[section].annotation.model_fields  # a real config field
    known = registry_of(field).names()
    assert getattr(getattr(Config(), section), key) in [*known, None]  # the default is known
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=[f"{field}=bogus"])
    line = str(exc.value)
    assert "\n" not in line and f"{field}: unknown" in line and "'bogus'" in line
    assert f"known: {', '.join(known)}" in line


def test_a_name_registered_by_user_code_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    from spear.algo.losses import POLICY_LOSSES

    with pytest.raises(ConfigError, match="unknown policy loss 'mine'"):
        load_config(overrides=["loss.policy_loss=mine"])
    entries = {**POLICY_LOSSES._entries, "mine": POLICY_LOSSES.get("vanilla")}
    monkeypatch.setattr(POLICY_LOSSES, "_entries", entries)
    assert load_config(overrides=["loss.policy_loss=mine"]).loss.policy_loss == "mine"


def test_a_close_name_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'gigpo'"):
        load_config(overrides=["advantage.estimator=gigp", "rollout.layout=turn"])


@pytest.mark.parametrize("section", ["loss", "replay"])
@pytest.mark.parametrize(("lb", "ub"), [(6.0, 5.0), (5.0, 5.0)])
def test_clip_cov_bounds_must_be_ordered(section: str, lb: float, ub: float) -> None:
    over = [f"{section}.clip_cov_lb={lb}", f"{section}.clip_cov_ub={ub}"]
    with pytest.raises(ConfigError, match=rf"{section}\.clip_cov_lb={lb:g} must be < {section}"):
        load_config(overrides=over)
    assert load_config(overrides=[f"{section}.clip_cov_lb={ub - 1}", over[1]])


def test_gigpo_needs_the_turn_layout() -> None:
    with pytest.raises(ConfigError, match=r"set rollout\.layout=turn"):
        load_config(overrides=["advantage.estimator=gigpo", "rollout.layout=episode"])
    assert load_config(preset="gigpo").rollout.layout == "turn"


def test_rollout_parser_is_for_tool_tasks_only() -> None:
    assert load_config().rollout.parser is None  # the task's own format
    assert load_config(overrides=["rollout.parser=python"]).rollout.parser == "python"
    with pytest.raises(ConfigError, match=r"textworld .* remove rollout\.parser=action"):
        load_config(overrides=["task.name=textworld", "rollout.parser=action"])
