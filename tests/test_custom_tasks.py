"""Custom tasks end to end: the shipped example through the real CLI, and a task object passed
to ``Trainer`` in Python (a very small built-in model, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spear import cli
from spear.config import load_config
from spear.metrics import read_metrics
from spear.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "shop"
SMALL = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.num_heads=2", "model.warm_start.num_demos=48", "model.warm_start.steps=4",
    "model.warm_start.batch_size=16", "rollout.tasks_per_step=2", "rollout.group_size=4",
    "rollout.max_new_tokens=24", "rollout.max_response_tokens=72", "optim.micro_batch_size=8",
    "eval.num_tasks=4", "eval.every=0", "trainer.save_every=0", "logging.tensorboard=false",
    "logging.progress=false", "filters.unreadable=false", "filters.repetitive=false",
    "filters.incomplete=false", "filters.overlong=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spear-cache")


def test_the_example_trains_through_the_cli(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # the config names examples.shop.task:make_task from the repo root
    run_dir = tmp_path / "run"
    rc = cli.main(
        ["train", str(EXAMPLE / "config.yaml"), *SMALL, "trainer.steps=2",
         f"model.cache_dir={cache_dir}", f"trainer.run_dir={run_dir}"]
    )  # fmt: skip
    assert rc == 0
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("train/reward_correct", "train/reward_used_both_tools", "train/success"):
        assert key in rows[1]
    assert "eval/reward_correct" in rows[0] and "eval/success" in rows[-1]
    (warm,) = cache_dir.glob("warm-*")
    report = json.loads((warm / "warmstart.json").read_text())
    assert report["params"]["source"] == "scripted" and report["params"]["task"]["task"] == "shop"
    assert report["demo_tool_solved"] == 1.0  # the example's script solves its tasks
    assert (run_dir / "checkpoints").is_dir()

    # spear eval on the custom task: greedy success next to pass@k / mean@n, written as JSON
    rc = cli.main(["eval", str(run_dir), "eval.samples=3", "eval.pass_at=[1,2]"])
    assert rc == 0
    (results,) = run_dir.glob("checkpoints/step_*/eval/results.json")
    doc = json.loads(results.read_text())
    assert doc["task"] == "examples.shop.task:make_task" and doc["step"] == 2
    assert doc["samples"] == 3 and doc["pass_at"] == [1, 2] and doc["num_tasks"] == 4
    m = doc["metrics"]
    assert {"eval/success", "eval/pass@1", "eval/pass@2", "eval/mean@3"} <= set(m)
    assert m["eval/pass@1"] == pytest.approx(m["eval/mean@3"])  # pass@1 is the mean success
    assert m["eval/pass@1"] <= m["eval/pass@2"] <= 1.0


def test_a_task_object_passed_to_the_trainer(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from examples.shop.task import make_task

    cfg = load_config(overrides=[*SMALL, "trainer.steps=1", f"model.cache_dir={cache_dir}"])
    assert cfg.task.name == "arithmetic"  # ignored: the object below is the task
    task = make_task(cfg)
    (tmp_path / "run").mkdir()
    trainer = Trainer(cfg, tmp_path / "run", task=task)
    try:
        assert trainer.c.source is task
        m = trainer.train_step()
        assert "train/reward_used_both_tools" in m
        assert trainer.c.make_env == task.make_env  # env workers get the object's own envs
    finally:
        trainer.close()
