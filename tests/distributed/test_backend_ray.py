"""``trainer.backend=ray`` end to end on a local 2-CPU Ray cluster (opt in: ``-m ray``).

The tiny built-in model on the arithmetic task, a few steps each. Every actor requests a
fraction of a CPU so that env workers, rollout workers and train ranks all fit two cores.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import spear.trainer as trainer_module
from spear.config import DEFAULT_RUN_CONFIG, Config, load_config
from spear.trainer import Trainer
from tests.test_trainer import TINY

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

SMALL = [
    *TINY, "rollout.group_size=2", "trainer.num_threads=1", "replay.enabled=true",
    "replay.capacity=2", "replay.trigger_ratio=0.5", "reward.tool_bonus.mode=cosine",
    "reward.tool_bonus.horizon=4", "replay.loss_coef={kind: cosine_up, value: 1.0, horizon: 4}",
]  # fmt: skip
FRACTIONAL = [
    "distributed.cpus_per_env_worker=0.2", "distributed.cpus_per_rollout_worker=0.2",
    "distributed.cpus_per_train_rank=0.2", "distributed.call_timeout_s=120",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spear-cache")


def _cfg(cache_dir: Path, run_dir: Path, *extra: str) -> Config:
    overrides = [*SMALL, *FRACTIONAL, f"model.cache_dir={cache_dir}", f"trainer.run_dir={run_dir}"]
    return load_config(file=DEFAULT_RUN_CONFIG, overrides=[*overrides, *extra])


def _trainer(cache_dir: Path, run_dir: Path, *extra: str) -> Trainer:
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(_cfg(cache_dir, run_dir, *extra), run_dir)


def _steps(t: Trainer, n: int) -> list[dict[str, float]]:
    try:
        return [t.train_step() for _ in range(n)] + [t.evaluate()]
    finally:
        t.close()


def _same_run(m: dict[str, float]) -> dict[str, float]:
    """Metrics that must not depend on the backend (timings and worker counters differ)."""
    return {k: v for k, v in m.items() if not k.startswith(("time/", "throughput/", "dist/"))}


def _same_state(a: Any, b: Any) -> bool:
    """Deep equality of state dicts holding tensors (exact, dtype and shape included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_state, a, b))
    return bool(a == b)


@pytest.fixture
def graded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in grader: the barely warmed-up tiny model never answers correctly, so every other
    episode (by id, the same on every backend) gets outcome 1; the replay buffer then fills."""
    real = trainer_module.assign_rewards

    def assign(episodes: Any, step: int, *args: Any, **kwargs: Any) -> dict[str, float]:
        for e in episodes:
            e.outcome_reward = float(e.episode_id % 2)
        return real(episodes, step, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "assign_rewards", assign)


def test_ray_backend_equals_local_with_one_worker_each(
    cluster: None, cache_dir: Path, tmp_path: Path, graded: None
) -> None:
    local = _trainer(cache_dir, tmp_path / "local", "trainer.backend=local")
    local_metrics = _steps(local, 3)
    remote = _trainer(
        cache_dir,
        tmp_path / "ray",
        "trainer.backend=ray",
        "distributed.env_workers=1",
        "distributed.rollout_workers=1",
    )
    assert remote.backend.engines is not None and remote.backend.env_pool is not None
    ray_metrics = _steps(remote, 3)
    # the replay buffer really replayed, and the schedules moved (cosine over 4 steps)
    assert any(m.get("replay/optimizer_steps", 0) > 0 for m in local_metrics)
    assert [m["reward/tool_factor"] for m in local_metrics[:3]] != [1.0] * 3
    assert [_same_run(m) for m in ray_metrics] == [_same_run(m) for m in local_metrics]
    assert (
        ray_metrics[-2]["dist/env_failed_episodes"] == 0
        and ray_metrics[-2]["dist/rollout_restarts"] == 0
    )
    assert local.c.buffer is not None and remote.c.buffer is not None
    a, b = local.c.buffer.state_dict(), remote.c.buffer.state_dict()
    assert len(a["lengths"]) > 0 and _same_state(a, b)  # items, history, the buffer's generator
    for p, q in zip(
        local.c.policy.model.parameters(), remote.c.policy.model.parameters(), strict=True
    ):
        assert torch.equal(p, q)


SPLIT_FREE = (
    "train/",
    "reward/",
    "replay/size",
    "replay/added",
    "actor/clipfrac",
    "actor/optimizer_steps",
)


def test_two_train_ranks_give_the_single_process_update(
    cluster: None, cache_dir: Path, tmp_path: Path, graded: None
) -> None:
    extra = [
        "distributed.env_workers=0",
        "distributed.rollout_workers=0",
        "optim.lr=1e-3",
        "optim.micro_batch_size=2",
    ]
    local = _trainer(cache_dir, tmp_path / "local", "trainer.backend=local", *extra)
    before = [p.detach().clone() for p in local.c.policy.model.parameters()]
    want = local.train_step()
    local.close()
    remote = _trainer(
        cache_dir, tmp_path / "ray", "trainer.backend=ray", "distributed.train_ranks=2", *extra
    )
    try:
        assert remote.backend.trainers is not None
        got = remote.train_step()  # 4 rows: 2 per rank, 1 micro-batch of 2 each
        moved = 0
        for p0, p, q in zip(
            before,
            local.c.policy.model.parameters(),
            remote.c.policy.model.parameters(),
            strict=True,
        ):
            torch.testing.assert_close(q, p, atol=2e-6, rtol=0)
            moved += int(not torch.equal(p, p0))
        assert moved > 0
        for k, v in want.items():
            if k.startswith(SPLIT_FREE):
                assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-7), k
        remote.train_step()  # a second update on the same ranks works
        assert remote.step == 2
    finally:
        remote.close()


def test_kl_term_on_train_ranks_gives_the_single_process_update(
    cluster: None, cache_dir: Path, tmp_path: Path, graded: None
) -> None:
    """The driver's reference log-probs travel to the train ranks: loss.kl_coef > 0 on two
    ranks updates as the local backend does (the second step, where the policy has left its
    reference, has a non-zero KL)."""
    extra = [
        "distributed.env_workers=0", "distributed.rollout_workers=0", "optim.lr=1e-2",
        "optim.micro_batch_size=2", "loss.kl_coef=0.5", "loss.kl_type=low_var_kl",
    ]  # fmt: skip
    local = _trainer(cache_dir, tmp_path / "local", "trainer.backend=local", *extra)
    want = [local.train_step(), local.train_step()]
    local.close()
    remote = _trainer(
        cache_dir, tmp_path / "ray", "trainer.backend=ray", "distributed.train_ranks=2", *extra
    )
    try:
        got = [remote.train_step(), remote.train_step()]
        for p, q in zip(
            local.c.policy.model.parameters(), remote.c.policy.model.parameters(), strict=True
        ):
            # two AdamW steps at lr 1e-2: the float differences of the two ranks' summed
            # gradients grow to ~1e-5 in a few elements (one step at lr 1e-3 stays under 2e-6)
            torch.testing.assert_close(q, p, atol=5e-5, rtol=0)
    finally:
        remote.close()
    assert want[1]["actor/kl"] > 0
    assert got[1]["actor/kl"] == pytest.approx(want[1]["actor/kl"], rel=1e-3, abs=1e-7)


def _kill_when_reset(pool: Any, calls: int, done: threading.Event) -> None:
    """Kill env worker 0 as soon as ``calls`` env calls (the resets) were issued."""
    deadline = time.monotonic() + 60
    while pool.stats.calls < calls and time.monotonic() < deadline:
        time.sleep(0.002)
    ray.kill(pool.actor(0))
    done.set()


def test_killing_an_env_actor_mid_step_does_not_stop_training(
    cluster: None, cache_dir: Path, tmp_path: Path
) -> None:
    t = _trainer(
        cache_dir, tmp_path / "run", "trainer.backend=ray", "distributed.env_workers=2",
        "distributed.rollout_workers=0", "rollout.group_size=4",
        "filters.group_keep_ratio=1.0",  # keep every episode, so all failed ones are counted
    )  # fmt: skip
    try:
        assert t.backend.env_pool is not None
        killed = threading.Event()
        n = t.cfg.rollout.tasks_per_step * t.cfg.rollout.group_size  # 8 episodes, 4 per worker
        killer = threading.Thread(target=_kill_when_reset, args=(t.backend.env_pool, n, killed))
        killer.start()
        first = t.train_step()
        killer.join()
        assert killed.is_set()
        assert first["dist/env_crashes"] == 1 and first["dist/env_restarts"] == 1
        assert first["dist/env_failed_episodes"] >= 1
        assert first["train/episodes"] == n
        assert first["train/end_env_error"] * n == pytest.approx(first["dist/env_failed_episodes"])
        second = t.train_step()  # the fresh worker serves the next step
        assert (
            t.step == 2 and second["dist/env_failed_episodes"] == first["dist/env_failed_episodes"]
        )
        assert second.get("train/end_env_error", 0.0) == 0.0
    finally:
        t.close()


def test_three_train_ranks_split_an_odd_replay_batch_evenly(cluster: None) -> None:
    """5 rows over 3 ranks (shares 2, 2, 1 + a masked row), as a SIL replay update with
    lambda = 0.5: the same parameters as one process, to float tolerance."""
    from spear.config import OptimConfig
    from spear.distributed.rollout import WorkerParams
    from spear.distributed.train_ranks import RankSetup, TrainGroup
    from spear.policy import Policy, build_optimizer
    from spear.update import policy_update
    from tests.distributed.test_fsdp import _batch, _settings, _tiny_lm

    optim = OptimConfig(lr=1e-3)

    def policy() -> Policy:
        lm = _tiny_lm(0, tied=True)
        opt, sched = build_optimizer(list(lm.parameters()), optim, 10)
        return Policy(lm, None, torch.device("cpu"), opt, sched)

    batch = _batch([5, 9, 7, 12, 6], seed=2)
    settings = _settings("seq-mean-token-sum-norm", mini=5, micro=1, epochs=1)
    want = policy()
    policy_update(want, batch, settings, torch.Generator().manual_seed(3), loss_scale=0.5)
    got = policy()
    setup = RankSetup(optim=optim, total_steps=10, dist_backend="gloo", num_threads=1)
    group = TrainGroup(got, setup, WorkerParams(3, 0.2, 0.0, 120.0, 120.0))
    try:
        res = group.update(got, batch, settings, torch.Generator().manual_seed(3), loss_scale=0.5)
    finally:
        group.shutdown()
    assert res.optimizer_steps == 1
    moved = 0
    for p, q, p0 in zip(
        want.model.parameters(), got.model.parameters(), _tiny_lm(0, True).parameters(), strict=True
    ):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=0)
        moved += int(not torch.equal(p, p0))
    assert moved > 0
