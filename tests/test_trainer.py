"""End-to-end trainer behaviour on a very small built-in model (seconds, not minutes)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from spear.config import DEFAULT_RUN_CONFIG, load_config
from spear.metrics import read_metrics
from spear.trainer import Trainer

TINY = [
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.warm_start.num_demos=64",
    "model.warm_start.steps=5",
    "model.warm_start.batch_size=16",
    "rollout.tasks_per_step=2",
    "rollout.group_size=4",
    "rollout.max_turns=2",
    "rollout.max_new_tokens=16",
    "rollout.max_response_tokens=32",
    "optim.micro_batch_size=4",
    "eval.num_tasks=4",
    "eval.every=2",
    "replay.capacity=2",
    "replay.trigger_ratio=0.5",
    "trainer.save_every=2",
    "logging.tensorboard=false",
    "logging.progress=false",
    # a 5-step warm start writes byte salad that the response filters would remove entirely
    "filters.unreadable=false",
    "filters.repetitive=false",
    "filters.incomplete=false",
    "filters.overlong=false",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spear-cache")


def _cfg(cache_dir: Path, run_dir: Path, *extra: str):
    return load_config(
        file=DEFAULT_RUN_CONFIG,
        overrides=[*TINY, f"model.cache_dir={cache_dir}", f"trainer.run_dir={run_dir}", *extra],
    )


def _run(cfg, run_dir: Path, *, resume: bool = False) -> tuple[Trainer, dict[str, float]]:
    run_dir.mkdir(parents=True, exist_ok=True)
    t = Trainer(cfg, run_dir, resume=resume)
    last = t.fit()
    t.close()
    return t, last


def _comparable(rows):
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows
    ]


def test_training_changes_parameters_and_logs(cache_dir, tmp_path):
    cfg = _cfg(cache_dir, tmp_path / "run", "trainer.steps=2")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    t = Trainer(cfg, run_dir)
    before = [p.detach().clone() for p in t.c.policy.model.parameters()]
    m = t.train_step()
    after = list(t.c.policy.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    for key in (
        "train/success",
        "actor/entropy",
        "replay/sil_weight",
        "reward/tool_factor",
        "time/rollout",
    ):
        assert key in m and math.isfinite(m[key]), key
    t.close()


def test_seeded_runs_are_identical(cache_dir, tmp_path):
    a = _cfg(cache_dir, tmp_path / "a", "trainer.steps=3")
    b = _cfg(cache_dir, tmp_path / "b", "trainer.steps=3")
    ta, _ = _run(a, tmp_path / "a")
    tb, _ = _run(b, tmp_path / "b")
    assert _comparable(read_metrics(tmp_path / "a" / "metrics.jsonl")) == _comparable(
        read_metrics(tmp_path / "b" / "metrics.jsonl")
    )
    for p, q in zip(ta.c.policy.model.parameters(), tb.c.policy.model.parameters()):
        assert torch.equal(p, q)


def test_resume_equals_uninterrupted(cache_dir, tmp_path):
    full, _ = _run(_cfg(cache_dir, tmp_path / "full", "trainer.steps=4"), tmp_path / "full")
    _run(_cfg(cache_dir, tmp_path / "part", "trainer.steps=2"), tmp_path / "part")
    resumed, _ = _run(
        _cfg(cache_dir, tmp_path / "part", "trainer.steps=4"), tmp_path / "part", resume=True
    )
    assert resumed.step == 4
    rows_full = _comparable(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    rows_part = _comparable(read_metrics(tmp_path / "part" / "metrics.jsonl"))
    assert rows_part == rows_full
    for p, q in zip(full.c.policy.model.parameters(), resumed.c.policy.model.parameters()):
        assert torch.equal(p, q)


def test_nonfinite_loss_skips_the_update(cache_dir, tmp_path, monkeypatch):
    cfg = _cfg(cache_dir, tmp_path / "nan", "trainer.steps=1")
    (tmp_path / "nan").mkdir()
    t = Trainer(cfg, tmp_path / "nan")
    import spear.update as upd

    real = upd.AGGREGATIONS.get

    def poisoned(name):
        fn = real(name)
        return lambda v, m, n: fn(v, m, n) * torch.tensor(float("nan"))

    monkeypatch.setattr(upd.AGGREGATIONS, "get", poisoned)
    before = [p.detach().clone() for p in t.c.policy.model.parameters()]
    m = t.train_step()
    assert m["actor/skipped_nonfinite"] >= 1 and m["actor/optimizer_steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, t.c.policy.model.parameters()))
    t.close()


def test_ctrl_c_writes_a_final_checkpoint(cache_dir, tmp_path):
    cfg = _cfg(cache_dir, tmp_path / "int", "trainer.steps=5", "trainer.save_every=0")
    (tmp_path / "int").mkdir()
    t = Trainer(cfg, tmp_path / "int")

    seen = []

    def interrupt(step, metrics):
        seen.append((step, "eval/success" in metrics))
        if step > 0:  # step 0 is the evaluation before training
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        t.fit(on_step=interrupt)
    t.close()
    assert seen == [(0, True), (1, False)]  # the before value reaches the display
    assert (tmp_path / "int" / "checkpoints" / "step_000001" / "trainer_state.pt").exists()


def test_sampler_logprobs_equal_recomputed_ones(cache_dir, tmp_path):
    """rollout.recompute_old_logprobs=false keeps the sampler's log-probs: they must be the
    policy's own log-probs of the collected tokens (multi-turn, with tool observations)."""
    from spear.stages import fill_old_logprobs

    cfg = _cfg(cache_dir, tmp_path / "run", "rollout.recompute_old_logprobs=false")
    (tmp_path / "run").mkdir()
    t = Trainer(cfg, tmp_path / "run")
    samples = [s for e in t._rollout(1) for s in e.samples]
    sampled = [s.behavior_logprobs.clone() for s in samples]
    fill_old_logprobs(t.c.policy, samples, t.cfg)
    checked = 0
    for before, s in zip(sampled, samples):
        mask = s.loss_mask.bool()
        checked += int(mask.sum())
        assert torch.allclose(before[mask], s.behavior_logprobs[mask], atol=1e-4), s
    assert checked > 0
    t.close()


def test_no_recompute_skips_the_old_logprob_pass(cache_dir, tmp_path, monkeypatch):
    import spear.trainer as trainer_module

    def refuse(*_, **__):
        raise AssertionError("old log-probs were recomputed")

    monkeypatch.setattr(trainer_module, "fill_old_logprobs", refuse)
    cfg = _cfg(
        cache_dir, tmp_path / "run", "rollout.recompute_old_logprobs=false", "replay.enabled=false"
    )
    (tmp_path / "run").mkdir()
    t = Trainer(cfg, tmp_path / "run")
    m = t.train_step()
    assert "time/old_logprobs" not in m and math.isfinite(m["actor/entropy"])
    t.close()


def test_one_step_update_takes_old_logprobs_from_its_forward_pass(cache_dir, tmp_path, monkeypatch):
    """With one optimizer step per batch (the default) no separate old-log-prob pass runs, and the
    behaviour log-probs the samples keep (and the replay buffer stores) are the policy's own
    before the update."""
    import spear.trainer as trainer_module
    from spear.types import TokenBatch

    def refuse(*_, **__):
        raise AssertionError("a separate old-log-prob pass ran")

    seen: dict = {}
    advantages = trainer_module.compute_advantages

    def before_update(samples, cfg):  # runs between the old-log-prob decision and the update
        kept = [s for s in samples if not s.is_filtered and s.num_response_tokens > 0]
        batch = TokenBatch.collate(kept, pad_id=t.c.policy.tokenizer.pad_token_id)
        seen["samples"] = kept
        seen["want"] = t.c.policy.batch_logprobs(batch, micro_batch_size=3, temperature=1.0)
        return advantages(samples, cfg)

    monkeypatch.setattr(trainer_module, "fill_old_logprobs", refuse)
    monkeypatch.setattr(trainer_module, "compute_advantages", before_update)
    (tmp_path / "run").mkdir()
    t = Trainer(_cfg(cache_dir, tmp_path / "run"), tmp_path / "run")
    m = t.train_step()
    assert "time/old_logprobs" not in m and m["actor/optimizer_steps"] == 1
    assert seen["samples"]
    for i, s in enumerate(seen["samples"]):
        mask = s.loss_mask.bool()
        torch.testing.assert_close(
            s.behavior_logprobs[mask], seen["want"][i, : s.num_tokens][mask], atol=1e-5, rtol=0
        )
    t.close()


def test_several_optimizer_steps_recompute_old_logprobs_first(cache_dir, tmp_path, monkeypatch):
    import spear.trainer as trainer_module

    calls = []
    fill = trainer_module.fill_old_logprobs
    monkeypatch.setattr(
        trainer_module, "fill_old_logprobs", lambda *a, **k: calls.append(1) or fill(*a, **k)
    )
    (tmp_path / "run").mkdir()
    t = Trainer(_cfg(cache_dir, tmp_path / "run", "optim.ppo_epochs=2"), tmp_path / "run")
    m = t.train_step()
    assert calls and "time/old_logprobs" in m and m["actor/optimizer_steps"] == 2
    t.close()


def test_replay_recompute_takes_old_logprobs_from_the_replay_forward_pass(
    cache_dir, tmp_path, monkeypatch
):
    """replay.recompute_old_logprobs=true with a one-step replay update: the replayed samples'
    old log-probs come from that update's own forward pass (no separate pass), so the replay
    importance ratio is exactly 1 and nothing is clipped."""
    import spear.trainer as trainer_module

    def refuse(*_, **__):
        raise AssertionError("a separate old-log-prob pass ran")

    real = trainer_module.assign_rewards

    def graded(episodes, step, *args, **kwargs):  # the tiny model never answers right: grade
        for e in episodes:  # every other episode correct, so positive advantages reach the buffer
            e.outcome_reward = float(e.episode_id % 2)
        return real(episodes, step, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "assign_rewards", graded)
    monkeypatch.setattr(trainer_module, "fill_old_logprobs", refuse)
    (tmp_path / "run").mkdir()
    cfg = _cfg(cache_dir, tmp_path / "run", "replay.recompute_old_logprobs=true")
    t = Trainer(cfg, tmp_path / "run")
    replayed = [m for m in (t.train_step() for _ in range(4)) if m.get("replay/optimizer_steps")]
    assert replayed, "the replay buffer never triggered"
    for m in replayed:
        assert m["replay/approx_kl"] == 0.0 and m["replay/clipfrac"] == 0.0
    t.close()


@pytest.mark.parametrize("keep", [True, False])
def test_keep_kv_cache_reaches_the_engine_and_nothing_is_held_after_a_rollout(
    cache_dir, tmp_path, keep, monkeypatch
):
    # Continuing kept rows is tested in tests/rollout/test_turn_cache.py (this tiny warm model
    # ends its episodes in one turn); here: the config switch and the release.
    from spear.rollout.turn_cache import TurnCache

    asked: list[bool] = []
    real = TurnCache.continue_rows
    monkeypatch.setattr(
        TurnCache,
        "continue_rows",
        lambda self, *a, **k: asked.append(True) or real(self, *a, **k),
    )
    cfg = _cfg(cache_dir, tmp_path / "run", "trainer.steps=1", f"rollout.keep_kv_cache={keep}")
    (tmp_path / "run").mkdir()
    t = Trainer(cfg, tmp_path / "run")
    t.train_step()
    assert (t.c.engine._turns is not None) == keep
    assert bool(asked) == keep  # every turn's prefill looks for kept rows first
    assert len(t.c.engine._turns or []) == 0  # freed once the rollout is over
    t.close()


@pytest.mark.parametrize("retain", [True, False])
def test_retain_freed_memory_switch(cache_dir, tmp_path, retain, monkeypatch):
    import spear.trainer as trainer_module

    calls: list[bool] = []
    monkeypatch.setattr(trainer_module, "retain_freed_memory", lambda: calls.append(True) or True)
    cfg = _cfg(cache_dir, tmp_path / "run", f"trainer.retain_freed_memory={retain}")
    (tmp_path / "run").mkdir()
    Trainer(cfg, tmp_path / "run").close()
    assert bool(calls) == retain


def _graded(monkeypatch):
    """The tiny model never answers right: grade every other episode correct, so positive
    advantages reach the replay buffer and it triggers."""
    import spear.trainer as trainer_module

    real = trainer_module.assign_rewards

    def graded(episodes, step, *args, **kwargs):
        for e in episodes:
            e.outcome_reward = float(e.episode_id % 2)
        return real(episodes, step, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "assign_rewards", graded)


def _rows(input_ids, attention_mask) -> list[tuple[int, ...]]:
    return [tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids, attention_mask)]


def test_the_replay_update_trains_on_the_replay_batch_B2(cache_dir, tmp_path, monkeypatch):
    # reference defect B2: the replay pass built its micro-batches from the last on-policy
    # mini-batch. Here every row the replay update runs through the model is a replayed sample,
    # each exactly once (one epoch, one mini-batch of replay.sample_size)
    from collections import Counter

    from spear.policy import Policy

    _graded(monkeypatch)
    phase: list[str] = []
    seen: dict[str, list[tuple[int, ...]]] = {"actor": [], "replay": []}
    real_forward = Policy.forward_logprobs

    def forward(self, batch, **kw):
        if phase:
            seen[phase[-1]].extend(_rows(batch.input_ids, batch.attention_mask))
        return real_forward(self, batch, **kw)

    monkeypatch.setattr(Policy, "forward_logprobs", forward)
    (tmp_path / "run").mkdir()
    t = Trainer(_cfg(cache_dir, tmp_path / "run"), tmp_path / "run")
    consumed: list[list[tuple[int, ...]]] = []
    real_consume, real_update = t.c.buffer.consume, t._update

    def consume(step):
        batch = real_consume(step)
        consumed.append([tuple(s.input_ids.tolist()) for s in batch.samples])
        return batch

    def update(samples, settings, stage, step, *, prefix, **kw):
        phase.append(prefix)
        try:
            return real_update(samples, settings, stage, step, prefix=prefix, **kw)
        finally:
            phase.pop()

    monkeypatch.setattr(t.c.buffer, "consume", consume)
    monkeypatch.setattr(t, "_update", update)
    for _ in range(4):
        seen["replay"].clear()
        m = t.train_step()
        if m.get("replay/optimizer_steps"):
            assert Counter(seen["replay"]) == Counter(consumed[-1])
            break
    else:
        pytest.fail("the replay buffer never triggered")
    t.close()


def test_response_filters_run_on_the_on_policy_batch_B9(cache_dir, tmp_path, monkeypatch):
    # reference defect B9: the response filters ran only in the replay trainer, so Dr.BoT runs
    # had none. Here they mark the step's own samples, which then leave the update
    import spear.trainer as trainer_module

    calls: list[tuple[int, tuple[str, ...]]] = []
    real_filters = trainer_module.apply_response_filters

    def filters(episodes, params, tokenizer):
        calls.append((len(episodes), params.enabled))
        return real_filters(episodes, params, tokenizer)

    monkeypatch.setattr(trainer_module, "apply_response_filters", filters)
    (tmp_path / "run").mkdir()
    cfg = _cfg(
        cache_dir,
        tmp_path / "run",
        "filters.unreadable=true",
        "filters.group_keep_ratio=1.0",
        "replay.enabled=false",
    )
    t = Trainer(cfg, tmp_path / "run")
    trained: list[int] = []
    real_update = t.backend.update
    monkeypatch.setattr(
        t.backend,
        "update",
        lambda policy, batch, *a, **k: (
            trained.append(batch.num_rows) or real_update(policy, batch, *a, **k)
        ),
    )
    m = t.train_step()
    assert calls == [(8, ("unreadable",))]  # 2 tasks x 4 rollouts, one sample each
    caught = int(m["filter/unreadable"])
    assert 0 < caught < 8  # this barely warm model writes byte salad now and then
    assert m["filter/response_filtered"] == caught
    assert trained == ([8 - caught] if caught < 8 else [])  # filtered samples leave the update
    t.close()


def test_eval_episodes_are_the_evaluation_before_its_metrics(cache_dir, tmp_path):
    cfg = _cfg(cache_dir, tmp_path / "run", "eval.num_tasks=5")
    (tmp_path / "run").mkdir()
    t = Trainer(cfg, tmp_path / "run")
    expected = t.c.source.tasks(cfg.eval.split, 5, seed=cfg.trainer.seed)
    tasks, episodes = t.eval_episodes()
    metrics = t.evaluate()
    t.close()
    assert [task.task_id for task in tasks] == [task.task_id for task in expected]
    assert [e.task_id for e in episodes] == [task.task_id for task in tasks]  # one each, in order
    assert metrics["eval/success"] == sum(e.success for e in episodes) / 5
    assert metrics["eval/episodes"] == 5
