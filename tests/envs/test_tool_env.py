"""ToolEnv: every kind of bad call or bad tool becomes a clear, counted observation."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from spear.envs.answers import score_boxed_number
from spear.envs.base import Task
from spear.envs.tool_env import ToolEnv, as_text, check_arguments, run_with_timeout, truncate
from spear.rollout.parsers import PARSERS


class FakeTool:
    """A tool whose behaviour is chosen by its ``mode`` argument."""

    name = "fake"
    description = "test tool"
    parameters: dict[str, Any] = {  # noqa: RUF012
        "type": "object",
        "properties": {"mode": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["mode"],
    }

    def __call__(self, **arguments: Any) -> Any:
        mode = arguments["mode"]
        if mode == "echo":
            return f"n={arguments.get('n')}"
        if mode == "raise":
            raise ZeroDivisionError("boom")
        if mode == "exit":
            raise SystemExit(2)
        if mode == "hang":
            time.sleep(5)
        if mode == "bytes":
            return b"ok \xff\xfe"
        if mode == "huge":
            return "y" * (100 << 20)
        if mode == "blank":
            return "  \n"
        if mode == "number":
            return 12
        return "?"


TASK = Task("t1", "What is 2+2?", answer="4")


def _env(max_calls: int = 2, timeout: float = 0.3) -> ToolEnv:
    env = ToolEnv(
        [FakeTool()],
        PARSERS.get("hermes"),
        score_boxed_number,
        system_prompt="sys",
        tool_timeout_s=timeout,
        max_calls_per_turn=max_calls,
        max_observation_chars=200,
    )
    env.reset(TASK)
    return env


def _call(args: dict[str, Any], name: str = "fake") -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


def test_reset_gives_system_and_user() -> None:
    env = _env()
    messages, info = env.reset(TASK)
    assert messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": TASK.prompt},
    ]
    assert info == {}


def test_valid_call_and_final_answer() -> None:
    env = _env()
    step = env.step(_call({"mode": "echo", "n": 3}))
    assert step.messages == [{"role": "tool", "name": "fake", "content": "n=3"}]
    assert (step.reward, step.terminated) == (0.0, False)
    assert step.info == {"tool_calls": 1, "invalid_tool_calls": 0, "tool_errors": 0}
    final = env.step("It is \\boxed{4}")
    assert final.terminated and final.reward == 1.0
    assert final.info == {"success": True, "final_answer": "4", "tool_calls": 0}


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("<tool_call>{oops}</tool_call>", "error: invalid JSON"),
        (_call({"mode": "echo"}, name="nope"), "error: unknown tool 'nope'; available: fake"),
        (_call({"n": 1}), "missing the argument(s) 'mode'"),
        (_call({"mode": "echo", "x": 1}), "has no argument(s) 'x'"),
        (_call({"mode": 5}), "argument 'mode' of fake must be of type string, got int"),
        (_call({"mode": "echo", "n": True}), "must be of type integer, got bool"),
        (_call({"mode": "echo", "n": 1.5}), "must be of type integer, got float"),
    ],
)
def test_invalid_calls_are_counted_observations(text: str, expect: str) -> None:
    step = _env().step(text)
    assert len(step.messages) == 1 and expect in step.messages[0]["content"]
    assert step.info == {"tool_calls": 0, "invalid_tool_calls": 1, "tool_errors": 0}
    assert not step.terminated


@pytest.mark.parametrize(
    ("mode", "expect"),
    [
        ("raise", "error: tool fake failed: ZeroDivisionError: boom"),
        ("exit", "error: tool fake failed: SystemExit: 2"),
        ("hang", "error: tool fake failed: timed out after 0.3s"),
    ],
)
def test_failing_tools_are_counted_errors(mode: str, expect: str) -> None:
    # "hang" sleeps 5 s; "timed out after 0.3s" comes only from the deadline, which cut it
    step = _env().step(_call({"mode": mode}))
    assert step.messages[0]["content"] == expect
    assert step.info == {"tool_calls": 1, "invalid_tool_calls": 0, "tool_errors": 1}


def test_odd_return_values_become_text() -> None:
    env = _env()
    assert env.step(_call({"mode": "bytes"})).messages[0]["content"] == "ok \ufffd\ufffd"
    assert env.step(_call({"mode": "number"})).messages[0]["content"] == "12"
    assert env.step(_call({"mode": "blank"})).messages[0]["content"] == "(the tool printed nothing)"
    huge = env.step(_call({"mode": "huge"})).messages[0]["content"]
    kept = huge.index("\n")
    assert len(huge) <= 200 and huge.endswith(f"[truncated {(100 << 20) - kept} characters]")
    assert "[truncated " in huge and huge.startswith("y")


def test_calls_beyond_the_per_turn_limit_are_not_run() -> None:
    step = _env(max_calls=1).step(_call({"mode": "echo", "n": 1}) + _call({"mode": "echo", "n": 2}))
    assert [m["content"] for m in step.messages] == [
        "n=1",
        "error: at most 1 tool call(s) per turn; this one was not run",
    ]
    assert step.info == {"tool_calls": 1, "invalid_tool_calls": 1, "tool_errors": 0}


def test_mixed_turn_counts_each_kind() -> None:
    text = _call({"mode": "echo", "n": 1}) + "<tool_call>bad</tool_call>" + _call({"mode": "raise"})
    step = _env(max_calls=3).step(text)
    assert len(step.messages) == 3
    assert step.info == {"tool_calls": 2, "invalid_tool_calls": 1, "tool_errors": 1}


def test_step_before_reset_is_a_programming_error() -> None:
    env = ToolEnv(
        [],
        PARSERS.get("hermes"),
        score_boxed_number,
        system_prompt=None,
        tool_timeout_s=1,
        max_calls_per_turn=1,
        max_observation_chars=100,
    )
    with pytest.raises(RuntimeError, match="before reset"):
        env.step("hi")
    messages, _ = env.reset(TASK)
    assert messages == [{"role": "user", "content": TASK.prompt}]


def test_helpers() -> None:
    assert truncate("abc", 3) == "abc"
    cut = truncate("x" * 100, 40)
    assert (
        len(cut) <= 40
        and cut == "x" * cut.index("\n") + f"\n...[truncated {100 - cut.index(chr(10))} characters]"
    )
    assert len(truncate("z" * 1000, 10)) == 10
    assert as_text(bytearray(b"\xff")) == "\ufffd"
    assert as_text("a\ud800b") == "a?b"
    assert check_arguments(FakeTool(), {"mode": "x", "n": 2}) is None
    assert run_with_timeout(lambda: 5, 1.0) == (5, None)
    value, error = run_with_timeout(lambda: time.sleep(1), 0.05)
    assert value is None and error == "timed out after 0.05s"
