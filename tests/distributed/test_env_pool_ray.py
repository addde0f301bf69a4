"""RayEnvPool on a local 2-CPU Ray cluster (opt in: ``pytest -m ray tests/distributed``)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from spear.distributed.env_pool import EnvPoolError, EnvPoolParams, EnvWorkerError, RayEnvPool
from tests.distributed.test_env_pool import ScriptedEnv, _task

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


def _params(num_workers: int = 2, timeout: float = 20.0) -> EnvPoolParams:
    # 2 workers x 0.25 CPU: fractional requests so both fit the 2-CPU cluster with room to spare
    return EnvPoolParams(
        num_workers=num_workers,
        cpus_per_worker=0.25,
        call_timeout_s=timeout,
        start_timeout_s=60.0,
        max_concurrency=4,
    )


def test_pool_completes_episodes_on_all_workers(cluster: None) -> None:
    pool = RayEnvPool(ScriptedEnv, _params())
    try:
        handles = [pool.reset(_task(i), seed=i)[0] for i in range(6)]
        assert sorted(h.worker for h in handles) == [0, 0, 0, 1, 1, 1]  # least-loaded placement
        out = pool.step_many([(h, f"say {'x' * i}") for i, h in enumerate(handles)])
        assert [r.reward for r in out] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # reward = len(x * i)
        assert len({r.info["pid"] for r in out}) == 2  # two worker processes did the work
        done = pool.step_many([(h, "end") for h in handles])
        assert all(r.terminated and r.reward == 1.0 and r.info["turns"] == 2 for r in done)
        env = pool.make_env()  # the Env-protocol proxy the agent loop uses
        msgs, _ = env.reset(_task(9))
        assert msgs[0]["content"] == "prompt 9"
        assert env.step("say hello").reward == 5.0
        env.close()
        assert pool.stats.crashes == pool.stats.timeouts == pool.stats.failed_episodes == 0
    finally:
        pool.shutdown()


def test_crashed_worker_is_restarted_and_its_episodes_fail(cluster: None) -> None:
    pool = RayEnvPool(ScriptedEnv, _params())
    try:
        pids = pool.worker_pids()
        handles = [pool.reset(_task(i))[0] for i in range(4)]  # workers 0, 1, 0, 1
        out = pool.step_many([(handles[0], "crash")] + [(h, "say ab") for h in handles[1:]])
        assert "crashed" in out[0].info["env_error"] and out[0].terminated
        assert "crashed" in out[2].info["env_error"]  # same worker as the crash: lost
        assert out[1].reward == out[3].reward == 2.0  # worker 1 unaffected
        assert pool.stats.crashes == 1 and pool.stats.restarts == 1
        assert pool.stats.failed_episodes == 2  # both episodes hosted by worker 0
        new_pids = pool.worker_pids()
        assert new_pids[0] != pids[0] and new_pids[1] == pids[1]
        again = pool.step_many([(handles[2], "say a")])  # a lost episode stays lost
        assert "episode lost" in again[0].info["env_error"]
        h, _, _ = pool.reset(_task(5))  # new episodes run on the fresh worker
        assert pool.step(h, "say abc").reward == 3.0
    finally:
        pool.shutdown()


def test_timed_out_worker_is_treated_as_crashed(cluster: None) -> None:
    pool = RayEnvPool(ScriptedEnv, _params(num_workers=1, timeout=1.0))
    try:
        pid = pool.worker_pids()[0]
        env = pool.make_env()
        env.reset(_task(0))
        t0 = time.monotonic()
        with pytest.raises(EnvWorkerError, match="timed out after 1s"):
            env.step("sleep 30")
        assert time.monotonic() - t0 < 15  # the deadline, not the 30 s sleep
        assert (
            pool.stats.timeouts == 1
            and pool.stats.restarts == 1
            and pool.stats.failed_episodes == 1
        )
        assert pool.worker_pids()[0] != pid
        with pytest.raises(EnvWorkerError, match="episode lost"):
            env.step("say a")
        env.reset(_task(1))  # the proxy moves to the fresh worker
        assert env.step("say ab").reward == 2.0
    finally:
        pool.shutdown()


def test_env_error_fails_one_episode_without_restart(cluster: None) -> None:
    pool = RayEnvPool(ScriptedEnv, _params(num_workers=1))
    try:
        pid = pool.worker_pids()[0]
        env_a, env_b = pool.make_env(), pool.make_env()
        env_a.reset(_task(0))
        env_b.reset(_task(1))
        with pytest.raises(EnvWorkerError, match="env raised ValueError: scripted failure"):
            env_a.step("raise")
        assert env_b.step("say abcd").reward == 4.0
        assert pool.stats.env_errors == 1 and pool.stats.failed_episodes == 1
        assert pool.stats.restarts == 0 and pool.worker_pids() == [pid]
    finally:
        pool.shutdown()


def test_oversized_cpu_request_fails_fast(cluster: None) -> None:
    params = EnvPoolParams(
        num_workers=1,
        cpus_per_worker=4.0,
        call_timeout_s=1.0,
        start_timeout_s=5.0,
        max_concurrency=1,
    )
    with pytest.raises(EnvPoolError, match="would wait forever"):
        RayEnvPool(ScriptedEnv, params)


def _train_iteration(
    pool: RayEnvPool, model: torch.nn.Linear, opt: torch.optim.Optimizer, it: int, kill: bool
) -> int:
    """Play 4 two-turn episodes through the proxy (steps in threads, like the agent loop), then one
    optimizer step on the rewards; optionally kill worker 0 while its steps are in flight.
    Returns the number of failed episodes."""
    envs = [pool.make_env() for _ in range(4)]
    for i, env in enumerate(envs):
        env.reset(_task(10 * it + i))

    def play(env: ScriptedEnv) -> float:
        try:
            return env.step("sleep 1.5").reward + env.step("say abc").reward  # 0 + 3
        except EnvWorkerError:
            return -1.0

    with ThreadPoolExecutor(max_workers=4) as ex:
        futures = [ex.submit(play, env) for env in envs]
        if kill:
            time.sleep(0.5)
            ray.kill(pool.actor(0))  # the process dies mid-step
        rewards = torch.tensor([f.result() for f in futures])
    loss = (model(torch.ones(1, 1)).squeeze() - rewards.clamp(min=0).mean()) ** 2
    opt.zero_grad()
    loss.backward()
    opt.step()
    for env in envs:
        env.close()
    return int((rewards < 0).sum())


def test_killing_an_env_actor_mid_step_does_not_stop_training(cluster: None) -> None:
    pool = RayEnvPool(ScriptedEnv, _params())
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        failed = [_train_iteration(pool, model, opt, it, kill=(it == 1)) for it in range(3)]
        # worker 0 hosts 2 of the 4 episodes (least-loaded placement): both fail in iteration 1
        assert failed == [0, 2, 0]
        assert pool.stats.crashes == 1 and pool.stats.restarts == 1
        assert pool.stats.failed_episodes == 2
    finally:
        pool.shutdown()


def test_kill_thread_safety_many_concurrent_steps(cluster: None) -> None:
    pool = RayEnvPool(ScriptedEnv, _params())
    try:
        envs = [pool.make_env() for _ in range(8)]
        for i, env in enumerate(envs):
            env.reset(_task(i))
        errors: list[Exception] = []

        def run(env: ScriptedEnv) -> None:
            for _ in range(5):
                try:
                    env.step("say a")
                except Exception as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=run, args=(e,)) for e in envs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and pool.stats.calls == 8 + 40
    finally:
        pool.shutdown()
