"""Turn a :class:`~spear.config.Config` into the objects a run needs (the only place that maps
config fields onto the parameters of the pure functions and classes)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spear.algo.losses import PolicyLossParams
from spear.config import Config
from spear.envs.base import Env, TaskSource
from spear.filters import RESPONSE_FILTERS, ResponseFilterParams
from spear.policy import Policy, apply_lora, build_optimizer, load_pretrained, resolve_device
from spear.reference import ReferencePolicy, build_reference
from spear.replay import ReplayBuffer, ReplayParams
from spear.rewards import ToolBonus
from spear.rollout.engine import HFEngine, SamplingParams
from spear.rollout.loop import LoopParams
from spear.schedules import Schedule, schedule_from_spec
from spear.tasks import TASKS, build_task, env_factory
from spear.update import UpdateSettings

log = logging.getLogger(__name__)

TASK_SOURCES = TASKS  # the task registry (spear.tasks); register with spear.tasks.register_task


@dataclass
class Components:
    policy: Policy
    engine: HFEngine
    source: TaskSource
    make_env: Callable[[], Env]  # what env workers call (spear.tasks.env_factory)
    buffer: ReplayBuffer | None
    tool_bonus: ToolBonus
    sil_weight: Schedule
    response_filters: ResponseFilterParams
    update: UpdateSettings
    replay_update: UpdateSettings
    loop_params: LoopParams
    eval_loop_params: LoopParams
    sample_loop_params: LoopParams  # eval.samples episodes per held-out task (pass@k)
    reference: ReferencePolicy | None = None  # the KL loss's frozen policy (loss.kl_coef > 0)


def model_dir(cfg: Config, source: TaskSource | None = None) -> str:
    """Where the policy's initial weights load from: ``model.path``, or the built-in model's
    warm-started cache directory (built on first use from the demonstrations of the task,
    ``source`` or the one ``task.name`` names)."""
    if cfg.model.path is not None:
        return cfg.model.path
    from spear.models.warmstart import WarmStartParams, ensure_warm_model

    warm = WarmStartParams.from_config(cfg, source)
    return str(
        ensure_warm_model(Path(cfg.model.cache_dir).expanduser(), warm, cfg.model.warm_start.seed)
    )


def describe_model(cfg: Config, source: TaskSource | None = None) -> str:
    """What preparing the run's model will do, for the display: load ``model.path``, load the
    shipped or cached warm model, or build it (the first run with these settings)."""
    if cfg.model.path is not None:
        return f"loading {cfg.model.path} and preparing the task"
    from spear.models.warmstart import SHIPPED_DIR, WarmStartParams, find_warm_model

    warm = WarmStartParams.from_config(cfg, source)
    found = find_warm_model(Path(cfg.model.cache_dir), warm, cfg.model.warm_start.seed)
    if found is None:
        return (
            f"building the warm model (first run with these model settings: tokenizer, tiny "
            f"model, {warm.steps} warm-start steps; cached afterwards)"
        )
    where = "shipped" if found.parent == SHIPPED_DIR else "cached"
    return f"loading the {where} warm model and preparing the task"


def build_policy(cfg: Config, source: TaskSource | None = None) -> Policy:
    device = resolve_device(cfg.trainer.device)
    tokenizer_path = cfg.model.tokenizer_path if cfg.model.path is not None else None
    model, tok = load_pretrained(model_dir(cfg, source), tokenizer_path, cfg.model.dtype)
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # type: ignore[operator]
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt, sched = build_optimizer(trainable, cfg.optim, cfg.trainer.steps)
    return Policy(
        model=model,
        tokenizer=tok,
        device=device,
        optimizer=opt,
        scheduler=sched,
        share_prefix=cfg.optim.share_prefix,
    )


def _loss_params(cfg: Config, *, replay: bool) -> PolicyLossParams:
    lc, rc = cfg.loss, cfg.replay
    return PolicyLossParams(
        clip_low=lc.clip_low,
        clip_high=lc.clip_high,
        clip_c=lc.clip_c,
        cov_ratio=rc.clip_cov_ratio if replay else lc.clip_cov_ratio,
        cov_lb=rc.clip_cov_lb if replay else lc.clip_cov_lb,
        cov_ub=rc.clip_cov_ub if replay else lc.clip_cov_ub,
        kl_cov_ratio=rc.kl_cov_ratio if replay else lc.kl_cov_ratio,
        kl_cov_coef=lc.kl_cov_coef,
    )


def update_settings(cfg: Config, *, replay: bool) -> UpdateSettings:
    n = cfg.rollout.tasks_per_step * cfg.rollout.group_size
    mini = cfg.optim.mini_batch_size or (cfg.replay_sample_size if replay else n)
    return UpdateSettings(
        policy_loss=(cfg.replay.policy_loss or cfg.loss.policy_loss)
        if replay
        else cfg.loss.policy_loss,
        loss_params=_loss_params(cfg, replay=replay),
        aggregation=cfg.loss.aggregation,
        max_response_len=cfg.dr_grpo_len,
        entropy_coef=cfg.loss.entropy_coef,
        kl_coef=0.0 if replay else cfg.loss.kl_coef,  # the reference applies no KL to replay data
        kl_type=cfg.loss.kl_type,
        epochs=cfg.optim.ppo_epochs,
        mini_batch_size=mini,
        micro_batch_size=cfg.optim.micro_batch_size,
        grad_clip=cfg.optim.grad_clip,
        temperature=cfg.rollout.temperature,
    )


def loop_params(cfg: Config, *, evaluation: bool, sampled: bool = False) -> LoopParams:
    """The agent loop's settings for training rollouts, or (``evaluation``) for held-out
    episodes: greedy at ``eval.temperature``, or with ``sampled`` at ``eval.sample_temperature``
    (pass@k); evaluation never truncates the distribution (top_p 1, no top_k)."""
    ro = cfg.rollout
    if evaluation:
        temperature = cfg.eval.sample_temperature if sampled else cfg.eval.temperature
    else:
        temperature = ro.temperature
    return LoopParams(
        max_turns=ro.max_turns,
        max_response_tokens=ro.max_response_tokens,
        max_context_tokens=ro.max_context_tokens,
        layout=ro.layout,
        history_length=ro.history_length,
        sampling=SamplingParams(
            temperature=temperature,
            top_p=1.0 if evaluation else ro.top_p,
            top_k=None if evaluation or ro.top_k == 0 else ro.top_k,
            max_new_tokens=ro.max_new_tokens,
            stop_token_ids=None,
            stop_strings=None,
        ),
        env_step_timeout_s=ro.env_step_timeout_s,
    )


def replay_params(cfg: Config) -> ReplayParams:
    r = cfg.replay
    return ReplayParams(
        capacity=r.capacity,
        history_size=r.history_size,
        tolerate_steps=r.tolerate_steps,
        trigger_ratio=r.trigger_ratio,
        sample_size=cfg.replay_sample_size,
        sampling=r.sampling,
        recalibration=r.recalibration,
        normalize_by_std=r.normalize_by_std,
        std_eps=r.std_eps,
        keep=r.keep,
        decay_weight=r.decay_weight,
        consume=r.consume,
        staleness=r.staleness,
    )


def tool_bonus(cfg: Config) -> ToolBonus:
    tb = cfg.reward.tool_bonus
    phi = {
        "none": {"kind": "constant", "value": 0.0},
        "constant": {"kind": "constant", "value": 1.0},
        "cosine": {"kind": "cosine_down", "value": 1.0, "horizon": tb.horizon},
    }[tb.mode]
    return ToolBonus(alpha=tb.alpha, cap=tb.cap, schedule=schedule_from_spec(phi), count=tb.count)


def response_filter_params(cfg: Config) -> ResponseFilterParams:
    f = cfg.filters
    enabled = tuple(name for name in RESPONSE_FILTERS.names() if getattr(f, name))
    return ResponseFilterParams(enabled=enabled, ngram=f.ngram, ngram_repeats=f.ngram_repeats)


def check_eval_split(cfg: Config, source: TaskSource) -> None:
    """An ``eval.split`` the task does not have is a config error (before any model is built)."""
    from spear.config import ConfigError

    try:
        source.tasks(cfg.eval.split, 1, seed=cfg.trainer.seed)
    except ValueError as e:
        raise ConfigError(f"eval.split={cfg.eval.split}: {e}") from None


def build_components(cfg: Config, task: TaskSource | None = None) -> Components:
    """Everything a run needs; ``task`` replaces the source ``task.name`` names (a task passed in
    Python, ``Trainer(cfg, run_dir, task=...)``)."""
    source = task if task is not None else build_task(cfg)
    check_eval_split(cfg, source)
    policy = build_policy(cfg, source)
    engine = HFEngine(
        policy.model,
        policy.tokenizer,
        device=policy.device,
        keep_turns=cfg.rollout.keep_kv_cache,
    )
    return Components(
        policy=policy,
        engine=engine,
        source=source,
        make_env=env_factory(cfg, source, given=task is not None),
        buffer=ReplayBuffer(replay_params(cfg), seed=cfg.trainer.seed)
        if cfg.replay.enabled
        else None,
        tool_bonus=tool_bonus(cfg),
        sil_weight=schedule_from_spec(cfg.replay.loss_coef),
        response_filters=response_filter_params(cfg),
        update=update_settings(cfg, replay=False),
        replay_update=update_settings(cfg, replay=True),
        loop_params=loop_params(cfg, evaluation=False),
        eval_loop_params=loop_params(cfg, evaluation=True),
        sample_loop_params=loop_params(cfg, evaluation=True, sampled=True),
        reference=build_reference(
            policy, kl_coef=cfg.loss.kl_coef, lora=cfg.model.lora.enabled
        ),  # from the initial weights: built before a resumed run restores its checkpoint
    )
