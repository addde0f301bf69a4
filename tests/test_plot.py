"""The run plot: which series a panel draws, and whole-number training steps on the x-axis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest

from spear.plot import PANELS, Panel, panel_series, plot_run

TOOLS = next(p for p in PANELS if p.drop_zero)


def _rows(**series: list[float]) -> list[dict[str, Any]]:
    n = len(next(iter(series.values())))
    return [
        {"step": i, **{k.replace("__", "/"): v[i] for k, v in series.items()}} for i in range(n)
    ]


def test_a_text_game_shows_inadmissible_actions_not_tool_calls() -> None:
    rows = _rows(train__tool_calls=[0, 0], train__invalid_tool_calls=[0, 0],
                 train__invalid_actions=[2.5, 1.0])  # fmt: skip
    assert panel_series(rows, TOOLS) == [("inadmissible actions", [0, 1], [2.5, 1.0])]


def test_a_tool_task_shows_its_calls_and_hides_zero_actions() -> None:
    rows = _rows(train__tool_calls=[0.3, 0.9], train__invalid_tool_calls=[0.1, 0.0],
                 train__invalid_actions=[0, 0])  # fmt: skip
    assert [label for label, *_ in panel_series(rows, TOOLS)] == [
        "valid tool calls",
        "invalid tool calls",
    ]


def test_all_zero_series_are_kept_when_nothing_else_is_drawn() -> None:
    rows = _rows(train__tool_calls=[0, 0], train__invalid_actions=[0, 0])
    assert len(panel_series(rows, TOOLS)) == 2
    plain = Panel("Replay", (("replay/size", "stored"),), "samples")  # drop_zero off
    assert panel_series(_rows(replay__size=[0, 0]), plain) == [("stored", [0, 1], [0.0, 0.0])]


def test_few_steps_get_whole_number_ticks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows(train__success=[0.1, 0.4, 0.5], eval__success=[0.2, 0.3, 0.6])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures: list[Any] = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect it
    assert plot_run(tmp_path).exists()
    ticks = [t for ax in figures[0].axes for t in ax.get_xticks()]
    assert ticks and all(float(t).is_integer() for t in ticks)
