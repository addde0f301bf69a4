"""Warm-start demonstrations of tasks that script their own solution (custom tasks)."""

from __future__ import annotations

import pytest

from spear.config import ConfigError, load_config
from spear.envs.base import Task
from spear.envs.function_task import FunctionTask
from spear.models import warmstart as ws
from spear.models.scripted_demos import ScriptedDemoParams, make_scripted_demos
from spear.rollout.parsers import hermes_call

ROWS = [{"prompt": f"What is {i} times 3 plus 1?", "answer": 3 * i + 1, "n": i} for i in range(40)]


def mul(a: int, b: int) -> int:
    """Multiply.

    Args:
        a: First.
        b: Second.
    """
    return a * b


def inc(x: int) -> int:
    """Add one.

    Args:
        x: The number.
    """
    return x + 1


def solve(task: Task) -> list[str]:
    n = int(task.meta["n"])
    return [
        hermes_call("mul", {"a": n, "b": 3}),
        hermes_call("inc", {"x": 3 * n}),
        f"\\boxed{{{3 * n + 1}}}",
    ]


def _source(**kw: object) -> FunctionTask:
    args: dict = {"name": "muls", "data": ROWS, "tools": [mul, inc], "held_out_fraction": 0.25,
                  "demonstration": solve, "system_prompt": "Use the tools."}  # fmt: skip
    return FunctionTask(**{**args, **kw})


def _params(source: FunctionTask, *over: str) -> ws.WarmStartParams:
    cfg = load_config(
        overrides=[
            "model.warm_start.num_demos=10", "model.warm_start.frac_tool=0.3",
            "model.warm_start.frac_guess=0.3", "model.warm_start.frac_bad_call=0.4", *over,
        ]
    )  # fmt: skip
    return ws.WarmStartParams.from_config(cfg, source)


def test_demos_are_played_in_the_env_in_the_configured_kinds() -> None:
    params = _params(_source())
    assert params.source == ws.SCRIPTED and params.task.task == "muls"
    demos, report = make_scripted_demos(params, seed=0)
    assert len(demos) == 10 and report["demo_tool_solved"] == 1.0
    turns = sorted(sum(m["role"] == "assistant" for m in d.messages) for d in demos)
    # 3 tool demos play the whole script (3 turns); 3 guesses answer at once (1 turn);
    # 4 bad_call demos give up after the first call (2 turns)
    assert turns == [1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    full = next(d for d in demos if len(d.messages) == 7)
    assert [m["role"] for m in full.messages] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    assert [t["function"]["name"] for t in full.tools] == ["mul", "inc"]
    # a guess is another task's final answer: wrong unless two tasks share the answer
    assert report["demo_solved"] == pytest.approx(0.3)


def test_the_cache_key_follows_the_task_and_not_the_source_object() -> None:
    a, b = _params(_source()), _params(_source())
    assert a.cache_key(0) == b.cache_key(0)
    assert _params(_source(system_prompt="Other.")).cache_key(0) != a.cache_key(0)

    def other(task: Task) -> list[str]:
        return solve(task)[1:]

    assert _params(_source(demonstration=other)).cache_key(0) != a.cache_key(0)
    assert "source" not in ws.key_fields(a)["task"]


def test_a_task_without_demonstration_names_model_path() -> None:
    with pytest.raises(ConfigError, match=r"demonstration\(task\) method.*set model.path"):
        _params(_source(demonstration=None))
    bad = _source(demonstration=lambda task: [])
    with pytest.raises(ValueError, match="must return a non-empty list"):
        ScriptedDemoParams.from_source(load_config(overrides=["model.warm_start.num_demos=2"]), bad)
