"""The multi-turn agent loop: B tasks x G rollouts played in lockstep, one batched generation
per turn, environments stepped concurrently.

Per turn: every active episode's prompt is built (episode layout: its growing token list; turn
layout: a prompt re-rendered from task, recent history and current observation, see
:mod:`spear.rollout.layout`), all prompts are generated in one engine call, the responses are
handed to the envs in a thread pool (each call under ``env_step_timeout_s``), and the observation
tokens are appended with loss mask 0. An episode ends when its env terminates (``ANSWER`` if the
env reports a final answer, else ``TERMINATED``; a truncated env also ends ``TERMINATED``), after
``max_turns`` turns, when its total response tokens reach ``max_response_tokens``, when the next
prompt (plus at least one new token) would not fit ``max_context_tokens`` (``CONTEXT``; the
observation that would overflow is not appended), or when ``make_env`` / ``reset`` / ``step``
raises or times out (``ENV_ERROR``: failed, the error text in ``Episode.info["env_error"]``; a
hung env is abandoned, never closed).

Bad model output never raises: empty generations, undecodable ids and overlong contexts end or
continue episodes as described. Envs are reset with ``seed = group_id`` so the G rollouts of a
task face the same instance.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from spear.envs.base import Env, StepResult, Task, Tool, tool_schema
from spear.rollout.engine import Generation, KeepsTurns, RolloutEngine, SamplingParams
from spear.rollout.layout import (
    LAYOUTS,
    ChatFormat,
    Layout,
    TokenTrack,
    TurnContext,
    TurnPromptFormatter,
    TurnRecord,
    history_turn_prompt,
    message_text,
    turn_sample,
)
from spear.types import EndReason, Episode, Message, Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoopParams:
    """Limits and layout of the agent loop (defaults live in ``spear.config``).

    ``max_response_tokens``: total sampled tokens per episode over all turns.
    ``max_context_tokens``: longest token sequence one generation may see (prompt + new tokens).
    ``history_length``: (observation, action) pairs a turn-layout prompt shows.
    ``sampling.stop_token_ids`` None = the chat template's end-of-turn token and eos.
    """

    max_turns: int
    max_response_tokens: int
    max_context_tokens: int
    layout: Layout
    history_length: int
    sampling: SamplingParams
    env_step_timeout_s: float

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_response_tokens", "max_context_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoopParams.{name} must be >= 1, got {getattr(self, name)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"LoopParams.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.history_length < 0:
            raise ValueError(f"LoopParams.history_length must be >= 0, got {self.history_length}")
        if not (math.isfinite(self.env_step_timeout_s) and self.env_step_timeout_s > 0):
            raise ValueError(
                f"LoopParams.env_step_timeout_s must be > 0, got {self.env_step_timeout_s}"
            )


@dataclass(slots=True)
class RolloutTimes:
    """Wall seconds a rollout spent in the engine and in env calls (accumulated, host clock).

    ``env_s`` covers make_env / reset / step / close; the rest of a rollout (prompt rendering,
    observation tokens, bookkeeping) is the caller's total minus both.
    """

    generation_s: float = 0.0
    env_s: float = 0.0


@dataclass(frozen=True, slots=True)
class _Pending:
    ids: list[int]
    logprobs: list[float]
    closing: list[int]  # end-of-turn marker appended with mask 0 (empty if sampled)
    anchor: str  # the observation the turn's prompt showed


@dataclass(slots=True)
class _Run:
    """Mutable state of one episode while the loop runs."""

    task: Task
    group_id: int
    episode_id: int
    env: Env | None = None
    first: tuple[Message, ...] = ()
    conversation: list[Message] = field(default_factory=list)  # episode layout
    track: TokenTrack = field(default_factory=TokenTrack)  # episode layout
    observation: tuple[Message, ...] = ()  # turn layout: the current observation
    anchor: str = ""
    history: list[TurnRecord] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)  # turn layout
    prompt: list[int] = field(default_factory=list)  # this turn's prompt ids
    pending: _Pending | None = None  # turn layout: the generated turn awaiting its env reward
    turns: int = 0
    response_tokens: int = 0
    tool_calls: int = 0
    invalid: int = 0
    invalid_actions: int = 0
    tool_errors: int = 0
    reward: float = 0.0
    penalty: float = 0.0  # sum of the turns' info["penalty"] (not part of ``reward``)
    success: bool = False
    final_answer: str | None = None
    response_text: str = ""
    end: EndReason | None = None
    hung: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def fail(self, what: str, error: str, *, hung: bool = False) -> None:
        self.end, self.success, self.hung = EndReason.ENV_ERROR, False, self.hung or hung
        self.info["env_error"] = f"{what}: {error}"
        log.warning(
            "episode %d (task %s) ended by an env error in %s: %s",
            self.episode_id,
            self.task.task_id,
            what,
            error,
        )


@dataclass(frozen=True, slots=True)
class _Outcome:
    value: Any = None
    error: str | None = None
    hung: bool = False


def _call_all(
    pool: Executor, calls: Sequence[Callable[[], Any]], timeout_s: float
) -> list[_Outcome]:
    """Run ``calls`` concurrently; each gets ``timeout_s`` from submission. Never raises."""
    futures = [pool.submit(c) for c in calls]
    _, not_done = wait(futures, timeout=timeout_s)
    out = []
    for f in futures:
        if f in not_done:
            f.cancel()
            out.append(_Outcome(error=f"timed out after {timeout_s:g}s", hung=True))
        elif (exc := f.exception()) is not None:
            out.append(_Outcome(error=f"{type(exc).__name__}: {exc}"))
        else:
            out.append(_Outcome(value=f.result()))
    return out


def _count(info: dict[str, Any], key: str) -> int:
    value = info.get(key, 0)
    if isinstance(value, bool):
        return int(value)
    return int(value) if isinstance(value, int | float) and math.isfinite(value) else 0


def _final_answer(info: dict[str, Any]) -> tuple[bool, str | None]:
    """Whether ``info`` reports a final-answer turn, and the answer's text when it is a string.

    A ``final_answer`` of None means the turn was the final answer but no answer could be
    extracted from it: the episode ends ``ANSWER`` with ``final_answer`` None, which the
    ``incomplete`` filter removes.
    """
    if "final_answer" not in info:
        return False, None
    value = info["final_answer"]
    if isinstance(value, str):
        return True, value
    return value is None or (bool(value) and isinstance(value, bool | int | float)), None


# ----------------------------------------------------------------------------------------------
# Stages of one turn


def _reset_all(
    runs: list[_Run], make_env: Callable[[], Env], pool: Executor, timeout_s: float
) -> None:
    for r in runs:
        try:
            r.env = make_env()
        except Exception as exc:
            r.fail("make_env", f"{type(exc).__name__}: {exc}")
    ready = [r for r in runs if r.env is not None]

    def reset(r: _Run) -> Callable[[], Any]:
        env = r.env
        assert env is not None
        return lambda: env.reset(r.task, seed=r.group_id)

    for r, res in zip(ready, _call_all(pool, [reset(r) for r in ready], timeout_s)):
        if res.error is not None:
            r.fail("reset", res.error, hung=res.hung)
            continue
        try:
            messages, info = res.value
            r.first = tuple(messages)
            non_system = [m for m in r.first if m.get("role") != "system"]
        except (TypeError, ValueError, AttributeError) as exc:
            r.fail("reset", f"expected (messages, info), got {type(res.value).__name__}: {exc}")
            continue
        r.conversation = list(r.first)
        r.observation = r.first
        r.anchor = _anchor(info if isinstance(info, dict) else {}, non_system)


def _anchor(info: dict[str, Any], messages: Sequence[Message]) -> str:
    anchor = info.get("anchor")
    return anchor if isinstance(anchor, str) else message_text(messages)


def _prepare(
    runs: list[_Run], fmt: ChatFormat, params: LoopParams, formatter: TurnPromptFormatter
) -> list[tuple[_Run, int]]:
    """Build each active run's prompt; return (run, new-token budget) for runs that can go on."""
    ready = []
    for r in runs:
        try:
            if params.layout == "episode":
                if r.turns == 0:
                    r.track.add_context(fmt.prompt_ids(r.first))
                r.prompt = list(r.track.ids)
            else:
                ctx = TurnContext(
                    task=r.task,
                    first_messages=r.first,
                    history=tuple(
                        r.history[-params.history_length :] if params.history_length else ()
                    ),
                    observation=r.observation,
                    turn_index=r.turns,
                )
                r.prompt = fmt.prompt_ids(formatter(ctx))
        except Exception as exc:  # a template or formatter that cannot render this episode
            r.fail("render", f"{type(exc).__name__}: {exc}")
            continue
        left_response = params.max_response_tokens - r.response_tokens
        left_context = params.max_context_tokens - len(r.prompt) - len(fmt.eot_ids)
        budget = min(params.sampling.max_new_tokens, left_response, left_context)
        if budget >= 1:
            ready.append((r, budget))
        else:
            r.end = EndReason.MAX_TOKENS if left_response < 1 else EndReason.CONTEXT
    return ready


def _apply_generation(r: _Run, gen: Generation, fmt: ChatFormat, params: LoopParams) -> None:
    ids, lps = list(gen.token_ids), list(gen.logprobs)
    if len(ids) != len(lps):
        raise RuntimeError(f"engine returned {len(ids)} ids but {len(lps)} log-probs")
    closing = [] if fmt.ends_turn(ids) else list(fmt.eot_ids)
    stop_ids = params.sampling.stop_token_ids or ()
    r.response_text = fmt.response_text(ids, stop_ids)
    r.response_tokens += len(ids)
    r.turns += 1
    if params.layout == "episode":
        r.track.add_sampled(ids, lps)
        r.track.add_context(closing)
        r.conversation.append({"role": "assistant", "content": r.response_text})
    else:
        r.pending = _Pending(ids, lps, closing, r.anchor)


def _penalty(info: dict[str, Any]) -> float:
    """The turn's ``info["penalty"]`` (0 if absent); a negative or non-finite one raises."""
    value = info.get("penalty", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"info['penalty'] must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"info['penalty'] must be finite and >= 0, got {value}")
    return float(value)


def _record_step(
    r: _Run, res: StepResult, fmt: ChatFormat, params: LoopParams
) -> tuple[float, float]:
    """Fold one step result into the run; return the turn's env reward and penalty."""
    info = res.info if isinstance(res.info, dict) else {}
    reward = float(res.reward)
    if not math.isfinite(reward):
        r.fail("step", f"non-finite reward {reward}")
        return 0.0, 0.0
    penalty = _penalty(info)
    r.reward += reward
    r.penalty += penalty
    r.tool_calls += _count(info, "tool_calls")
    r.invalid += _count(info, "invalid_tool_calls")
    if info.get("invalid_action"):  # a text game's missing or inadmissible action
        r.invalid_actions += 1
        r.info.setdefault("invalid_turns", []).append(r.turns - 1)
    r.tool_errors += _count(info, "tool_errors")
    r.success = bool(info.get("success", False))
    terms = info.get("reward_terms")
    if isinstance(terms, dict):  # the named parts of a task's reward (FunctionTask), logged
        r.info["reward_terms"] = {
            str(k): float(v) for k, v in terms.items() if isinstance(v, int | float)
        }
    has_answer, answer = _final_answer(info)
    r.final_answer = answer if has_answer else r.final_answer
    if info.get("answer_check_bounded"):  # the answer's check hit its time or memory bound
        r.info["answer_check_bounded"] = True
    if info.get("env_error"):  # an env wrapper (worker pool) that reports its crash in info
        r.fail("step", str(info["env_error"]))
    elif res.terminated or res.truncated:
        r.end = EndReason.ANSWER if has_answer else EndReason.TERMINATED
        r.info["truncated"] = bool(res.truncated and not res.terminated)
    elif r.turns >= params.max_turns:
        r.end = EndReason.MAX_TURNS
    elif r.response_tokens >= params.max_response_tokens:
        r.end = EndReason.MAX_TOKENS
    else:
        _observe(r, list(res.messages), info, fmt, params)
    return reward, penalty


def _observe(
    r: _Run, obs: list[Message], info: dict[str, Any], fmt: ChatFormat, params: LoopParams
) -> None:
    """Make ``obs`` the next observation (appending its tokens in the episode layout)."""
    if params.layout == "turn":
        r.history.append(TurnRecord(observation=r.anchor, action=r.response_text))
        r.observation = tuple(obs)
        r.anchor = _anchor(info, obs)
        return
    delta = fmt.observation_ids(r.conversation, obs)
    if not delta.exact:
        r.info["inexact_observation_tokens"] = r.info.get("inexact_observation_tokens", 0) + 1
    if len(r.track) + len(delta.ids) + len(fmt.eot_ids) + 1 > params.max_context_tokens:
        r.end = EndReason.CONTEXT
        return
    r.track.add_context(delta.ids)
    r.conversation.extend(obs)


def _step_all(
    batch: list[_Run],
    fmt: ChatFormat,
    params: LoopParams,
    pool: Executor,
    step: int,
    times: RolloutTimes,
) -> None:
    def call(r: _Run) -> Callable[[], StepResult]:
        env, text = r.env, r.response_text
        assert env is not None
        return lambda: env.step(text)

    t0 = time.perf_counter()
    outcomes = _call_all(pool, [call(r) for r in batch], params.env_step_timeout_s)
    times.env_s += time.perf_counter() - t0
    for r, res in zip(batch, outcomes):
        reward = penalty = 0.0
        if res.error is not None:
            r.fail("step", res.error, hung=res.hung)
        else:
            try:
                reward, penalty = _record_step(r, res.value, fmt, params)
            except Exception as exc:  # malformed StepResult or unrenderable observation
                r.fail("observation", f"{type(exc).__name__}: {exc}")
        if r.pending is not None:
            p, r.pending = r.pending, None
            r.samples.append(
                turn_sample(
                    r.prompt,
                    p.ids,
                    p.logprobs,
                    p.closing,
                    group_id=r.group_id,
                    episode_id=r.episode_id,
                    step=step,
                    turn_index=r.turns - 1,
                    anchor=p.anchor,
                    reward=reward,
                    penalty=penalty,
                )
            )


def _close_all(runs: list[_Run], pool: Executor, timeout_s: float) -> None:
    closable = [r for r in runs if r.env is not None and not r.hung]
    calls = [(lambda env=r.env: env.close()) for r in closable]
    for r, res in zip(closable, _call_all(pool, calls, timeout_s)):
        if res.error is not None:
            log.warning("closing the env of episode %d failed: %s", r.episode_id, res.error)


def _episode(r: _Run, params: LoopParams, step: int) -> Episode:
    samples = r.samples
    if params.layout == "episode" and r.turns > 0:
        samples = [
            r.track.to_sample(group_id=r.group_id, episode_id=r.episode_id, step=step, turn_index=0)
        ]
        samples[0].turn_penalty = r.penalty  # the one sample holds every turn
    return Episode(
        task_id=r.task.task_id,
        group_id=r.group_id,
        episode_id=r.episode_id,
        samples=samples,
        end_reason=r.end or EndReason.MAX_TURNS,
        outcome_reward=r.reward,
        success=r.success and r.end is not EndReason.ENV_ERROR,
        num_turns=r.turns,
        num_tool_calls=r.tool_calls,
        num_invalid_tool_calls=r.invalid,
        num_invalid_actions=r.invalid_actions,
        num_tool_errors=r.tool_errors,
        response_text=r.response_text,
        final_answer=r.final_answer,
        info=r.info,
    )


# ----------------------------------------------------------------------------------------------
# Public entry points


def run_episodes(
    engine: RolloutEngine,
    tokenizer: Any,
    make_env: Callable[[], Env],
    tasks: Sequence[Task],
    *,
    group_size: int,
    params: LoopParams,
    step: int,
    first_group_id: int,
    first_episode_id: int,
    generator: torch.Generator | None = None,
    tools: Sequence[Tool] = (),
    executor: Executor | None = None,
    turn_prompt: TurnPromptFormatter | None = None,
    times: RolloutTimes | None = None,
) -> list[Episode]:
    """Play ``group_size`` episodes of every task; return them task-major (group by group).

    Task ``b`` gets ``group_id = first_group_id + b``; its g-th rollout
    ``episode_id = first_episode_id + b * group_size + g``. ``tools`` are rendered into the chat
    template. ``executor`` runs env calls (default: a private pool with one thread per episode;
    with a smaller pool a queued call's timeout still counts from submission). ``turn_prompt``
    (turn layout) defaults to the env's ``format_turn_prompt`` if it has one, else
    :func:`~spear.rollout.layout.history_turn_prompt`. ``times``, if given, accumulates the
    seconds spent generating and in env calls.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    fmt = ChatFormat(tokenizer, [tool_schema(t) for t in tools])
    if params.sampling.stop_token_ids is None:
        params = replace(
            params, sampling=replace(params.sampling, stop_token_ids=fmt.stop_token_ids())
        )
    runs = [
        _Run(task=t, group_id=first_group_id + b, episode_id=first_episode_id + b * group_size + g)
        for b, t in enumerate(tasks)
        for g in range(group_size)
    ]
    if not runs:
        return []
    pool = executor or ThreadPoolExecutor(max_workers=len(runs), thread_name_prefix="spear-env")
    times = times if times is not None else RolloutTimes()
    clock = time.perf_counter
    try:
        t0 = clock()
        _reset_all(runs, make_env, pool, params.env_step_timeout_s)
        times.env_s += clock() - t0
        formatter = turn_prompt or _env_formatter(runs) or history_turn_prompt
        while active := [r for r in runs if r.end is None]:
            batch = _prepare(active, fmt, params, formatter)
            if not batch:
                continue
            t0 = clock()
            gens = engine.generate(
                [r.prompt for r, _ in batch],
                params.sampling,
                generator=generator,
                max_new_tokens=[b for _, b in batch],
            )
            times.generation_s += clock() - t0
            if len(gens) != len(batch):
                raise RuntimeError(
                    f"engine returned {len(gens)} generations for {len(batch)} prompts"
                )
            for (r, _), gen in zip(batch, gens):
                _apply_generation(r, gen, fmt, params)
            _step_all([r for r, _ in batch], fmt, params, pool, step, times)
    finally:
        if isinstance(engine, KeepsTurns):
            engine.drop_kept_rows()
        t0 = clock()
        _close_all(runs, pool, params.env_step_timeout_s)
        if executor is None:
            pool.shutdown(wait=False, cancel_futures=True)
        times.env_s += clock() - t0
    return [_episode(r, params, step) for r in runs]


def _env_formatter(runs: list[_Run]) -> TurnPromptFormatter | None:
    for r in runs:
        fn = getattr(r.env, "format_turn_prompt", None)
        if callable(fn):
            return fn  # type: ignore[no-any-return]
    return None


@dataclass(frozen=True, slots=True)
class EvalSummary:
    """Means over a set of episodes (``end_reasons``: fraction of episodes per reason)."""

    num_episodes: int
    success_rate: float
    mean_reward: float
    mean_turns: float
    mean_tool_calls: float
    mean_invalid_tool_calls: float
    mean_response_tokens: float
    end_reasons: dict[str, float]

    def as_metrics(self, prefix: str) -> dict[str, float]:
        out = {
            f"{prefix}/episodes": float(self.num_episodes),
            f"{prefix}/success": self.success_rate,
            f"{prefix}/outcome_reward": self.mean_reward,
            f"{prefix}/turns": self.mean_turns,
            f"{prefix}/tool_calls": self.mean_tool_calls,
            f"{prefix}/invalid_tool_calls": self.mean_invalid_tool_calls,
            f"{prefix}/response_tokens": self.mean_response_tokens,
        }
        out.update({f"{prefix}/end_{k}": v for k, v in sorted(self.end_reasons.items())})
        return out


def summarize(episodes: Sequence[Episode]) -> EvalSummary:
    """Success rate and means of ``episodes`` (all zero for an empty list)."""
    n = len(episodes)

    def mean(values: Sequence[float]) -> float:
        return sum(values) / n if n else 0.0

    reasons: dict[str, float] = {}
    for e in episodes:
        reasons[e.end_reason.value] = reasons.get(e.end_reason.value, 0.0) + 1.0 / n
    return EvalSummary(
        num_episodes=n,
        success_rate=mean([float(e.success) for e in episodes]),
        mean_reward=mean([e.outcome_reward for e in episodes]),
        mean_turns=mean([float(e.num_turns) for e in episodes]),
        mean_tool_calls=mean([float(e.num_tool_calls) for e in episodes]),
        mean_invalid_tool_calls=mean([float(e.num_invalid_tool_calls) for e in episodes]),
        mean_response_tokens=mean(
            [float(sum(s.num_response_tokens for s in e.samples)) for e in episodes]
        ),
        end_reasons=reasons,
    )


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    make_env: Callable[[], Env],
    tasks: Sequence[Task],
    *,
    params: LoopParams,
    samples_per_task: int,
    generator: torch.Generator | None = None,
    tools: Sequence[Tool] = (),
    executor: Executor | None = None,
    turn_prompt: TurnPromptFormatter | None = None,
) -> EvalSummary:
    """Play held-out ``tasks`` (greedy when ``params.sampling.temperature == 0``) and summarise."""
    episodes = run_episodes(
        engine,
        tokenizer,
        make_env,
        tasks,
        group_size=samples_per_task,
        params=params,
        step=0,
        first_group_id=0,
        first_episode_id=0,
        generator=generator,
        tools=tools,
        executor=executor,
        turn_prompt=turn_prompt,
    )
    return summarize(episodes)
