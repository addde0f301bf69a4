"""The one typed config tree of spear (its sections, the only home of defaults, are in
:mod:`spear.config_sections`), its cross-section checks, and loading.

A run is configured by: the defaults (sized for the built-in CPU task), then an optional preset
(`spear/presets/<name>.yaml`, algorithm settings of the reference recipes), then an optional YAML
file, then ``section.key=value`` overrides from the command line. Every section rejects unknown
keys with a suggestion. Cross-field checks (batch sizes, lengths) say what to change.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from spear.config_sections import (  # noqa: F401 (re-exported: spear.config.<Section>)
    AdvantageConfig,
    DistributedConfig,
    EvalConfig,
    FilterConfig,
    LoggingConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ReplayConfig,
    RewardConfig,
    RolloutConfig,
    ScheduleSpec,
    TaskConfig,
    TinyModelConfig,
    ToolBonusConfig,
    TrainerConfig,
    WarmStartConfig,
    _Section,
)
from spear.errors import ConfigError as ConfigError  # re-exported: spear.config.ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


class Config(_Section):
    preset: str | None = None
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    filters: FilterConfig = FilterConfig()
    advantage: AdvantageConfig = AdvantageConfig()
    loss: LossConfig = LossConfig()
    replay: ReplayConfig = ReplayConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    trainer: TrainerConfig = TrainerConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        from spear.config_names import unknown_name

        unknown = unknown_name(self)
        if unknown is not None:
            raise ValueError(unknown)
        self._check_algorithm()
        ro, opt = self.rollout, self.optim
        n = ro.tasks_per_step * ro.group_size
        if ro.layout == "episode" and opt.mini_batch_size is not None and n % opt.mini_batch_size:
            raise ValueError(
                f"optim.mini_batch_size={opt.mini_batch_size} must divide rollout.tasks_per_step x "
                f"rollout.group_size = {n}; change one of them"
            )
        if ro.max_new_tokens > ro.max_response_tokens:
            raise ValueError(
                f"rollout.max_new_tokens={ro.max_new_tokens} exceeds rollout.max_response_tokens="
                f"{ro.max_response_tokens}; lower the first or raise the second"
            )
        if ro.max_new_tokens >= ro.max_context_tokens:
            raise ValueError(
                "rollout.max_new_tokens must be smaller than rollout.max_context_tokens"
            )
        if (
            self.model.path is None
            and ro.max_context_tokens > self.model.tiny.max_position_embeddings
        ):
            raise ValueError(
                f"rollout.max_context_tokens={ro.max_context_tokens} exceeds the built-in model's "
                f"model.tiny.max_position_embeddings={self.model.tiny.max_position_embeddings}"
            )
        if self.task.name == "math" and not self.task.train_files:
            raise ValueError("task.name=math needs task.train_files (JSONL or Parquet paths)")
        if self.task.sandbox == "fusion" and not self.task.sandbox_url:
            raise ValueError(
                "task.sandbox=fusion needs task.sandbox_url (the SandboxFusion server)"
            )
        if (
            self.replay.enabled
            and self.replay.recalibration == "decay"
            and self.advantage.estimator == "gigpo"
        ):
            raise ValueError(
                "replay.recalibration=decay would replay GiGPO's step-level advantage term; with "
                "advantage.estimator=gigpo use replay.recalibration=median (episode-level only)"
            )
        return self

    def _check_algorithm(self) -> None:
        """Cross-field checks of the loss, advantage and rollout settings."""
        for where, lb, ub in (
            ("loss", self.loss.clip_cov_lb, self.loss.clip_cov_ub),
            ("replay", self.replay.clip_cov_lb, self.replay.clip_cov_ub),
        ):
            if not lb < ub:
                raise ValueError(
                    f"{where}.clip_cov_lb={lb:g} must be < {where}.clip_cov_ub={ub:g} (Clip-Cov "
                    "detaches tokens with lb < covariance < ub); lower the first or raise the second"
                )
        if self.advantage.estimator == "gigpo" and self.rollout.layout != "turn":
            raise ValueError(
                "advantage.estimator=gigpo needs per-turn samples for its step-level (anchor "
                f"state) term: set rollout.layout=turn (got {self.rollout.layout})"
            )
        if self.task.name == "textworld" and self.rollout.parser is not None:
            raise ValueError(
                "task.name=textworld reads its actions from <action>...</action> and takes no "
                f"tool-call parser: remove rollout.parser={self.rollout.parser}"
            )

    @property
    def replay_sample_size(self) -> int:
        return self.replay.sample_size or self.replay.capacity

    @property
    def dr_grpo_len(self) -> int:
        """The Dr.GRPO constant: a sample's response budget. In the turn layout a sample is one
        turn (at most ``max_new_tokens``), as the reference's per-turn ``max_response_length``."""
        per_sample = (
            self.rollout.max_new_tokens
            if self.rollout.layout == "turn"
            else self.rollout.max_response_tokens
        )
        return self.loss.max_response_len or per_sample


# ----------------------------------------------------------------------------------------------
# Loading: defaults <- preset <- file <- overrides


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(data: Mapping[str, Any], model: type[BaseModel], where: str) -> None:
    """Reject unknown keys anywhere in ``data`` with a suggestion, before pydantic sees them."""
    for key, value in data.items():
        fields = model.model_fields
        if key not in fields:
            known = sorted(fields)
            raise ConfigError(
                f"unknown config key '{where}{key}'{_suggest(key, known)}; known here: {', '.join(known)}"
            )
        ann = fields[key].annotation
        if isinstance(value, Mapping) and isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_keys(value, ann, f"{where}{key}.")


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"a.b.c=value"`` -> ``{"a": {"b": {"c": value}}}`` with ``value`` parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    path, raw = text.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value: Any = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse the value: {e}") from None
    for k in reversed(keys):
        value = {k: value}
    return value


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def run_config_names() -> list[str]:
    """The run configs shipped with spear (``spear/configs/<name>.yaml``), ``default`` first."""
    names = sorted(p.stem for p in DEFAULT_RUN_CONFIG.parent.glob("*.yaml"))
    return sorted(names, key=lambda n: n != "default")


def run_config_path(name_or_path: str) -> Path:
    """A YAML path as given, or a shipped run config's path when given its name (``textworld``).

    An existing file wins over a shipped name; anything else is returned unchanged, so loading it
    reports the missing file.
    """
    path = Path(name_or_path)
    if not path.exists() and name_or_path in run_config_names():
        return DEFAULT_RUN_CONFIG.parent / f"{name_or_path}.yaml"
    return path


def unknown_config_error(name: str, *, shows: bool) -> ConfigError:
    """The error for a config ``name`` that is no file, no shipped run config and no preset: the
    closest valid name and every valid one. ``shows``: for ``spear config show`` (where a
    preset and ``list`` are valid names), else for ``spear train`` (a file or a run config)."""
    runs, presets = run_config_names(), preset_names()
    close = difflib.get_close_matches(name, [*runs, *presets], n=1)
    if shows:
        return ConfigError(
            f"unknown config {name!r}{_suggest(name, [*runs, *presets])}; known: "
            f"{', '.join(runs)} (run configs), {', '.join(presets)} (presets), list"
        )
    hint = ""
    if close:
        hint = (
            f" (did you mean {close[0]!r}?)"
            if close[0] in runs
            else f" (did you mean `--preset {close[0]}`?)"
        )
    return ConfigError(
        f"config file {name!r} does not exist{hint}; shipped run configs: {', '.join(runs)}; "
        f"presets (with --preset): {', '.join(presets)}"
    )


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping of sections")
    return data


def load_config(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Build a validated :class:`Config`; raises :class:`ConfigError` with one clear line."""
    data: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    if file is not None:
        layers.append((f"config file {file}", _read_yaml(Path(file), "config file")))
    for o in overrides:
        layers.append((f"override {o!r}", parse_override(o)))
    # the last layer naming a preset wins, as for any key: `preset=grpo` on a file that says
    # `preset: spear` trains grpo (an explicit ``preset`` argument, `--preset`, wins over both)
    preset = preset or next(
        (d["preset"] for _, d in reversed(layers) if isinstance(d.get("preset"), str)), None
    )
    if preset is not None:
        if preset not in preset_names():
            raise ConfigError(
                f"unknown preset {preset!r}{_suggest(preset, preset_names())}; known: {', '.join(preset_names())}"
            )
        layers.insert(0, (f"preset {preset}", _read_yaml(PRESET_DIR / f"{preset}.yaml", "preset")))
    for where, layer in layers:
        try:
            _check_keys(layer, Config, "")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        data = _deep_merge(data, layer)
    if preset is not None:
        data["preset"] = preset
    return validate_config(data)


def validate_config(data: Mapping[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = err["msg"].removeprefix("Value error, ")
        where = f"{loc}: " if loc else ""
        raise ConfigError(f"invalid config: {where}{msg}") from None


def config_differences(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    """``(dotted field, value in a, value in b)`` for every field where two configs differ, in
    field order (a schedule counts as one field)."""

    def flat(d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            nested = isinstance(v, Mapping) and "kind" not in v  # a schedule spec is one value
            out.update(flat(v, f"{prefix}{k}.") if nested else {f"{prefix}{k}": v})
        return out

    fa, fb = flat(a.model_dump(mode="json"), ""), flat(b.model_dump(mode="json"), "")
    return [(k, fa[k], fb.get(k)) for k in fa if fa[k] != fb.get(k)]


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


DEFAULT_RUN_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
