"""`spear eval`: what it accepts (a run, its checkpoints/latest, a checkpoint) and where it writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spear import cli
from spear.config import ConfigError
from spear.evaluate import resolve_checkpoint
from spear.metrics import read_metrics
from tests.test_trainer import TINY

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, _ANSI.sub("", out + err)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step tiny run: checkpoints/step_000002, latest -> it, an eval row at step 2."""
    root = tmp_path_factory.mktemp("eval")
    run = root / "run"
    rc = cli.main(
        ["train", *TINY, f"model.cache_dir={root / 'cache'}", f"trainer.run_dir={run}",
         "trainer.steps=2"]
    )  # fmt: skip
    assert rc == 0
    return run


def test_a_run_its_checkpoints_and_latest_name_the_latest_checkpoint(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoints" / "step_000002"
    for given in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "latest", ckpt):
        assert resolve_checkpoint(given) == ckpt, given


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "checkpoints").mkdir() or p, "has no checkpoint yet"),
        (lambda p: p, "not a checkpoint directory"),
    ],
)
def test_what_is_not_a_checkpoint_is_one_clear_line(tmp_path: Path, make, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as exc:
        resolve_checkpoint(make(tmp_path))
    assert "\n" not in str(exc.value)


def test_eval_appends_its_metrics_beside_the_checkpoint(
    capsys: pytest.CaptureFixture[str], run_dir: Path
) -> None:
    # before: `spear eval` took only a step directory and left an empty eval/metrics.jsonl
    ckpt = run_dir / "checkpoints" / "step_000002"
    rc, out = _cli(capsys, "eval", str(run_dir))
    assert rc == 0, out
    assert f"metrics appended to {ckpt / 'eval' / 'metrics.jsonl'}" in " ".join(out.split())
    rows = read_metrics(ckpt / "eval" / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["step"] == 2
    # greedy on the same held-out tasks as the run's own evaluation at step 2
    (trained,) = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] == 2]
    assert rows[0]["eval/success"] == trained["eval/success"]
    assert rows[0]["eval/episodes"] == 4
    rc, out = _cli(capsys, "eval", str(run_dir / "checkpoints" / "latest"), "eval.num_tasks=2")
    assert rc == 0, out
    rows = read_metrics(ckpt / "eval" / "metrics.jsonl")
    assert [(r["step"], r["eval/episodes"]) for r in rows] == [(2, 4), (2, 2)]


def test_eval_of_a_missing_path_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out = _cli(capsys, "eval", str(tmp_path / "nope"))
    assert rc == 2
    (line,) = [ln for ln in out.splitlines() if ln.strip()]
    assert line.startswith("error:") and "does not exist" in line
