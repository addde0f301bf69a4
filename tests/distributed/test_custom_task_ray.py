"""A plugin task runs unchanged with ``trainer.backend=ray`` (opt in: ``-m ray``): the env
workers import the plugin themselves, from a directory that is on neither their ``sys.path``
nor ``PYTHONPATH``."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from spear.config import load_config
from spear.tasks import PluginEnvFactory
from spear.trainer import Trainer
from tests.test_custom_tasks import EXAMPLE, SMALL

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


def test_the_example_task_trains_on_ray_env_workers(
    cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    shutil.copy(EXAMPLE / "task.py", plugin / "shop_plugin_copy.py")
    shutil.copy(EXAMPLE / "orders.jsonl", plugin / "orders.jsonl")
    monkeypatch.chdir(plugin)  # a plugin next to the user's config, found from the cwd
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(
        file=EXAMPLE / "config.yaml",
        overrides=[
            *SMALL, "task.name=shop_plugin_copy:make_task", "trainer.backend=ray",
            "distributed.env_workers=1", "distributed.rollout_workers=0",
            "distributed.cpus_per_env_worker=0.2", "distributed.call_timeout_s=120",
            f"model.cache_dir={tmp_path / 'cache'}", "trainer.num_threads=1",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg, run_dir)
    try:
        assert isinstance(trainer.c.make_env, PluginEnvFactory)
        m = trainer.train_step()
        m.update(trainer.evaluate())
        pool = trainer.backend.env_pool  # type: ignore[attr-defined]
        assert pool is not None and pool.stats.calls > 0  # the envs stepped in the worker
        assert pool.stats.failed_episodes == 0 and pool.stats.env_errors == 0
        assert m["dist/env_failed_episodes"] == 0.0
        assert "train/reward_correct" in m and "eval/reward_used_both_tools" in m
        assert m["eval/episodes"] == 4.0
    finally:
        trainer.close()
        sys.modules.pop("shop_plugin_copy", None)
