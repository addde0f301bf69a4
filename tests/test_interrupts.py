"""Ctrl-C at every stage of a training step: the resumed run equals the uninterrupted one.

Four steps, a checkpoint and an evaluation every two. An interrupt is injected into one stage of
one step (a KeyboardInterrupt raised from inside it, or a real SIGINT, once or twice); then the
run is resumed and its metrics rows (timings aside) and weights are compared with a run that was
never interrupted, bit for bit.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import spear.trainer as trainer_mod
from spear.checkpoint import checkpoint_progress, latest_checkpoint
from spear.interrupts import TrainingInterrupted
from spear.metrics import read_metrics
from spear.trainer import Trainer
from tests.test_trainer import _cfg, _comparable

STEPS = 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spear-cache")


@pytest.fixture(autouse=True, scope="module")
def _varied_rewards():
    """The tiny model never solves a task, so every advantage would be 0 and no update would
    change a weight: give each episode a reward that depends on what it sampled (deterministic
    in the tokens), so updates, replay and self-imitation all run."""
    real = trainer_mod.assign_rewards

    def assign(episodes, *args, **kwargs):
        out = real(episodes, *args, **kwargs)
        for e in episodes:
            for s in e.samples:
                s.score = float(sum(map(ord, e.response_text)) % 3)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_mod, "assign_rewards", assign)
        yield


def _cfg4(cache_dir: Path, run_dir: Path):
    return _cfg(cache_dir, run_dir, f"trainer.steps={STEPS}", "replay.trigger_ratio=0.25")


def _fit(cache_dir: Path, run_dir: Path, *, resume: bool) -> Trainer:
    run_dir.mkdir(parents=True, exist_ok=True)
    t = Trainer(_cfg4(cache_dir, run_dir), run_dir, resume=resume)
    try:
        t.fit()
    finally:
        t.close()
    return t


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    t = _fit(cache_dir, run_dir, resume=False)
    rows = _comparable(read_metrics(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert any("replay/sil_weight" in r and r.get("replay/optimizer_steps") for r in rows)
    return rows, [p.detach().clone() for p in t.c.policy.model.parameters()]


def _assert_equal_to_reference(run_dir: Path, t: Trainer, reference) -> None:
    rows, params = reference
    assert _comparable(read_metrics(run_dir / "metrics.jsonl")) == rows
    got = list(t.c.policy.model.parameters())
    assert len(got) == len(params)
    assert all(torch.equal(p, q) for p, q in zip(got, params))


class _Injector:
    """Wraps a callable so that it raises (or signals) when the trainer is in ``at_step``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at_step: int, action: Callable[[], None]):
        self.at_step, self.action, self.fired = at_step, action, 0
        self.current = 0  # the step the trainer is working on (set by the train_step wrapper)
        real_train_step = Trainer.train_step

        def train_step(trainer: Trainer) -> dict[str, float]:
            self.current = trainer.step + 1
            return real_train_step(trainer)

        monkeypatch.setattr(Trainer, "train_step", train_step)
        self.monkeypatch = monkeypatch

    def wrap(self, owner: Any, name: str, *, after_step: bool = False) -> None:
        real = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            done = args and isinstance(args[0], Trainer) and args[0].step == self.at_step
            if (done if after_step else self.current == self.at_step) and not self.fired:
                self.fired += 1
                self.action()
            return real(*args, **kwargs)

        self.monkeypatch.setattr(owner, name, wrapper)


def _raise() -> None:
    raise KeyboardInterrupt


# (what is patched, attribute, whether it runs after the step's training is done)
TRAIN_STAGES = [
    (Trainer, "_rollout"),
    (trainer_mod, "assign_rewards"),
    (trainer_mod, "apply_response_filters"),
    (trainer_mod, "apply_group_filter"),
    (trainer_mod, "compute_advantages"),
    (Trainer, "_update"),
    (Trainer, "_self_imitation"),
    (Trainer, "_finish_metrics"),
]


@pytest.mark.parametrize(("owner", "name"), TRAIN_STAGES, ids=[n for _, n in TRAIN_STAGES])
def test_interrupt_inside_a_training_stage_discards_the_step(
    cache_dir, tmp_path, monkeypatch, reference, owner, name
):
    run_dir = tmp_path / "run"
    inj = _Injector(monkeypatch, at_step=3, action=_raise)
    inj.wrap(owner, name)
    with pytest.raises(TrainingInterrupted, match="interrupted in step 3, which was discarded"):
        _fit(cache_dir, run_dir, resume=False)
    assert inj.fired == 1
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and checkpoint_progress(ckpt).step == 2  # step 2's boundary, intact
    monkeypatch.undo()
    _assert_equal_to_reference(run_dir, _fit(cache_dir, run_dir, resume=True), reference)


def test_interrupt_before_any_checkpoint_keeps_the_step0_row_once(
    cache_dir, tmp_path, monkeypatch, reference
):
    run_dir = tmp_path / "run"
    inj = _Injector(monkeypatch, at_step=1, action=_raise)
    inj.wrap(Trainer, "_update")
    with pytest.raises(TrainingInterrupted, match="no checkpoint was written yet"):
        _fit(cache_dir, run_dir, resume=False)
    assert latest_checkpoint(run_dir) is None
    monkeypatch.undo()
    t = _fit(cache_dir, run_dir, resume=True)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    _assert_equal_to_reference(run_dir, t, reference)


@pytest.mark.parametrize("at_step", [2, STEPS], ids=["periodic", "final"])
def test_interrupt_in_an_evaluation_keeps_the_step_and_redoes_its_row(
    cache_dir, tmp_path, monkeypatch, reference, at_step
):
    run_dir = tmp_path / "run"
    inj = _Injector(monkeypatch, at_step=at_step, action=_raise)
    inj.wrap(Trainer, "evaluate", after_step=True)
    with pytest.raises(TrainingInterrupted, match=f"evaluation of step {at_step}"):
        _fit(cache_dir, run_dir, resume=False)
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and checkpoint_progress(ckpt) == (at_step, True)
    monkeypatch.undo()
    t = _fit(cache_dir, run_dir, resume=True)
    assert checkpoint_progress(latest_checkpoint(run_dir)) == (STEPS, False)  # type: ignore[arg-type]
    _assert_equal_to_reference(run_dir, t, reference)


def test_interrupt_while_writing_the_periodic_checkpoint(
    cache_dir, tmp_path, monkeypatch, reference
):
    run_dir = tmp_path / "run"
    inj = _Injector(monkeypatch, at_step=2, action=_raise)
    inj.wrap(trainer_mod, "save_checkpoint")
    with pytest.raises(
        TrainingInterrupted,
        match="checkpoint of step 2, which was discarded; no checkpoint was written yet",
    ):
        _fit(cache_dir, run_dir, resume=False)
    assert latest_checkpoint(run_dir) is None
    monkeypatch.undo()
    _assert_equal_to_reference(run_dir, _fit(cache_dir, run_dir, resume=True), reference)


def _sigint(times: int) -> Callable[[], None]:
    def send() -> None:
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)

    return send


def test_one_real_ctrl_c_finishes_the_step_and_saves_it(
    cache_dir, tmp_path, monkeypatch, reference
):
    run_dir = tmp_path / "run"
    inj = _Injector(monkeypatch, at_step=3, action=_sigint(1))
    inj.wrap(Trainer, "_self_imitation")
    with pytest.raises(TrainingInterrupted, match="stopped after step 3: checkpoint step_000003"):
        _fit(cache_dir, run_dir, resume=False)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]
    assert checkpoint_progress(latest_checkpoint(run_dir)) == (3, False)  # type: ignore[arg-type]
    monkeypatch.undo()
    _assert_equal_to_reference(run_dir, _fit(cache_dir, run_dir, resume=True), reference)


def test_a_second_real_ctrl_c_stops_at_once_and_discards_the_step(
    cache_dir, tmp_path, monkeypatch, reference
):
    run_dir = tmp_path / "run"
    inj = _Injector(monkeypatch, at_step=3, action=_sigint(2))
    inj.wrap(Trainer, "_update")
    with pytest.raises(TrainingInterrupted, match="step 3, which was discarded"):
        _fit(cache_dir, run_dir, resume=False)
    assert checkpoint_progress(latest_checkpoint(run_dir)) == (2, False)  # type: ignore[arg-type]
    monkeypatch.undo()
    _assert_equal_to_reference(run_dir, _fit(cache_dir, run_dir, resume=True), reference)


def test_the_sigint_handler_is_restored_after_fit(cache_dir, tmp_path):
    before = signal.getsignal(signal.SIGINT)
    _fit(cache_dir, tmp_path / "run", resume=False)
    assert signal.getsignal(signal.SIGINT) is before
