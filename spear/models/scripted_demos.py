"""Warm-start demonstrations of any task that can script a solution (custom tasks).

A task source with a ``demonstration(task) -> [assistant turn texts]`` method (a
:class:`~spear.envs.function_task.FunctionTask` given ``demonstration=``) gets the built-in tiny
model's tokenizer and warm start from its own episodes: each demonstration is played in the
task's real env (so tool responses look exactly as during RL) and is one of three kinds, in the
exact proportions ``model.warm_start.frac_tool / frac_guess / frac_bad_call``:

* ``tool``: the whole scripted solution;
* ``guess``: only the final turn of *another* task's solution (the format, not the answer);
* ``bad_call``: the solution's turns but the last two (at least its first turn), then that
  other task's final turn: a solution given up half way.

So the warm model writes well-formed calls and answers but solves few tasks; RL has to learn
when the tools' results are needed. The cache key hashes a fingerprint of the demonstrated
tasks, their scripts, the tool schemas and the system prompt, so editing the task rebuilds the
warm model.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spear.envs.base import Env, Task, TaskSource, tool_schema
from spear.models.tokenizer import Conversation
from spear.types import Message

if TYPE_CHECKING:
    from spear.config import Config
    from spear.models.warmstart import WarmStartParams

SOURCE_NAME = "scripted"
_OUT_OF_KEY = {"cache_key": False, "report": False}


def has_demonstration(source: TaskSource) -> bool:
    return callable(getattr(source, "demonstration", None))


def _script(source: TaskSource, task: Task) -> list[str]:
    actions = list(source.demonstration(task))  # type: ignore[attr-defined]
    if not actions or not all(isinstance(a, str) for a in actions):
        raise ValueError(
            f"demonstration({task.task_id}) must return a non-empty list of assistant turn texts"
        )
    return actions


@dataclass(frozen=True, slots=True)
class ScriptedDemoParams:
    """``task``: the source's name; ``fingerprint``: a hash of everything the demos are made of;
    ``source``: the task source itself (in neither the cache key nor the report)."""

    task: str
    fingerprint: str
    source: Any = field(default=None, compare=False, repr=False, metadata=_OUT_OF_KEY)

    @classmethod
    def from_source(cls, cfg: Config, source: TaskSource) -> ScriptedDemoParams:
        w = cfg.model.warm_start
        tasks = source.tasks("train", w.num_demos, w.seed)
        blob = {
            "system_prompt": getattr(source, "system_prompt", None),
            "tools": [tool_schema(t) for t in source.tools()],
            "tasks": [[t.task_id, t.prompt, t.answer, _script(source, t)] for t in tasks],
        }
        digest = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode())
        return cls(task=source.name, fingerprint=digest.hexdigest()[:16], source=source)


def play_script(env: Env, task: Task, actions: list[str]) -> tuple[list[Message], bool]:
    """Play ``actions`` in ``env`` from ``reset(task)``; the conversation and whether it ended
    in success (it stops early when the env terminates)."""
    messages, _ = env.reset(task)
    messages = list(messages)
    success = False
    for text in actions:
        messages.append({"role": "assistant", "content": text})
        result = env.step(text)
        messages.extend(result.messages)
        if result.terminated or result.truncated:
            success = bool(result.info.get("success", False))
            break
    return messages, success


def make_scripted_demos(
    params: WarmStartParams, seed: int
) -> tuple[list[Conversation], dict[str, float]]:
    """``params.num_demos`` demonstrations (module docstring) and counts for the report."""
    from spear.models.arithmetic_demos import DemoKind, demo_kinds

    source: TaskSource = params.task.source
    rng = random.Random(f"warmstart:scripted:{seed}")
    tasks = source.tasks("train", params.num_demos, seed)
    kinds = demo_kinds(len(tasks), (params.frac_tool, params.frac_guess, params.frac_bad_call), rng)
    tools = [tool_schema(t) for t in source.tools()]
    scripts = [_script(source, t) for t in tasks]
    env = source.make_env()
    demos: list[Conversation] = []
    solved = {kind: 0 for kind in DemoKind}
    try:
        for i, (task, kind) in enumerate(zip(tasks, kinds)):
            script, other = scripts[i], scripts[(i + 1) % len(scripts)][-1]
            if kind is DemoKind.TOOL:
                actions = script
            elif kind is DemoKind.GUESS:
                actions = [other]
            else:
                actions = [*script[: max(1, len(script) - 2)], other]
            messages, ok = play_script(env, task, actions)
            solved[kind] += ok
            demos.append(Conversation(messages, tools))
    finally:
        env.close()
    n_tool = kinds.count(DemoKind.TOOL)
    report = {
        "demo_tool_solved": solved[DemoKind.TOOL] / max(1, n_tool),  # 1.0 for a right script
        "demo_solved": sum(solved.values()) / max(1, len(tasks)),
    }
    return demos, report
