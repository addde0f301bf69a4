"""The live display of `spear train`: step lines per task family, plain complete lines when the
output is not a terminal, the warm-start build's progress, and one console for log lines."""

from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path

import pytest
from rich.console import Console
from rich.logging import RichHandler

import spear.models.warmstart as ws
from spear import cli
from spear.build import describe_model
from spear.config import DEFAULT_RUN_CONFIG, load_config
from spear.display import (
    GAME_STYLE,
    TOOL_TASK_STYLE,
    PlainLineHandler,
    RunDisplay,
    clock,
    eta_seconds,
    log_handler,
    progress_style,
    step_info,
)

STEP = {
    "train/success": 0.4375,
    "reward/score": 0.5,
    "actor/entropy": 0.81234,
    "train/tool_calls": 0.9,
    "train/invalid_actions": 1.25,
    "train/turns": 3.5,
    "replay/eligible": 12.0,
}


def test_tool_task_step_line() -> None:
    assert step_info(STEP, TOOL_TASK_STYLE, None) == (
        "success 0.44  reward 0.50  entropy 0.812  tools 0.90  sil-eligible 12"
    )


def test_game_step_line_speaks_of_wins_and_inadmissible_actions() -> None:
    line = step_info({**STEP, "eval/success": 0.25}, GAME_STYLE, 0.125)
    assert line == (
        "wins 0.44  reward 0.50  entropy 0.812  inadmissible 1.25  turns 3.5  sil-eligible 12  "
        "held-out wins 0.12 -> 0.25"
    )
    assert "tools" not in line and "success" not in line
    assert progress_style("textworld") is GAME_STYLE
    assert progress_style("arithmetic") is progress_style("any-new-task") is TOOL_TASK_STYLE


def test_the_before_value_shows_at_step_0_and_stays() -> None:
    assert step_info({"eval/success": 0.2}, TOOL_TASK_STYLE, 0.2) == (
        "held-out 0.20 (before training)"
    )
    assert step_info({**STEP, "eval/success": 0.45}, TOOL_TASK_STYLE, 0.2).endswith(
        "held-out 0.20 -> 0.45"
    )
    # a step without an evaluation keeps the before value in view
    assert step_info(STEP, TOOL_TASK_STYLE, 0.2).endswith("held-out 0.20 (before training)")


def test_reward_falls_back_to_the_outcome() -> None:
    assert step_info({"train/outcome_reward": 0.75}, TOOL_TASK_STYLE, None) == "reward 0.75"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"), (math.inf, "-:--:--"), (-1, "-:--:--")],
)
def test_clock(seconds: float, text: str) -> None:
    assert clock(seconds) == text


def test_eta_is_the_mean_pace_times_what_is_left() -> None:
    assert eta_seconds(10, 30, 20.0) == 40.0  # 2 s a step, 20 steps left
    assert eta_seconds(15, 30, 20.0, start=10) == 60.0  # resumed at 10: 4 s a step, 15 left
    assert eta_seconds(0, 30, 5.0) == math.inf


def _plain_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=40), buf  # not a terminal, and narrower than any line


def test_plain_output_is_complete_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    console, buf = _plain_console()
    display = RunDisplay(console, TOOL_TASK_STYLE)
    assert not display.live
    times = iter([0.0, 3.0, 6.0, 9.0, 12.0])
    monkeypatch.setattr("spear.display.time.perf_counter", lambda: next(times))
    with display.training(total=30, completed=0) as on_step:
        on_step(0, {"eval/success": 0.2})
        on_step(1, STEP)
        on_step(2, {**STEP, "eval/success": 0.5})
        on_step(3, STEP)  # the latest held-out value stays on the line until the next one
    lines = buf.getvalue().splitlines()
    assert lines[:2] == [
        "step 0/30  held-out 0.20 (before training)  elapsed 0:00:03  eta -:--:--",
        "step 1/30  success 0.44  reward 0.50  entropy 0.812  tools 0.90  sil-eligible 12  "
        "held-out 0.20 (before training)  elapsed 0:00:06  eta 0:01:27",
    ]  # the pace counts from step 0's line (3 s a step since), not from before the evaluation
    assert "held-out 0.20 -> 0.50" in lines[2] and "held-out 0.20 -> 0.50" in lines[3]
    assert "\r" not in buf.getvalue() and "\x1b" not in buf.getvalue()


def test_plain_warm_start_build_prints_a_line_every_tenth(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    console, buf = _plain_console()
    display = RunDisplay(console, TOOL_TASK_STYLE)
    monkeypatch.setattr("spear.display.time.perf_counter", lambda: 0.0)
    with display.preparing("building the warm model"):
        report = ws._progress(20)  # what build_warm_model hands to train_warm_start
        for step in range(20):
            report(step, 1.0 / (step + 1))
    lines = buf.getvalue().splitlines()
    assert lines[0] == "building the warm model"
    assert [line.split("  ")[0] for line in lines[1:]] == [
        f"warm start {n}/20" for n in range(2, 21, 2)
    ]
    assert lines[-1].startswith("warm start 20/20  loss 0.050  elapsed")
    # outside the block, builds log as before (no display attached)
    assert ws._build_progress.get() is None


def test_plain_warm_start_eta_ignores_the_time_before_the_first_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 100 s of preparation (games, demonstrations), then 1 s a step: at 10/20 the line says
    # 9 s elapsed since step 1 and 10 s left, not 109 s elapsed and 109 s left
    clock_s = [0.0]
    monkeypatch.setattr("spear.display.time.perf_counter", lambda: clock_s[0])
    console, buf = _plain_console()
    display = RunDisplay(console, TOOL_TASK_STYLE)
    with display.preparing("building the warm model"):
        clock_s[0] = 100.0
        report = ws._progress(20)
        for step in range(20):
            clock_s[0] = 100.0 + step
            report(step, 0.5)
    lines = buf.getvalue().splitlines()
    at10 = next(line for line in lines if line.startswith("warm start 10/20"))
    assert "elapsed 0:00:09" in at10 and "eta 0:00:10" in at10


def test_live_warm_start_build_gets_a_progress_bar() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    display = RunDisplay(console, TOOL_TASK_STYLE)
    assert display.live
    with display.preparing("building the warm model"):
        report = ws._progress(8)
        for step in range(8):
            report(step, 0.5)
        console.print("a log line")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert "warm start" in text and "8/8" in text and "loss 0.500" in text
    # the log line is printed on a line of its own (the bars are cleared first, then redrawn)
    assert "a log line" in [part.strip() for part in re.split(r"[\r\n]", text)]


def test_log_lines_share_the_display_console() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True)
    handler = log_handler(terminal)
    assert isinstance(handler, RichHandler) and handler.console is terminal
    console, buf = _plain_console()
    plain = log_handler(console)
    assert isinstance(plain, PlainLineHandler)
    long = "using the cached warm model /a/rather/long/path/that/is/wider/than/forty/columns"
    for level, msg in ((logging.INFO, long), (logging.WARNING, "careful")):
        plain.handle(logging.LogRecord("spear", level, __file__, 1, msg, None, None))
    assert buf.getvalue().splitlines() == [long, "WARNING: careful"]


def test_setup_logging_silences_other_libraries_info(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # restored after the test
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(logging.getLogger("spear"), "level", logging.getLogger("spear").level)
    cli._setup_logging(verbose=False)
    # matplotlib's "generated new fontManager" is INFO: not shown; spear's INFO lines are
    assert not logging.getLogger("matplotlib.font_manager").isEnabledFor(logging.INFO)
    assert logging.getLogger("spear.models.warmstart").isEnabledFor(logging.INFO)
    assert logging.getLogger("matplotlib").isEnabledFor(logging.WARNING)
    assert len(root.handlers) == 1
    handler = root.handlers[0]
    assert isinstance(handler, RichHandler | PlainLineHandler) and handler.console is cli.console


def _default(cache: Path, *overrides: str):  # type: ignore[no-untyped-def]
    return load_config(file=DEFAULT_RUN_CONFIG, overrides=[f"model.cache_dir={cache}", *overrides])


def test_the_spinner_says_first_run_only_when_it_builds(tmp_path: Path) -> None:
    other = _default(tmp_path, "model.warm_start.steps=7")
    assert "first run" in describe_model(other) and "7 warm-start steps" in describe_model(other)
    params = ws.WarmStartParams.from_config(other)
    cached = tmp_path / f"warm-{params.cache_key(other.model.warm_start.seed)}"
    cached.mkdir()
    (cached / ws.REPORT_FILE).write_text("{}")
    assert describe_model(other) == "loading the cached warm model and preparing the task"
    pretrained = _default(tmp_path, "model.path=/models/x")
    assert describe_model(pretrained) == "loading /models/x and preparing the task"
