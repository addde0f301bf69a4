"""`spear train` around Ctrl-C and resumes: one line saying what was kept, never a traceback, and a
finished run that a resume leaves untouched. Tiny runs (seconds)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import spear.plot
import spear.trainer
from spear import cli
from spear.metrics import read_metrics
from tests.test_trainer import TINY

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spear-cache")


def _train(capsys, cache_dir: Path, *argv: str) -> tuple[int, str]:
    rc = cli.main(["train", *argv])  # an exception here would be a traceback for the user
    out, err = capsys.readouterr()
    return rc, _ANSI.sub("", out + err)


def _new(cache_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"model.cache_dir={cache_dir}", f"trainer.run_dir={run_dir}", *extra]


def _interrupt(*_: Any, **__: Any) -> Any:
    raise KeyboardInterrupt


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")
    }


def test_ctrl_c_while_building_is_one_line_and_keeps_no_run_dir(
    capsys, cache_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(spear.trainer, "build_components", _interrupt)
    rc, out = _train(capsys, cache_dir, *_new(cache_dir, tmp_path / "run"))
    assert rc == 130 and "Traceback" not in out
    (line,) = [ln for ln in out.splitlines() if "interrupted" in ln]
    assert "while building the model" in line and "no run directory was kept" in line
    assert not (tmp_path / "run").exists()


def test_ctrl_c_in_the_step0_evaluation_does_not_claim_a_checkpoint(
    capsys, cache_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(spear.trainer.Trainer, "evaluate", _interrupt)
    rc, out = _train(capsys, cache_dir, *_new(cache_dir, tmp_path / "run", "trainer.steps=1"))
    assert rc == 130 and "Traceback" not in out
    assert "no checkpoint was written" in out and "checkpoint written" not in out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ctrl_c_while_plotting_a_finished_run_exits_0(capsys, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(spear.plot, "plot_run", _interrupt)
    rc, out = _train(capsys, cache_dir, *_new(cache_dir, tmp_path / "run", "trainer.steps=1"))
    assert rc == 0 and "Traceback" not in out
    assert "interrupted while plotting; the run is complete and saved" in out


def test_resumes_record_their_overrides_and_a_finished_run_is_left_untouched(
    capsys, cache_dir, tmp_path
):
    run_dir = tmp_path / "run"
    rc, _ = _train(capsys, cache_dir, *_new(cache_dir, run_dir, "trainer.steps=1"))
    assert rc == 0
    rc, _ = _train(capsys, cache_dir, "--resume", str(run_dir), "trainer.steps=2")
    assert rc == 0
    rows = [json.loads(ln) for ln in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert [(r["from_step"], r["overrides"]) for r in rows] == [(1, ["trainer.steps=2"])]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2]
    # `spear eval` keeps its results beside the checkpoint; a resume of the finished run (which
    # keeps the recorded trainer.steps=2) must neither rewrite the checkpoint nor delete them
    (run_dir / "checkpoints" / "step_000002" / "eval").mkdir()
    (run_dir / "checkpoints" / "step_000002" / "eval" / "metrics.jsonl").write_text("{}\n")
    before = _tree(run_dir)
    rc, out = _train(capsys, cache_dir, "--resume", str(run_dir))
    assert rc == 0 and "Traceback" not in out
    assert f"run {run_dir} is complete (step 2, trainer.steps=2)" in " ".join(out.split())
    assert "held-out success:" in out
    assert _tree(run_dir) == before
