"""Env pool pieces that need no Ray: the in-actor EnvHost, worker choice, CPU checks, params."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from spear.distributed.env_pool import (
    ENV_RAISED,
    EnvHost,
    EnvPoolError,
    EnvPoolParams,
    check_cpu_request,
    env_error_result,
    pick_worker,
)
from spear.envs.base import StepResult, Task
from spear.types import Message


class ScriptedEnv:
    """A test env whose behaviour is chosen by the action text.

    ``"say <x>"`` -> reward = len(x), not terminated; ``"end"`` -> terminated, reward 1;
    ``"raise"`` -> ValueError; ``"crash"`` -> the process exits; ``"sleep <s>"`` -> sleeps s
    seconds, then reward 0. ``info["pid"]`` tells which process stepped it.
    """

    def __init__(self) -> None:
        self.task: Task | None = None
        self.turns = 0
        self.closed = False

    def reset(self, task: Task, *, seed: int | None = None) -> tuple[list[Message], dict[str, Any]]:
        self.task, self.turns = task, 0
        return [{"role": "user", "content": task.prompt}], {"seed": seed, "pid": os.getpid()}

    def step(self, action_text: str) -> StepResult:
        self.turns += 1
        verb, _, arg = action_text.partition(" ")
        info = {"pid": os.getpid(), "turns": self.turns}
        if verb == "raise":
            raise ValueError("scripted failure")
        if verb == "crash":
            os._exit(1)
        if verb == "sleep":
            time.sleep(float(arg))
            return StepResult([{"role": "user", "content": "slept"}], 0.0, False, info=info)
        if verb == "end":
            return StepResult([], 1.0, True, info=info)
        return StepResult(
            [{"role": "user", "content": f"echo {arg}"}], float(len(arg)), False, info=info
        )

    def close(self) -> None:
        self.closed = True


def _task(i: int) -> Task:
    return Task(task_id=f"t{i}", prompt=f"prompt {i}")


def test_env_host_runs_envs_and_isolates_failures() -> None:
    host = EnvHost(ScriptedEnv)
    msgs, info = host.reset(0, _task(0), 7)
    assert msgs == [{"role": "user", "content": "prompt 0"}] and info["seed"] == 7
    host.reset(1, _task(1), None)
    assert host.num_envs() == 2
    # "say abc" -> reward len("abc") = 3; "raise" -> env error for env 1 only
    out = host.step_batch([(0, "say abc"), (1, "raise"), (0, "end")])
    assert out[0].reward == 3.0 and not out[0].terminated
    assert out[1].terminated and out[1].reward == 0.0
    assert (
        out[1].info["env_error"].startswith(ENV_RAISED) and "ValueError" in out[1].info["env_error"]
    )
    assert out[2].terminated and out[2].reward == 1.0 and out[2].info["turns"] == 2
    host.close(0)
    assert host.num_envs() == 1
    with pytest.raises(KeyError, match="env 0 does not exist"):
        host.step(0, "say x")
    host.close(0)  # closing twice is harmless


def test_env_host_reset_reuses_the_env_of_an_id() -> None:
    host = EnvHost(ScriptedEnv)
    host.reset(3, _task(0), None)
    host.step(3, "say a")
    host.reset(3, _task(1), 1)
    assert host.num_envs() == 1
    assert host.step(3, "say b").info["turns"] == 1  # the reset restarted the turn count


def test_env_error_result_fails_the_episode() -> None:
    r = env_error_result("boom")
    assert r.terminated and r.reward == 0.0 and r.messages == []
    assert r.info == {"env_error": "boom", "success": False}


def test_pick_worker_least_loaded_lowest_index() -> None:
    assert pick_worker([2, 1, 1, 3]) == 1
    assert pick_worker([0]) == 0
    assert pick_worker([5, 4, 4, 0]) == 3
    with pytest.raises(ValueError, match="no workers"):
        pick_worker([])


def test_check_cpu_request() -> None:
    check_cpu_request(0.5, 4, [2.0])  # 4 x 0.5 = 2 CPUs: fits exactly
    check_cpu_request(2.0, 2, [2.0, 2.0])
    with pytest.raises(EnvPoolError, match="largest Ray node has 2 CPUs"):
        check_cpu_request(3.0, 1, [2.0, 2.0])  # a 3-CPU actor never fits a 2-CPU node
    with pytest.raises(EnvPoolError, match="exceeds the cluster's 2 CPUs"):
        check_cpu_request(1.0, 3, [2.0])
    with pytest.raises(EnvPoolError, match="largest Ray node has 0 CPUs"):
        check_cpu_request(0.1, 1, [])


@pytest.mark.parametrize(
    ("field", "value", "msg"),
    [
        ("num_workers", 0, "num_workers must be >= 1"),
        ("cpus_per_worker", 0.0, "cpus_per_worker must be > 0"),
        ("cpus_per_worker", float("nan"), "cpus_per_worker must be > 0"),
        ("call_timeout_s", -1.0, "call_timeout_s must be"),
        ("start_timeout_s", float("inf"), "start_timeout_s must be"),
        ("max_concurrency", 0, "max_concurrency must be >= 1"),
    ],
)
def test_params_reject_bad_values(field: str, value: float, msg: str) -> None:
    good: dict[str, Any] = dict(
        num_workers=2,
        cpus_per_worker=0.5,
        call_timeout_s=1.0,
        start_timeout_s=30.0,
        max_concurrency=1,
    )
    EnvPoolParams(**good)
    with pytest.raises(ValueError, match=msg):
        EnvPoolParams(**{**good, field: value})
