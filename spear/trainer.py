"""The SPEAR training step and the fit / evaluate loop. Orchestration only: no math here.

One step (DESIGN.md "Data flow"):

    rollout -> rewards (outcome + tool bonus x phi(t)) -> response filters -> group filter
    -> old log-probs -> advantages -> reference log-probs (loss.kl_coef > 0) -> on-policy update
       (old log-probs come from the update's own forward pass when it is one optimizer step)
    -> replay: maybe consume -> recalibrate -> SIL update x lambda(t)
    -> replay: add this step's positive-advantage samples -> metrics -> checkpoint

Randomness is derived from ``(trainer.seed, step)`` per stage, so a resumed run draws exactly
what an uninterrupted run would (the replay buffer's own generator travels in its state).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from spear.backends import Backend, RolloutRequest, build_backend
from spear.build import Components, build_components
from spear.checkpoint import (
    TrainerState,
    capture_rng,
    latest_checkpoint,
    load_model_weights,
    load_trainer_state,
    restore_rng,
    save_checkpoint,
)
from spear.config import Config
from spear.envs.base import Task, TaskSource
from spear.filters import apply_group_filter, apply_response_filters
from spear.interrupts import TrainingInterrupted, finish_step_on_sigint
from spear.metrics import MetricLogger, logged_steps, sync_metrics
from spear.replay import ReplayBatch
from spear.rewards import assign_rewards
from spear.rollout.loop import RolloutTimes
from spear.runtime import retain_freed_memory
from spear.stages import (
    compute_advantages,
    episode_metrics,
    fill_old_logprobs,
    sampled_metrics,
    set_behavior_logprobs,
)
from spear.types import Episode, Sample, TokenBatch
from spear.update import UpdateSettings, single_step

log = logging.getLogger(__name__)

# Offsets that decorrelate the per-step random streams of the different stages.
_TASKS, _SAMPLING, _UPDATE, _REPLAY_UPDATE, _EVAL, _EVAL_SAMPLES = 1, 2, 3, 4, 5, 6


def stage_generator(seed: int, step: int, stage: int) -> torch.Generator:
    """A fresh generator for one stage of one step, a pure function of (seed, step, stage)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 101 + stage) % (2**63 - 1))


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[f"time/{name}"] = (
            self.seconds.get(f"time/{name}", 0.0) + time.perf_counter() - t0
        )


def _trainable(samples: Sequence[Sample]) -> list[Sample]:
    """The samples an update trains on: unfiltered, with at least one response token."""
    return [s for s in samples if not s.is_filtered and s.num_response_tokens > 0]


class Trainer:
    """Trains a policy with the configured recipe; see the module docstring for one step."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        *,
        resume: bool = False,
        task: TaskSource | None = None,
    ) -> None:
        """``task``: train on this source instead of the one ``cfg.task.name`` names."""
        self.cfg = cfg
        self.run_dir = run_dir
        if cfg.trainer.num_threads:
            torch.set_num_threads(cfg.trainer.num_threads)
        if cfg.trainer.retain_freed_memory:
            retain_freed_memory()
        torch.manual_seed(cfg.trainer.seed)
        self.c: Components = build_components(cfg, task)
        self.step = 0
        self.nonfinite_streak = 0
        self._pending_row: dict[str, float] | None = None  # a restored step awaiting its row
        self._latest: tuple[int, bool] | None = None  # latest checkpoint: (step, row pending)
        ckpt = latest_checkpoint(run_dir) if resume else None
        if ckpt is not None:
            self._restore(ckpt)
        # the metrics rows a resume keeps: those up to the checkpoint's step (a pending step's
        # row is written again); without a checkpoint only the step-0 evaluation's row
        self._has_row0 = ckpt is not None or (resume and 0 in logged_steps(run_dir))
        keep = (
            self.step - (self._pending_row is not None) if ckpt else (0 if self._has_row0 else -1)
        )
        # built after a restore, so the workers start from the restored weights
        self.backend: Backend = build_backend(cfg, self.c)
        self.logger = MetricLogger.create(
            run_dir,
            tensorboard=cfg.logging.tensorboard,
            wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project,
            config=cfg.model_dump(mode="json"),
            resume_step=keep if resume else None,
        )

    # ------------------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """One SPEAR step; returns the step's metrics (one host sync)."""
        cfg, c, step = self.cfg, self.c, self.step + 1
        timer = StageTimer()
        m: dict[str, Tensor | float] = {}
        with timer("rollout"):
            episodes = self._rollout(step)
        m.update(
            assign_rewards(
                episodes, step, c.tool_bonus, invalid_penalty=cfg.reward.invalid_call_penalty
            )
        )
        m.update(apply_response_filters(episodes, c.response_filters, c.policy.tokenizer))
        episodes, group_m = apply_group_filter(
            episodes, keep_ratio=cfg.filters.group_keep_ratio, kind=cfg.filters.group_filter_type
        )
        m.update(group_m)
        samples = [s for e in episodes for s in e.samples]
        recompute = cfg.rollout.recompute_old_logprobs  # else the sampler's log-probs are kept
        fused = recompute and self._fuses_old_logprobs(samples, c.update)
        if recompute and not fused:
            with timer("old_logprobs"):
                fill_old_logprobs(c.policy, samples, cfg)
        m.update(compute_advantages(samples, cfg))
        ref = None
        if c.update.kl_coef > 0:  # the KL term's reference, on the tokens the update trains on
            with timer("ref_logprobs"):
                ref = self._reference_logprobs(samples)
        with timer("update"):
            m.update(
                self._update(
                    samples, c.update, _UPDATE, step, scale=1.0, prefix="actor", fused_old=fused,
                    ref_logprobs=ref,
                )
            )  # fmt: skip
        with timer("sil_update"):
            m.update(self._self_imitation(step))
        if c.buffer is not None:
            m.update(
                {f"replay/{k}": v for k, v in c.buffer.add(samples, step).as_metrics().items()}
            )
            m.update({f"replay/{k}": v for k, v in c.buffer.metrics(step).items()})
        with warnings.catch_warnings():  # the LR schedule is per training step, even one whose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            c.policy.scheduler.step()  # updates were all skipped (torch warns about that)
        self.backend.sync_weights(c.policy)
        m.update(self.backend.metrics())
        self.step = step
        return self._finish_metrics(m, episodes, timer)

    def _rollout(self, step: int) -> list[Episode]:
        cfg = self.cfg
        tasks = self.c.source.tasks("train", cfg.rollout.tasks_per_step, seed=self._task_seed(step))
        n = cfg.rollout.tasks_per_step * cfg.rollout.group_size
        self._rollout_times = RolloutTimes()  # read by _finish_metrics (time/generation, time/env)
        request = RolloutRequest(
            tasks,
            group_size=cfg.rollout.group_size,
            params=self.c.loop_params,
            step=step,
            first_group_id=step * cfg.rollout.tasks_per_step,
            first_episode_id=step * n,
        )
        return self.backend.rollout(
            request, stage_generator(cfg.trainer.seed, step, _SAMPLING), self._rollout_times
        )

    def _fuses_old_logprobs(self, samples: Sequence[Sample], settings: UpdateSettings) -> bool:
        """Whether the update of ``samples`` can take the current policy's old log-probs from its
        own forward pass instead of a separate pass: it is one optimizer step, so that pass sees
        the same policy on the same tokens (:mod:`spear.update`). Filtered samples, which no
        update or replay reads, then keep the sampler's log-probs."""
        return self.backend.fuses_old_logprobs and single_step(settings, len(_trainable(samples)))

    def _reference_logprobs(self, samples: Sequence[Sample]) -> Tensor | None:
        """The reference policy's log-probs ``[N, T]`` on the batch that :meth:`_update` collates
        from ``samples`` (None if nothing is trainable)."""
        trainable = _trainable(samples)
        if not trainable:
            return None
        if self.c.reference is None:
            raise RuntimeError("loss.kl_coef > 0 but the run has no reference policy")
        batch = TokenBatch.collate(trainable, pad_id=self.c.policy.tokenizer.pad_token_id)
        return self.c.reference.logprobs(
            batch,
            micro_batch_size=self.cfg.optim.micro_batch_size,
            temperature=self.c.update.temperature,
        )

    def _update(
        self,
        samples: Sequence[Sample],
        settings: UpdateSettings,
        stage: int,
        step: int,
        *,
        scale: float,
        prefix: str,
        fused_old: bool = False,
        ref_logprobs: Tensor | None = None,
    ) -> dict[str, Tensor | float]:
        trainable = _trainable(samples)
        if not trainable:
            return {f"{prefix}/optimizer_steps": 0.0}
        batch = TokenBatch.collate(trainable, pad_id=self.c.policy.tokenizer.pad_token_id)
        res = self.backend.update(
            self.c.policy,
            batch,
            settings,
            stage_generator(self.cfg.trainer.seed, step, stage),
            loss_scale=scale,
            old_from_forward=fused_old,
            ref_logprobs=ref_logprobs,
        )
        if res.old_logprobs is not None:  # the behaviour log-probs the replay buffer keeps
            set_behavior_logprobs(trainable, res.old_logprobs)
        self.nonfinite_streak = self.nonfinite_streak + 1 if res.skipped_steps else 0
        if res.skipped_steps:
            log.warning(
                "step %d: skipped %d %s update(s) with a non-finite loss or gradient",
                step,
                res.skipped_steps,
                prefix,
            )
        if self.nonfinite_streak >= self.cfg.trainer.max_nonfinite_skips:
            raise FloatingPointError(
                f"{self.nonfinite_streak} consecutive updates had non-finite losses; lower optim.lr"
            )
        out: dict[str, Tensor | float] = {f"{prefix}/{k}": v for k, v in res.metrics.items()}
        out[f"{prefix}/optimizer_steps"] = float(res.optimizer_steps)
        out[f"{prefix}/skipped_nonfinite"] = float(res.skipped_steps)
        return out

    def _self_imitation(self, step: int) -> dict[str, Tensor | float]:
        c = self.c
        if c.buffer is None:
            return {}
        weight = c.sil_weight(step)
        out: dict[str, Tensor | float] = {"replay/sil_weight": weight}
        if not c.buffer.ready(step):
            return out
        replay: ReplayBatch = c.buffer.consume(step)
        out.update({f"replay/{k}": v for k, v in replay.stats_metrics().items()})
        if replay.samples and weight > 0:
            recompute = self.cfg.replay.recompute_old_logprobs
            fused = recompute and self._fuses_old_logprobs(replay.samples, c.replay_update)
            if recompute and not fused:
                fill_old_logprobs(c.policy, replay.samples, self.cfg)
            out.update(
                self._update(
                    replay.samples,
                    c.replay_update,
                    _REPLAY_UPDATE,
                    step,
                    scale=weight,
                    prefix="replay",
                    fused_old=fused,
                )
            )
        return out

    def _finish_metrics(
        self, m: dict, episodes: Sequence[Episode], timer: StageTimer
    ) -> dict[str, float]:
        out = sync_metrics(m)
        out.update(episode_metrics(episodes, "train"))
        out.update(timer.seconds)
        total = sum(timer.seconds.values())
        out["time/step"] = total
        rt: RolloutTimes = getattr(self, "_rollout_times", RolloutTimes())  # parts of time/rollout
        out["time/generation"], out["time/env"] = rt.generation_s, rt.env_s
        out["time/rollout_other"] = out.get("time/rollout", 0.0) - rt.generation_s - rt.env_s
        tokens = sum(s.num_tokens for e in episodes for s in e.samples)
        out["throughput/tokens_per_s"] = tokens / total if total > 0 else 0.0
        out["lr"] = float(self.c.policy.scheduler.get_last_lr()[0])
        return out

    def _task_seed(self, step: int) -> int:
        return (self.cfg.trainer.seed * 7_919 + step) % (2**31 - 1)

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Success on the fixed tasks of ``eval.split`` (held out by default; the same tasks every
        time), greedy; with ``eval.samples`` also pass@k and mean@n of that many sampled episodes
        per task."""
        c, cfg = self.c, self.cfg
        request = self._eval_request()
        out = episode_metrics(self._greedy_episodes(request), "eval")
        if cfg.eval.samples:  # n sampled episodes per task: pass@k and mean@n
            sampled = replace(request, group_size=cfg.eval.samples, params=c.sample_loop_params)
            gen = stage_generator(cfg.trainer.seed, 0, _EVAL_SAMPLES)
            runs = self.backend.rollout(sampled, gen)
            out.update(sampled_metrics(runs, cfg.eval.samples, cfg.eval.ks, "eval"))
        return out

    def eval_episodes(self) -> tuple[list[Task], list[Episode]]:
        """The fixed tasks of ``eval.split`` and their greedy episodes, one each, in task order,
        before they are reduced to metrics (for failure analyses)."""
        request = self._eval_request()
        return list(request.tasks), self._greedy_episodes(request)

    def _greedy_episodes(self, request: RolloutRequest) -> list[Episode]:
        return self.backend.rollout(request, stage_generator(self.cfg.trainer.seed, 0, _EVAL))

    def _eval_request(self) -> RolloutRequest:
        cfg = self.cfg
        return RolloutRequest(
            self.c.source.tasks(cfg.eval.split, cfg.eval.num_tasks, seed=cfg.trainer.seed),
            group_size=1,
            params=self.c.eval_loop_params,
            step=self.step,
            first_group_id=0,
            first_episode_id=0,
        )

    # ------------------------------------------------------------------------------ fit
    def fit(
        self, on_step: Callable[[int, dict[str, float]], None] | None = None
    ) -> dict[str, float]:
        """Train ``trainer.steps`` steps with periodic evaluation and checkpoints.

        Ctrl-C (:mod:`spear.interrupts`): the first finishes the step in flight and saves it; a
        second stops at once and the step in flight is discarded, or, when only its evaluation
        was running, saved with the evaluation pending. Either way :class:`TrainingInterrupted`
        says what was kept, and every checkpoint holds one step boundary of an uninterrupted run.

        ``on_step(step, metrics)`` is called after every step, and with step 0 and the held-out
        metrics after the evaluation before training (a run that starts at step 0).
        """
        last: dict[str, float] = {}
        with finish_step_on_sigint() as stop:
            if self.step == 0 and not self._has_row0:
                last = self._step0_eval()
                if on_step is not None:
                    on_step(0, last)
            if self._pending_row is not None:  # restored from a checkpoint whose eval was cut
                last = self._complete_step(self._pending_row, on_step)
                self._pending_row = None
            while self.step < self.cfg.trainer.steps and not stop.requested:
                last = self._one_step(on_step)
            if stop.requested and self.step < self.cfg.trainer.steps:
                raise TrainingInterrupted(self._save_on_stop())
            try:
                self._save_once()
            except KeyboardInterrupt:
                raise TrainingInterrupted(self._resume_point("the final checkpoint")) from None
        return last

    def _step0_eval(self) -> dict[str, float]:
        try:
            m = self.evaluate()
            self.logger.write(0, m)
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                "interrupted in the step-0 evaluation: no checkpoint was written; a resume "
                "starts with that evaluation"
            ) from None
        self._has_row0 = True
        return m

    def _one_step(
        self, on_step: Callable[[int, dict[str, float]], None] | None
    ) -> dict[str, float]:
        step = self.step + 1
        try:
            train = self.train_step()
        except KeyboardInterrupt:  # the weights, optimizer or buffer may hold half of the step
            raise TrainingInterrupted(self._resume_point(f"step {step}")) from None
        return self._complete_step(train, on_step)

    def _complete_step(
        self, train: dict[str, float], on_step: Callable[[int, dict[str, float]], None] | None
    ) -> dict[str, float]:
        """The evaluation, the metrics row and the periodic checkpoint of the step just trained."""
        cfg, step = self.cfg, self.step
        try:
            due = step == cfg.trainer.steps or (cfg.eval.every and step % cfg.eval.every == 0)
            metrics = {**train, **(self.evaluate() if due else {})}
            self.logger.write(step, metrics)
        except KeyboardInterrupt:  # the step's training is whole: keep it, redo the evaluation
            path = self.save(pending_row=train)
            raise TrainingInterrupted(
                f"interrupted in the evaluation of step {step}: checkpoint {path.name} holds the "
                "trained step; a resume evaluates it again and writes its row"
            ) from None
        try:
            if on_step is not None:
                on_step(step, metrics)
        except KeyboardInterrupt:
            raise TrainingInterrupted(self._save_on_stop()) from None
        if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
            try:
                self._save_once()
            except KeyboardInterrupt:
                what = f"the checkpoint of step {step}"
                raise TrainingInterrupted(self._resume_point(what)) from None
        return metrics

    def _save_once(self) -> None:
        """Save the current step boundary unless that very state is the latest checkpoint."""
        if self._latest != (self.step, False):
            self.save()

    def _save_on_stop(self) -> str:
        try:
            self._save_once()
        except KeyboardInterrupt:
            return self._resume_point(f"the checkpoint of step {self.step}")
        return f"stopped after step {self.step}: checkpoint step_{self.step:06d} written"

    def _resume_point(self, what: str) -> str:
        """What was lost when ``what`` was cut off, and where a resume starts."""
        if self._latest is None:
            return (
                f"interrupted in {what}, which was discarded; no checkpoint was written yet, so a "
                "resume starts again after the step-0 evaluation"
            )
        step, pending = self._latest
        redo = (
            f"step {step}'s evaluation is run again"
            if pending
            else f"steps after {step} are trained again"
        )
        return (
            f"interrupted in {what}, which was discarded; a resume continues from checkpoint "
            f"step_{step:06d} ({redo})"
        )

    # ------------------------------------------------------------------------------ state
    def save(self, *, pending_row: dict[str, float] | None = None) -> Path:
        """Checkpoint the current step boundary; ``pending_row``: the step's training metrics
        when its evaluation and metrics row are still to do (a resume does them)."""
        c = self.c
        state = TrainerState(
            step=self.step,
            optimizer=c.policy.optimizer.state_dict(),
            scheduler=c.policy.scheduler.state_dict(),
            replay=c.buffer.state_dict() if c.buffer is not None else None,
            rng=capture_rng(),
            extra={"nonfinite_streak": self.nonfinite_streak, "pending_row": pending_row},
        )
        path = save_checkpoint(self.run_dir, c.policy.model, c.policy.tokenizer, state)
        self._latest = (self.step, pending_row is not None)
        return path

    def _restore(self, ckpt: Path) -> None:
        c = self.c
        load_model_weights(c.policy.model, ckpt / "model")
        state = load_trainer_state(ckpt)
        c.policy.optimizer.load_state_dict(state.optimizer)
        c.policy.scheduler.load_state_dict(state.scheduler)
        if c.buffer is not None and state.replay is not None:
            c.buffer.load_state_dict(state.replay)
        restore_rng(state.rng)
        self.step = state.step
        self.nonfinite_streak = int(state.extra.get("nonfinite_streak", 0))
        self._pending_row = state.extra.get("pending_row")
        self._latest = (self.step, self._pending_row is not None)
        log.info("resumed from %s (step %d)", ckpt, self.step)
        if self._pending_row is not None:
            log.info("step %d's evaluation was interrupted: it runs again first", self.step)

    def close(self) -> None:
        self.backend.close()
        self.logger.close()
