"""A Ctrl-C in the terminal (SIGINT to the whole process group) leaves the env pool's workers
running, so the trainer can finish the step in flight."""

from __future__ import annotations

import os
import signal
import time

from spear.envs.base import Task
from spear.envs.textworld_games import PoolParams, ProcessEnvPool
from tests.envs.test_textworld import ScriptedEnv


def test_pool_workers_ignore_sigint() -> None:
    params = PoolParams(
        num_workers=1, envs_per_worker=1, timeout_s=5.0, startup_timeout_s=60.0, start_method="fork"
    )
    with ProcessEnvPool(ScriptedEnv, params) as pool:
        pid = pool.reset([Task(task_id="t", prompt="")])[0].info["pid"]
        os.kill(pid, signal.SIGINT)
        time.sleep(0.2)
        out = pool.step(["a"])
        assert out[0].info["pid"] == pid and out[0].info["n"] == 1
        assert pool.stats.restarts == 0
