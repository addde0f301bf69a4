"""Warm-start demonstrations of the built-in arithmetic task.

They are scripted episodes played in the task's real env (so tool responses and errors look
exactly as during RL). Each demo is one of three kinds, in exact proportions given by the
parameters:

* ``tool``: a correct calculator call, the tool response, then ``\\boxed{result}``;
* ``guess``: no tool call, a wrong answer (the first number of the problem, :func:`naive_guess`);
* ``bad_call``: a malformed call (followed by a guess) or a call with a corrupted expression
  (followed by its wrong result), alternating.

The lookup and scripted sources reuse the kinds and the call / answer texts.
"""

from __future__ import annotations

import enum
import json
import math
import random
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from spear.envs.arithmetic import ArithmeticTasks
from spear.envs.base import Env, Task, tool_schema
from spear.models.tokenizer import Conversation
from spear.types import Message

if TYPE_CHECKING:
    from spear.models.warmstart import WarmStartParams


class DemoKind(str, enum.Enum):
    TOOL = "tool"
    GUESS = "guess"
    BAD_CALL = "bad_call"


def demo_kinds(n: int, fracs: Sequence[float], rng: random.Random) -> list[DemoKind]:
    """``n`` kinds in exact proportions ``fracs`` (tool, guess, bad_call), shuffled.

    Counts are ``floor(n * frac)`` plus one for the largest remainders, so they sum to ``n``.
    """
    kinds = list(DemoKind)
    raw = [n * f for f in fracs]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(kinds)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    out = [k for k, c in zip(kinds, counts) for _ in range(c)]
    rng.shuffle(out)
    return out


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    """A Hermes-style tool call as the model writes it."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def boxed(answer: str) -> str:
    return f"\\boxed{{{answer}}}"


def naive_guess(expression: str) -> str:
    """The answer of a model that does not calculate: the first number of the problem.

    It is always wrong (the generator never draws a problem whose answer is its first number) and
    it is a copy from the prompt, so guess demos teach the format and copying without teaching
    arithmetic the tiny model could not learn anyway.
    """
    return re.findall(r"\d+", expression)[0]


def corrupt_expression(expression: str, rng: random.Random) -> str:
    """``expression`` with one digit changed (never the leading digit of a number)."""
    spots = [
        i for i, c in enumerate(expression) if c.isdigit() and i > 0 and expression[i - 1].isdigit()
    ]
    if not spots:
        return expression + "+1"
    i = rng.choice(spots)
    new = rng.choice([d for d in "0123456789" if d != expression[i]])
    return expression[:i] + new + expression[i + 1 :]


def malformed_call_text(expression: str, rng: random.Random) -> str:
    """A broken tool call: invalid JSON, or an unknown tool name."""
    if rng.random() < 0.5:
        return f'<tool_call>{{"name": "calculator", "arguments": {{"expression": {expression}}}</tool_call>'
    return tool_call_text("calc", {"expression": expression})


def _last_tool_text(messages: list[Message]) -> str:
    texts = [m.get("content", "") for m in messages if m.get("role") == "tool"]
    return texts[-1] if texts else ""


def play_demo(env: Env, task: Task, kind: DemoKind, rng: random.Random, alt: bool) -> list[Message]:
    """Play one scripted demonstration of ``kind`` in ``env``; return the whole conversation.

    ``alt`` selects the variant of a ``bad_call`` demo (malformed call vs corrupted expression).
    """
    messages, _ = env.reset(task)
    messages = list(messages)
    expression = str(task.meta["expression"])

    def act(text: str) -> list[Message]:
        messages.append({"role": "assistant", "content": text})
        result = env.step(text)
        messages.extend(result.messages)
        return result.messages

    if kind is DemoKind.GUESS:
        act(boxed(naive_guess(expression)))
    elif kind is DemoKind.TOOL:
        obs = act(tool_call_text("calculator", {"expression": expression}))
        act(boxed(_last_tool_text(obs).strip()))
    elif alt:
        act(malformed_call_text(expression, rng))
        act(boxed(naive_guess(expression)))
    else:
        obs = act(tool_call_text("calculator", {"expression": corrupt_expression(expression, rng)}))
        act(boxed(_last_tool_text(obs).strip()))
    return messages


def make_demos(source: ArithmeticTasks, params: WarmStartParams, seed: int) -> list[Conversation]:
    """``params.num_demos`` demonstrations on training tasks, deterministic in ``seed``."""
    rng = random.Random(f"warmstart:{seed}")
    tasks = source.tasks("train", params.num_demos, seed)
    fracs = (params.frac_tool, params.frac_guess, params.frac_bad_call)
    kinds = demo_kinds(params.num_demos, fracs, rng)
    tools = [tool_schema(t) for t in source.tools()]
    env = source.make_env()
    demos: list[Conversation] = []
    n_bad = 0
    try:
        for task, kind in zip(tasks, kinds):
            alt = kind is DemoKind.BAD_CALL and n_bad % 2 == 0
            n_bad += kind is DemoKind.BAD_CALL
            demos.append(Conversation(play_demo(env, task, kind, rng, alt), tools))
    finally:
        env.close()
    return demos
