"""The agent loop: token bookkeeping (no drift), both layouts, limits, failing envs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from spear.envs.base import Task, tool_schema
from spear.rollout.engine import Generation, HFEngine
from spear.rollout.layout import ChatFormat, observation_turn_prompt
from spear.rollout.loop import (
    EvalSummary,
    LoopParams,
    RolloutTimes,
    evaluate,
    run_episodes,
    summarize,
)
from spear.types import EndReason, Episode
from tests.rollout.conftest import CalcTool, EnvScript, ScriptedEngine, sampling

TASKS = [
    Task(task_id="t0", prompt="What is 12 times 34?"),
    Task(task_id="t1", prompt="Take the key."),
]
TOOLS = [CalcTool()]


def loop_params(**kw: Any) -> LoopParams:
    args: dict[str, Any] = {
        "max_turns": 4,
        "max_response_tokens": 64,
        "max_context_tokens": 512,
        "layout": "episode",
        "history_length": 1,
        "sampling": sampling(16),
        "env_step_timeout_s": 5.0,
    }
    args.update(kw)
    return LoopParams(**args)


def run(
    engine, tokenizer, factory, params: LoopParams, tasks=TASKS, group_size: int = 2, **kw: Any
) -> list[Episode]:
    return run_episodes(
        engine,
        tokenizer,
        factory,
        tasks,
        group_size=group_size,
        params=params,
        step=7,
        first_group_id=10,
        first_episode_id=100,
        tools=TOOLS,
        **kw,
    )


def obs_text(k: int) -> str:
    """What the template puts after the assistant's <|im_end|> for tool result ``result k``."""
    return f"\n<|im_start|>user\n<tool_response>\nresult {k}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def segments(mask: list[bool]) -> list[tuple[bool, int, int]]:
    """Maximal runs of equal mask values as (value, start, end)."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((mask[start], start, i))
            start = i
    return out


# ------------------------------------------------------------------------------ episode layout


def test_episode_layout_scripted(tokenizer, env_factory) -> None:
    fmt = ChatFormat(tokenizer, [tool_schema(t) for t in TOOLS])
    im_end = fmt.eot_ids[0]
    replies = {0: [*fmt.encode("call the tool"), im_end], 1: [*fmt.encode("\\boxed{408}"), im_end]}
    engine = ScriptedEngine(lambda c, i, p: replies[c])
    factory = env_factory(EnvScript(answer_turn=2, rewards=(0.0, 1.0)))
    episodes = run(engine, tokenizer, factory, loop_params())

    assert [(e.task_id, e.group_id, e.episode_id) for e in episodes] == [
        ("t0", 10, 100),
        ("t0", 10, 101),
        ("t1", 11, 102),
        ("t1", 11, 103),
    ]
    assert sorted(env.seed for env in factory.envs) == [10, 10, 11, 11]  # seed = group id
    first = fmt.prompt_ids(
        [
            {"role": "system", "content": "You are an agent."},
            {"role": "user", "content": TASKS[0].prompt},
        ]
    )
    # budget of turn 0: min(max_new 16, response 64, context 512 - prompt - 1 marker token)
    assert engine.calls[0][1][0] == min(16, 64, 512 - len(first) - 1)
    e = episodes[0]
    (s,) = e.samples
    obs = fmt.encode(obs_text(0))
    assert s.input_ids.tolist() == first + replies[0] + obs + replies[1]
    assert s.loss_mask.tolist() == [False] * len(first) + [True] * len(replies[0]) + [False] * len(
        obs
    ) + [True] * len(replies[1])
    lps = (
        [-(k + 1) / 10 for k in range(len(replies[0]))],
        [-(k + 1) / 10 for k in range(len(replies[1]))],
    )
    assert s.behavior_logprobs.tolist() == pytest.approx(
        [0.0] * len(first) + lps[0] + [0.0] * len(obs) + lps[1]
    )
    assert (s.group_id, s.episode_id, s.step, s.turn_index) == (10, 100, 7, 0)
    # env: turn 0 -> 1 call, 0 invalid; turn 1 -> final answer, 0 calls, 1 invalid (k % 2)
    assert (e.end_reason, e.num_turns, e.outcome_reward, e.success) == (
        EndReason.ANSWER,
        2,
        1.0,
        True,
    )
    assert (e.num_tool_calls, e.num_invalid_tool_calls, e.num_tool_errors) == (1, 1, 0)
    assert (e.final_answer, e.response_text) == ("answer 1", "\\boxed{408}")
    assert factory.envs[0].actions == ["call the tool", "\\boxed{408}"]
    assert all(env.closed for env in factory.envs)


def test_no_drift_with_a_tiny_model(model, tokenizer, env_factory) -> None:
    """The trained ids are the sampled ids verbatim; only template deltas sit between them."""
    seen: list[list[Generation]] = []

    @dataclass
    class Recorder:
        inner: HFEngine

        def generate(self, prompts, params, **kw: Any) -> list[Generation]:
            seen.append(self.inner.generate(prompts, params, **kw))
            return seen[-1]

        def update_weights(self, model: Any = None) -> None: ...

    fmt = ChatFormat(tokenizer, [tool_schema(t) for t in TOOLS])
    im_end = fmt.eot_ids[0]
    factory = env_factory(EnvScript(answer_turn=None))
    params = loop_params(max_turns=3, sampling=sampling(8))
    episodes = run(
        Recorder(HFEngine(model, tokenizer)),
        tokenizer,
        factory,
        params,
        generator=torch.Generator().manual_seed(5),
    )
    drift = 0
    for row, e in enumerate(episodes):
        (s,) = e.samples
        ids, mask = s.input_ids.tolist(), s.loss_mask.tolist()
        gens = [seen[turn][row] for turn in range(3)]
        runs = segments(mask)
        assert [r[0] for r in runs] == [False, True, False, True, False, True] + (
            [False] if runs[-1][0] is False else []
        )
        for turn, (_value, a, b) in enumerate([r for r in runs if r[0]]):
            assert ids[a:b] == gens[turn].token_ids  # verbatim, stop token included
            assert s.behavior_logprobs[a:b].tolist() == pytest.approx(gens[turn].logprobs)
            closing = "" if gens[turn].token_ids[-1] == im_end else "<|im_end|>"
            after = next(r for r in runs if r[1] == b)[1:] if b < len(ids) else (b, b)
            expected_after = closing + (obs_text(turn) if turn < 2 else "")
            assert tokenizer.decode(ids[after[0] : after[1]]) == expected_after
            drift += fmt.encode(fmt.response_text(gens[turn].token_ids, (0, im_end))) != [
                t for t in gens[turn].token_ids if t not in (0, im_end)
            ]
        assert e.end_reason == EndReason.MAX_TURNS and e.num_turns == 3
    assert drift > 0  # decode -> re-encode would have changed some sampled ids


def test_seeded_runs_are_identical(model, tokenizer, env_factory) -> None:
    params = loop_params(max_turns=2, sampling=sampling(6))

    def once() -> list[Episode]:
        return run(
            HFEngine(model, tokenizer),
            tokenizer,
            env_factory(EnvScript(answer_turn=None)),
            params,
            generator=torch.Generator().manual_seed(9),
        )

    a, b = once(), once()
    for x, y in zip(a, b):
        assert torch.equal(x.samples[0].input_ids, y.samples[0].input_ids)
        assert torch.equal(x.samples[0].behavior_logprobs, y.samples[0].behavior_logprobs)


# ------------------------------------------------------------------------------ turn layout


def test_turn_layout_one_sample_per_turn(tokenizer, env_factory) -> None:
    fmt = ChatFormat(tokenizer, [tool_schema(t) for t in TOOLS])
    im_end = fmt.eot_ids[0]
    engine = ScriptedEngine(lambda c, i, p: [*fmt.encode(f"go {c}"), im_end])
    factory = env_factory(
        EnvScript(answer_turn=3, rewards=(0.0, 1.0, 0.5), anchors=True, observation_role="user")
    )
    episodes = run(
        engine, tokenizer, factory, loop_params(layout="turn"), tasks=TASKS[:1], group_size=1
    )
    (e,) = episodes
    assert e.end_reason == EndReason.ANSWER and e.num_turns == 3 and e.outcome_reward == 1.5
    assert [s.turn_index for s in e.samples] == [0, 1, 2]
    assert [s.anchor for s in e.samples] == ["start t0", "state 1", "state 2"]
    assert [s.turn_reward for s in e.samples] == [0.0, 1.0, 0.5]
    for c, s in enumerate(e.samples):
        prompt = engine.calls[c][0][0]
        reply = [*fmt.encode(f"go {c}"), im_end]
        assert s.input_ids.tolist() == prompt + reply
        assert s.loss_mask.tolist() == [False] * len(prompt) + [True] * len(reply)
    # turn 2 shows only the last pair (history_length 1): step 2 saw "state 1" and answered "go 1"
    text = tokenizer.decode(engine.calls[2][0][0])
    assert "[Observation 2: 'state 1', Action 2: 'go 1']" in text and "start t0" not in text
    assert "Current observation (step 3):\nresult 1" in text


@pytest.mark.parametrize("layout", ["turn", "episode"])
def test_a_turn_penalty_lands_on_its_sample_and_not_in_the_outcome(
    tokenizer, env_factory, layout: str
) -> None:
    fmt = ChatFormat(tokenizer, [tool_schema(t) for t in TOOLS])
    engine = ScriptedEngine(lambda c, i, p: [*fmt.encode(f"go {c}"), fmt.eot_ids[0]])
    script = EnvScript(answer_turn=3, rewards=(0.0, 0.0, 1.0), penalties=(0.0, 0.1, 0.0))
    (e,) = run(
        engine, tokenizer, env_factory(script), loop_params(layout=layout), tasks=TASKS[:1],
        group_size=1,
    )  # fmt: skip
    assert e.outcome_reward == 1.0  # the env's rewards only
    if layout == "turn":
        assert [s.turn_penalty for s in e.samples] == [0.0, 0.1, 0.0]
        assert [s.turn_reward for s in e.samples] == [0.0, 0.0, 1.0]
    else:
        assert [s.turn_penalty for s in e.samples] == [0.1]  # the one sample holds every turn


def test_a_negative_penalty_fails_its_episode(tokenizer, env_factory) -> None:
    fmt = ChatFormat(tokenizer, [tool_schema(t) for t in TOOLS])
    engine = ScriptedEngine(lambda c, i, p: [*fmt.encode("go"), fmt.eot_ids[0]])
    (e,) = run(
        engine, tokenizer, env_factory(EnvScript(penalties=(-0.1,))), loop_params(),
        tasks=TASKS[:1], group_size=1,
    )  # fmt: skip
    assert e.end_reason == EndReason.ENV_ERROR and "info['penalty']" in str(e.info)


def test_turn_layout_with_an_env_rendered_prompt(tokenizer, env_factory) -> None:
    fmt = ChatFormat(tokenizer, None)
    engine = ScriptedEngine(lambda c, i, p: fmt.encode("go") + fmt.eot_ids)
    factory = env_factory(EnvScript(answer_turn=2, observation_role="user"))
    run(
        engine,
        tokenizer,
        factory,
        loop_params(layout="turn"),
        tasks=TASKS[:1],
        group_size=1,
        turn_prompt=observation_turn_prompt,
    )
    second = tokenizer.decode(engine.calls[1][0][0])
    assert second.endswith("<|im_start|>user\nresult 0<|im_end|>\n<|im_start|>assistant\n")
    assert "What is 12 times 34?" not in second


# ------------------------------------------------------------------------------ limits


def test_max_turns_ends_without_appending_the_last_observation(tokenizer, env_factory) -> None:
    fmt = ChatFormat(tokenizer, [tool_schema(t) for t in TOOLS])
    engine = ScriptedEngine(lambda c, i, p: fmt.encode("hi") + fmt.eot_ids)
    episodes = run(
        engine, tokenizer, env_factory(EnvScript(answer_turn=None)), loop_params(max_turns=3)
    )
    for e in episodes:
        assert (e.end_reason, e.num_turns) == (EndReason.MAX_TURNS, 3)
        assert e.samples[0].loss_mask[-1].item()  # ends with the sampled <|im_end|>


def test_response_budget_caps_generation_and_ends_the_episode(tokenizer, env_factory) -> None:
    engine = ScriptedEngine(lambda c, i, p: [50] * 10)  # never stops by itself
    params = loop_params(max_turns=10, max_response_tokens=25, sampling=sampling(10))
    episodes = run(engine, tokenizer, env_factory(EnvScript(answer_turn=None)), params)
    # budgets: 10, 10, then 25 - 20 = 5 left
    assert [budgets[0] for _, budgets in engine.calls] == [10, 10, 5]
    im_end = ChatFormat(tokenizer, None).eot_ids[0]
    for e in episodes:
        assert (e.end_reason, e.num_turns, e.samples[0].num_response_tokens) == (
            EndReason.MAX_TOKENS,
            3,
            25,
        )
        ids, mask = e.samples[0].input_ids.tolist(), e.samples[0].loss_mask.tolist()
        assert ids[-6:] == [50] * 5 + [im_end] and mask[-6:] == [True] * 5 + [
            False
        ]  # marker, mask 0


def test_context_overflow_ends_with_context(tokenizer, env_factory) -> None:
    fmt = ChatFormat(tokenizer, [tool_schema(t) for t in TOOLS])
    reply = fmt.encode("hi") + fmt.eot_ids
    first = fmt.prompt_ids(
        [
            {"role": "system", "content": "You are an agent."},
            {"role": "user", "content": TASKS[0].prompt},
        ]
    )
    engine = ScriptedEngine(lambda c, i, p: reply)
    params = loop_params(max_context_tokens=len(first) + 20)
    (e,) = run(
        engine,
        tokenizer,
        env_factory(EnvScript(answer_turn=None, obs_chars=200)),
        params,
        tasks=TASKS[:1],
        group_size=1,
    )
    assert (e.end_reason, e.num_turns) == (EndReason.CONTEXT, 1)
    assert (
        e.samples[0].input_ids.tolist() == first + reply
    )  # the overflowing observation is dropped
    assert engine.calls[0][1] == [min(16, 20 - 1)]
    # a prompt that leaves no room at all: no generation, no sample
    (e,) = run(
        engine,
        tokenizer,
        env_factory(EnvScript()),
        loop_params(max_context_tokens=len(first)),
        tasks=TASKS[:1],
        group_size=1,
    )
    assert (e.end_reason, e.num_turns, e.samples) == (EndReason.CONTEXT, 0, [])


# ------------------------------------------------------------------------------ bad input


def test_empty_and_undecodable_generations_do_not_raise(tokenizer, env_factory) -> None:
    fmt = ChatFormat(tokenizer, [tool_schema(t) for t in TOOLS])
    half = fmt.encode("é")[:1]  # a lone UTF-8 lead byte
    script = {0: [], 1: [*half, 10**6, *fmt.eot_ids]}
    engine = ScriptedEngine(lambda c, i, p: script[c])
    factory = env_factory(EnvScript(answer_turn=2))
    (e,) = run(engine, tokenizer, factory, loop_params(), tasks=TASKS[:1], group_size=1)
    assert e.end_reason == EndReason.ANSWER and e.num_turns == 2
    assert factory.envs[0].actions[0] == "" and "\ufffd" in factory.envs[0].actions[1]
    (s,) = e.samples
    first = engine.calls[0][0][0]
    # empty turn: the marker alone (mask 0), then the observation
    assert s.input_ids.tolist()[len(first) : len(first) + 1] == fmt.eot_ids
    assert s.num_response_tokens == len(script[1])


def test_failing_envs_end_only_their_episode(tokenizer, env_factory) -> None:
    fmt = ChatFormat(tokenizer, None)
    engine = ScriptedEngine(lambda c, i, p: [*fmt.encode("ok"), *fmt.eot_ids])
    scripts = [
        EnvScript(),
        EnvScript(raise_at=1, answer_turn=None),
        EnvScript(raise_on_reset=True),
        None,  # make_env raises
        EnvScript(info_error_at=0),
        EnvScript(rewards=(float("nan"),)),
    ]
    tasks = [*TASKS, Task(task_id="t2", prompt="Open the door.")]
    episodes = run(engine, tokenizer, env_factory(lambda k: scripts[k]), loop_params(), tasks=tasks)
    ok, step_err, reset_err, make_err, info_err, nan_err = episodes
    assert ok.end_reason == EndReason.ANSWER and ok.success
    assert all(e.end_reason == EndReason.ENV_ERROR and not e.success for e in episodes[1:])
    assert step_err.num_turns == 2 and "step 1 exploded" in step_err.info["env_error"]
    assert step_err.samples[0].num_response_tokens == 2 * len([*fmt.encode("ok"), *fmt.eot_ids])
    assert reset_err.samples == [] and "reset exploded" in reset_err.info["env_error"]
    assert "cannot make env" in make_err.info["env_error"]
    assert "worker lost" in info_err.info["env_error"]
    assert "non-finite reward" in nan_err.info["env_error"] and nan_err.outcome_reward == 0.0


def test_hanging_env_times_out_and_is_not_closed(tokenizer, env_factory) -> None:
    fmt = ChatFormat(tokenizer, None)
    engine = ScriptedEngine(lambda c, i, p: fmt.encode("ok") + fmt.eot_ids)
    factory = env_factory(lambda k: EnvScript(hang_at=0) if k == 1 else EnvScript())
    episodes = run(engine, tokenizer, factory, loop_params(env_step_timeout_s=0.3), tasks=TASKS[:1])
    good, hung = episodes
    assert good.end_reason == EndReason.ANSWER
    assert (
        hung.end_reason == EndReason.ENV_ERROR and "timed out after 0.3s" in hung.info["env_error"]
    )
    hung_env = next(env for env in factory.envs if env.script.hang_at == 0)
    other = next(env for env in factory.envs if env is not hung_env)
    assert other.closed and not hung_env.closed  # a hung env is abandoned, never closed
    assert hung_env.hanging  # the loop returned while the step still blocked (30 s)


# ------------------------------------------------------------------------------ params, evaluation


def test_loop_params_validation() -> None:
    with pytest.raises(ValueError, match="max_turns"):
        loop_params(max_turns=0)
    with pytest.raises(ValueError, match="layout"):
        loop_params(layout="steps")
    with pytest.raises(ValueError, match="history_length"):
        loop_params(history_length=-1)
    with pytest.raises(ValueError, match="env_step_timeout_s"):
        loop_params(env_step_timeout_s=0.0)


def test_summarize_and_evaluate(tokenizer, env_factory) -> None:
    assert summarize([]) == EvalSummary(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, {})
    fmt = ChatFormat(tokenizer, None)
    engine = ScriptedEngine(lambda c, i, p: fmt.encode("ok") + fmt.eot_ids)
    # rows 0, 1 answer after 2 turns (reward 1, success); rows 2, 3 fail at step 0
    factory = env_factory(lambda k: EnvScript() if k < 2 else EnvScript(raise_at=0))
    summary = evaluate(
        engine,
        tokenizer,
        factory,
        TASKS,
        params=loop_params(sampling=sampling(4, temperature=0.0)),
        samples_per_task=2,
    )
    # success 2/4; reward (1+1+0+0)/4; turns (2+2+1+1)/4 = 1.5; calls (1+1)/4; invalid (1+1)/4
    # response tokens: 3 per turn ("ok" = 2 tokens + marker) -> (6+6+3+3)/4 = 4.5
    assert len(fmt.encode("ok")) == 2
    assert summary == EvalSummary(
        4, 0.5, 0.5, 1.5, 0.5, 0.5, 4.5, {"answer": 0.5, "env_error": 0.5}
    )
    assert summary.as_metrics("eval")["eval/end_answer"] == 0.5


def test_an_engine_failure_propagates_and_still_closes_the_envs(tokenizer, env_factory) -> None:
    def boom(c: int, i: int, p: list[int]) -> list[int]:
        raise RuntimeError("engine down")

    factory = env_factory(EnvScript())
    with pytest.raises(RuntimeError, match="engine down"):
        run(ScriptedEngine(boom), tokenizer, factory, loop_params())
    assert len(factory.envs) == 4 and all(env.closed for env in factory.envs)


def test_env_supplied_turn_prompt_and_truncation(tokenizer, env_factory) -> None:
    fmt = ChatFormat(tokenizer, None)
    engine = ScriptedEngine(lambda c, i, p: [*fmt.encode("go"), *fmt.eot_ids])

    class Formatting:
        """Wraps a scripted env: its own turn prompt; truncates after the first step."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def reset(self, task: Task, *, seed: int | None = None) -> Any:
            return self.inner.reset(task, seed=seed)

        def step(self, text: str) -> Any:
            res = self.inner.step(text)
            res.truncated = True
            return res

        def close(self) -> None:
            self.inner.close()

        def format_turn_prompt(self, ctx: Any) -> list[Any]:
            return [{"role": "user", "content": f"custom turn {ctx.turn_index}"}]

    factory = env_factory(EnvScript(answer_turn=None))
    (e,) = run(
        engine,
        tokenizer,
        lambda: Formatting(factory()),
        loop_params(layout="turn"),
        tasks=TASKS[:1],
        group_size=1,
    )
    first = tokenizer.decode(engine.calls[0][0][0])  # (after the system block listing the tools)
    assert first.endswith("<|im_start|>user\ncustom turn 0<|im_end|>\n<|im_start|>assistant\n")
    assert TASKS[0].prompt not in first
    assert (e.end_reason, e.num_turns, e.info["truncated"]) == (EndReason.TERMINATED, 1, True)


def test_rollout_times_split_generation_from_env_calls(tokenizer, env_factory) -> None:
    # A slow engine and a fast env: generation seconds dominate, env seconds are counted too.
    fmt = ChatFormat(tokenizer, [tool_schema(t) for t in TOOLS])
    im_end = fmt.eot_ids[0]
    inner = ScriptedEngine(lambda c, i, p: [*fmt.encode(f"go {c}"), im_end])

    class SlowEngine:
        def generate(self, prompts, params, **kw):
            time.sleep(0.05)
            return inner.generate(prompts, params, **kw)

        def update_weights(self, model=None) -> None:
            pass

    times = RolloutTimes()
    t0 = time.perf_counter()
    run(SlowEngine(), tokenizer, env_factory(EnvScript(answer_turn=2)), loop_params(), times=times)
    total = time.perf_counter() - t0
    assert times.generation_s >= 0.1  # two turns, 50 ms each
    assert times.env_s > 0
    assert times.generation_s + times.env_s <= total
