"""The command line, called in-process: help texts, `config show`, and one-line errors (exit 2).

None of these tests trains or builds a model: the cases that get as far as the trainer have
``Trainer`` (or its ``fit``) and the warm-model builder replaced by functions that fail the test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import spear.models.warmstart as ws
import spear.trainer
from spear import cli
from spear.config import (
    DEFAULT_RUN_CONFIG,
    config_to_yaml,
    load_config,
    preset_names,
    run_config_path,
)
from spear.envs.textworld_games import game_spec

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.fixture(autouse=True)
def narrow_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fixed, narrow width: a long message must still come out as one line (no wrapping).
    monkeypatch.setattr(cli.console, "width", 60)
    monkeypatch.setattr(cli.err_console, "width", 60)


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model would be built or training would start."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("a model build or training started")

    monkeypatch.setattr(spear.trainer.Trainer, "fit", refuse)
    monkeypatch.setattr(ws, "ensure_warm_model", refuse)
    monkeypatch.setattr(ws, "build_warm_model", refuse)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))  # an exception here (a traceback for the user) fails the test
    out, err = capsys.readouterr()
    return rc, _ANSI.sub("", out + err)


def yaml_body(text: str) -> str:
    """``config show`` output without its leading comment lines."""
    lines = text.splitlines(keepends=True)
    return "".join(lines[next(i for i, line in enumerate(lines) if not line.startswith("#")) :])


def error_line(text: str) -> str:
    """The output is exactly one non-empty line, an error; return it."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {lines}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in text
    return lines[0]


# ----------------------------------------------------------------------------------------------
# help


def test_top_level_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "eval", "plot", "config", "--verbose"):
        assert word in out


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("train", ["config", "overrides", "--preset", "--resume", "RUN_DIR", "spear"]),
        ("eval", ["checkpoint", "overrides", "step_XXXXXX"]),
        ("plot", ["run_dir"]),
        ("config", ["show", "name", "list", "overrides"]),
    ],
)
def test_subcommand_help(
    capsys: pytest.CaptureFixture[str], command: str, words: list[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: spear {command}")
    for word in words:
        assert word in out, word


def test_train_help_lists_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in preset_names())


# ----------------------------------------------------------------------------------------------
# config show


def test_config_show_list(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "config", "show", "list")
    assert rc == 0
    assert out.splitlines() == [
        "default",
        "lookup",
        "lookup-sparse",
        "textworld",
        "textworld-coin",
        *preset_names(),
    ]
    assert {"spear", "grpo", "gigpo", "drbot"} <= set(out.splitlines())


def test_config_show_spear_is_yaml_with_replay(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "config", "show", "spear")
    assert rc == 0
    data = yaml.safe_load(out)
    assert data["preset"] == "spear"
    assert data["replay"]["enabled"] is True
    assert yaml_body(out) == config_to_yaml(load_config(preset="spear"))


def test_config_show_grpo_has_no_replay(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "config", "show", "grpo")
    assert rc == 0 and yaml.safe_load(out)["replay"]["enabled"] is False


def test_config_show_applies_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "config", "show", "spear", "optim.lr=0.5", "trainer.steps=7")
    assert rc == 0
    data = yaml.safe_load(out)
    assert data["optim"]["lr"] == 0.5 and data["trainer"]["steps"] == 7


def test_config_show_default_is_the_embedded_run(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "config", "show", "default")
    assert rc == 0
    assert yaml_body(out) == config_to_yaml(load_config(file=DEFAULT_RUN_CONFIG))
    assert yaml.safe_load(out)["trainer"]["steps"] == 30  # configs/default.yaml, not the 40 default


def test_config_show_spear_says_how_the_default_run_differs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `spear train` (no arguments) runs `default`, not the bare preset: the header says so and
    # names every field that differs, with both values
    rc, out = run(capsys, "config", "show", "spear")
    header = [line for line in out.splitlines() if line.startswith("#")]
    assert rc == 0 and "`spear train` with no arguments runs `default`" in header[1]
    assert "#   trainer.steps: 40 -> 30" in header
    assert "#   reward.tool_bonus.horizon: 200 -> 30" in header
    assert any(line.startswith("#   replay.loss_coef:") for line in header)
    rc, out = run(capsys, "config", "show", "grpo")  # not the default's preset: no such note
    assert rc == 0 and "differs" not in out


def test_config_differences_lists_changed_fields_in_order() -> None:
    from spear.config import config_differences

    a = load_config(preset="spear")
    b = load_config(preset="spear", overrides=["trainer.steps=3", "optim.lr=0.5"])
    assert config_differences(a, b) == [("optim.lr", a.optim.lr, 0.5), ("trainer.steps", 40, 3)]
    assert config_differences(a, a) == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from spear import __version__

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"spear {__version__}"


def test_config_show_default_applies_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "config", "show", "default", "optim.lr=0.5")
    assert rc == 0
    assert yaml.safe_load(out)["optim"]["lr"] == 0.5


# ----------------------------------------------------------------------------------------------
# bad input: exit 2 and one line naming the problem


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        # unknown key, with the suggestion
        (["train", "optim.lrr=1"], ["optim.lrr", "did you mean 'lr'"]),
        (["config", "show", "spear", "optim.lrr=1"], ["optim.lrr", "'lr'"]),
        (["train", "replay.enabeld=true"], ["replay.enabeld", "'enabled'"]),
        (["train", "optimm.lr=1"], ["optimm", "'optim'"]),
        # 16 tasks x 8 per group = 128, and 7 does not divide it
        (["train", "optim.mini_batch_size=7"], ["optim.mini_batch_size=7", "128"]),
        (["train", "optim.lr=-1"], ["optim.lr"]),
        (["train", "nosuch-config.yaml"], ["nosuch-config.yaml", "does not exist"]),
        (["train", "optim.lr"], []),  # no "=": taken as a config file name, which does not exist
        # every valid name, run configs and `list` included
        (
            ["config", "show", "nosuch"],
            ["unknown config 'nosuch'", "default", "textworld", "spear", "grpo", "list"],
        ),
        (["config", "show", "textwrld"], ["did you mean 'textworld'?"]),
        # a near miss of a shipped run config, or of a preset (which goes with --preset)
        (["train", "textworldd"], ["'textworldd' does not exist", "did you mean 'textworld'?"]),
        (["train", "grpoo"], ["did you mean `--preset grpo`?"]),
    ],
)
def test_config_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], no_training: None, argv: list[str], needles: list[str]
) -> None:
    rc, out = run(capsys, *argv)
    assert rc == 2
    line = error_line(out)
    for needle in needles:
        assert needle in line


@pytest.mark.parametrize(
    ("override", "known"),
    [
        ("loss.policy_loss=bogus", "clip_cov, gpg, kl_cov, vanilla"),
        ("replay.policy_loss=bogus", "clip_cov, gpg, kl_cov, vanilla"),
        ("advantage.estimator=bogus", "drgrpo, gigpo, grpo, rloo"),
        ("loss.aggregation=bogus", "seq-mean-token-mean"),
        ("loss.kl_type=bogus", "low_var_kl"),
        ("rollout.parser=bogus", "action, hermes, python"),
    ],
)
def test_a_bad_name_fails_before_anything_is_made(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_training: None,
    tmp_path: Path,
    override: str,
    known: str,
) -> None:
    # before names were checked at load, loss.policy_loss=bogus ran the step-0 eval and a rollout
    # and replay.policy_loss=bogus trained until the first replay, each leaving a run directory
    monkeypatch.chdir(tmp_path)  # runs/<preset>-<time> would appear here
    rc, out = run(capsys, "train", override, f"model.cache_dir={tmp_path / 'cache'}")
    assert rc == 2
    line = error_line(out)
    assert override.split("=")[0] in line and "'bogus'" in line and known in line
    assert list(tmp_path.iterdir()) == []  # no run directory, no model cache


def test_a_shipped_run_config_is_found_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "config", "show", "textworld")
    assert rc == 0 and yaml.safe_load(out)["task"]["name"] == "textworld"
    assert run_config_path("textworld").name == "textworld.yaml"
    assert run_config_path("no/such.yaml") == Path("no/such.yaml")


@pytest.mark.parametrize(
    "name", ["default", "lookup", "lookup-sparse", "textworld", "textworld-coin"]
)
def test_every_shipped_run_config_loads_with_curricula_over_its_whole_run(name: str) -> None:
    cfg = load_config(file=run_config_path(name))
    steps = cfg.trainer.steps
    if cfg.reward.tool_bonus.mode != "none":
        assert cfg.reward.tool_bonus.horizon == steps, name
    if cfg.replay.enabled:
        assert cfg.replay.loss_coef.get("horizon", steps) == steps, name
    if cfg.task.name == "textworld":  # the challenge and level name real TextWorld settings
        assert game_spec(cfg.task.challenge, cfg.task.textworld_level).settings


def test_train_accepts_a_shipped_run_config_name(
    capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    # textworld's settings are loaded (and validated) before anything is built; a bad override
    # then fails naming the field, which shows the name resolved to the shipped file
    rc, out = run(capsys, "train", "textworld", "rollout.layout=nosuch")
    assert rc == 2 and "rollout.layout" in out and "does not exist" not in out


def test_errors_go_to_stderr_not_stdout(
    capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    rc = cli.main(["train", "optim.lrr=1"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "optim.lrr" in _ANSI.sub("", err)
    assert "error" not in out


def test_bad_preset_choice_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--preset", "nosuch"])
    assert exc.value.code == 2
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err


def test_config_file_that_is_a_directory(
    capsys: pytest.CaptureFixture[str], no_training: None, tmp_path: Path
) -> None:
    rc, out = run(capsys, "train", str(tmp_path))
    assert rc == 2
    assert str(tmp_path) in error_line(out)


def test_existing_run_directory(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("the trainer was built for an existing run directory")

    monkeypatch.setattr(spear.trainer, "Trainer", refuse)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rc, out = run(capsys, "train", f"trainer.run_dir={run_dir}")
    assert rc == 2
    line = error_line(out)
    assert f"run directory {run_dir} exists" in line and "--resume" in line
    assert list(run_dir.iterdir()) == []  # untouched: no config.yaml written


def test_model_path_that_does_not_exist(
    capsys: pytest.CaptureFixture[str], no_training: None, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    rc, out = run(
        capsys,
        "train",
        "model.path=/nonexistent",
        f"trainer.run_dir={tmp_path / 'run'}",
        f"model.cache_dir={cache}",
    )
    assert rc == 2
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert lines[0].startswith("spear training")  # before it only the (wrapped) header line
    assert "model.path" in errors[0] and "'/nonexistent'" in errors[0]
    assert "does not exist" in errors[0]
    assert not cache.exists()  # no built-in model was built


def test_resume_without_config(
    capsys: pytest.CaptureFixture[str], no_training: None, tmp_path: Path
) -> None:
    rc, out = run(capsys, "train", "--resume", str(tmp_path))
    assert rc == 2
    line = error_line(out)
    assert f"--resume {tmp_path}" in line and "config.yaml" in line


def test_eval_of_a_non_checkpoint_dir(
    capsys: pytest.CaptureFixture[str], no_training: None, tmp_path: Path
) -> None:
    rc, out = run(capsys, "eval", str(tmp_path))
    assert rc == 2
    line = error_line(out)
    assert str(tmp_path) in line and "not a checkpoint directory" in line


def test_eval_of_a_checkpoint_outside_its_run_dir(
    capsys: pytest.CaptureFixture[str], no_training: None, tmp_path: Path
) -> None:
    ckpt = tmp_path / "checkpoints" / "step_000010"
    (ckpt / "model").mkdir(parents=True)
    rc, out = run(capsys, "eval", str(ckpt))
    assert rc == 2
    line = error_line(out)
    assert str(tmp_path / "config.yaml") in line and "not found" in line


@pytest.mark.parametrize("name", ["plain", "brackets[/x]", "tag[bold]"])
def test_plot_without_metrics(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str
) -> None:
    run_dir = tmp_path / name  # rich markup-like names must be printed as they are
    run_dir.mkdir(parents=True)
    rc, out = run(capsys, "plot", str(run_dir))
    assert rc == 2
    line = error_line(out)
    assert f"{run_dir} has no metrics.jsonl" in line
    assert not (run_dir / "plots").exists()


def test_plot_of_a_missing_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out = run(capsys, "plot", str(tmp_path / "missing"))
    assert rc == 2
    assert "metrics.jsonl" in error_line(out)


@pytest.mark.parametrize(
    ("task", "label"), [("arithmetic", "held-out success"), ("textworld", "held-out win rate")]
)
def test_the_result_line_speaks_the_tasks_language(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], task: str, label: str
) -> None:
    from spear.display import progress_style

    rows = [{"step": 0, "eval/success": 0.125}, {"step": 10, "eval/success": 0.375}]
    (tmp_path / "metrics.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in rows))
    cli._print_result(tmp_path, progress_style(task).result, plot=False)
    assert f"{label}: 12.5% -> 37.5% (+25.0 points)" in capsys.readouterr().out
