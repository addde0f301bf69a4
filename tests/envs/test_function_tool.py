"""Tools from plain Python functions: schema, argument validation, sync/async, failures."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from spear.envs.answers import score_boxed_number
from spear.envs.base import Task, Tool, tool_schema
from spear.envs.function_tool import (
    FunctionTool,
    ToolDefinitionError,
    as_tools,
    function_tool,
    schema_problem,
    tool_output_text,
)
from spear.envs.tool_env import ToolEnv
from spear.rollout.parsers import PARSERS, hermes_call


def lookup(item: str, qty: int, tags: list[str] | None = None, mode: str = "a") -> dict:
    """Look an item up.

    Args:
        item: The item's name.
        qty: How many.
        tags: Labels.
        mode: The mode. (choices: ["a", "b"])
    """
    return {"item": item, "qty": qty, "tags": tags, "mode": mode}


async def slow_add(a: int, b: int) -> int:
    """Add two integers, slowly.

    Args:
        a: First.
        b: Second.
    """
    await asyncio.sleep(0.01)
    return a + b


def boom(x: int) -> str:
    """Always raises.

    Args:
        x: Ignored.
    """
    raise ValueError(f"no good: {x}")


def hang(x: int) -> str:
    """Never returns in time.

    Args:
        x: Ignored.
    """
    time.sleep(5)
    return "late"


def huge(x: int) -> str:
    """A very long output.

    Args:
        x: Ignored.
    """
    return "y" * 10_000


def _env(*fns: Any, timeout: float = 2.0) -> ToolEnv:
    env = ToolEnv(
        as_tools(list(fns)),
        PARSERS.get("hermes"),
        score_boxed_number,
        system_prompt=None,
        tool_timeout_s=timeout,
        max_calls_per_turn=1,
        max_observation_chars=200,
    )
    env.reset(Task("t", "q", "1"))
    return env


def _observe(env: ToolEnv, name: str, args: dict[str, Any]) -> tuple[str, dict[str, int]]:
    step = env.step(hermes_call(name, args))
    return step.messages[0]["content"], step.info


def test_the_schema_comes_from_type_hints_and_the_docstring() -> None:
    tool = function_tool(lookup)
    assert isinstance(tool, Tool)
    assert tool.name == "lookup" and tool.description == "Look an item up."
    props = tool.parameters["properties"]
    assert props["item"] == {"type": "string", "description": "The item's name."}
    assert props["qty"]["type"] == "integer"
    assert props["tags"]["items"] == {"type": "string"} and props["tags"]["nullable"] is True
    assert props["mode"]["enum"] == ["a", "b"]
    assert tool.parameters["required"] == ["item", "qty"]
    assert tool_schema(tool)["function"]["parameters"] == tool.parameters


def test_decorator_form_and_overrides() -> None:
    @function_tool(name="shop_lookup", timeout_s=0.5)
    def f(item: str) -> str:
        """Find it.

        Args:
            item: What.
        """
        return item

    assert isinstance(f, FunctionTool) and f.name == "shop_lookup" and f.timeout_s == 0.5
    assert f(item="x") == "x"


def test_a_function_without_docs_or_hints_cannot_be_a_tool() -> None:
    def nodoc(x: int) -> int:
        return x

    def nohint(x):  # type: ignore[no-untyped-def]
        """No hints.

        Args:
            x: Something.
        """

    with pytest.raises(ToolDefinitionError, match="nodoc cannot be a tool"):
        FunctionTool(nodoc)

    def undocumented(x: int, y: int) -> int:
        """Only x is documented.

        Args:
            x: Something.
        """
        return x

    with pytest.raises(ToolDefinitionError, match="nohint cannot be a tool"):
        FunctionTool(nohint)
    with pytest.raises(ToolDefinitionError, match="no description for the argument 'y'"):
        FunctionTool(undocumented)
    with pytest.raises(ToolDefinitionError, match="two tools are named 'lookup'"):
        as_tools([lookup, lookup])
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        FunctionTool(lookup, timeout_s=0)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        ({"item": "pen", "qty": "3"}, "argument 'qty' of lookup must be of type integer, got str"),
        ({"item": "pen", "qty": True}, "argument 'qty' of lookup must be of type integer, got bool"),
        ({"item": "pen", "qty": 1, "tags": ["a", 2]}, "argument 'tags' of lookup[1] must be of type string, got int"),
        ({"item": "pen", "qty": 1, "mode": "c"}, "argument 'mode' of lookup must be one of 'a', 'b', got 'c'"),
        ({"item": "pen"}, "lookup is missing the argument(s) 'qty'"),
        ({"item": "pen", "qty": 1, "color": "red"}, "lookup has no argument(s) 'color'; it takes item, qty, tags, mode"),
    ],
)  # fmt: skip
def test_wrong_arguments_are_an_observation_and_the_function_is_not_called(
    args: dict[str, Any], expect: str
) -> None:
    calls: list[Any] = []

    def spy(item: str, qty: int, tags: list[str] | None = None, mode: str = "a") -> str:
        """Spy.

        Args:
            item: The item.
            qty: How many.
            tags: Labels.
            mode: The mode. (choices: ["a", "b"])
        """
        calls.append(1)
        return "ran"

    text, info = _observe(_env(function_tool(spy, name="lookup")), "lookup", args)
    assert text == f"error: {expect}"
    assert info == {"tool_calls": 0, "invalid_tool_calls": 1, "tool_errors": 0}
    assert calls == []


def test_valid_arguments_run_and_the_result_is_json_text() -> None:
    env = _env(lookup)
    text, info = _observe(env, "lookup", {"item": "pen", "qty": 2, "tags": None})
    assert text == '{"item": "pen", "qty": 2, "tags": null, "mode": "a"}'
    assert info["tool_calls"] == 1
    assert env.calls[-1].ok and env.calls[-1].arguments == {"item": "pen", "qty": 2, "tags": None}


def test_an_async_function_is_awaited() -> None:
    tool = FunctionTool(slow_add)
    assert tool.is_async and tool(a=2, b=3) == "5"
    text, info = _observe(_env(slow_add), "slow_add", {"a": 40, "b": 2})
    assert text == "42" and info["tool_errors"] == 0


def test_exceptions_hangs_and_huge_outputs_become_observations() -> None:
    env = _env(boom, hang, huge, timeout=5.0)
    text, info = _observe(env, "boom", {"x": 1})
    assert text == "error: tool boom failed: ValueError: no good: 1" and info["tool_errors"] == 1
    env.tools["hang"].timeout_s = 0.1  # type: ignore[attr-defined]  # the tool's own limit wins
    text, info = _observe(env, "hang", {"x": 1})  # "after 0.1s": that limit, not the env's 5 s
    assert text == "error: tool hang failed: timed out after 0.1s" and info["tool_errors"] == 1
    text, _ = _observe(env, "huge", {"x": 1})
    assert len(text) <= 200 and text.endswith("...[truncated 9832 characters]")
    assert [c.ok for c in env.calls] == [False, False, True]


def test_an_async_tool_times_out_by_its_own_limit() -> None:
    async def sleepy(x: int) -> int:
        """Sleeps.

        Args:
            x: Ignored.
        """
        await asyncio.sleep(5)
        return x

    with pytest.raises(TimeoutError):
        FunctionTool(sleepy, timeout_s=0.05)(x=1)


def test_schema_problem_nested_shapes() -> None:
    tup = {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}
    assert schema_problem(tup, [1, "a"], "t") is None
    assert schema_problem(tup, [1], "t") == "t must have 2 items, got 1"
    assert schema_problem(tup, ["a", "a"], "t") == "t[0] must be of type integer, got str"
    mapping = {"type": "object", "additionalProperties": {"type": "integer"}}
    assert schema_problem(mapping, {"a": 1}, "m") is None
    assert schema_problem(mapping, {"a": 1.5}, "m") == "m['a'] must be of type integer, got float"
    union = {"type": ["integer", "string"]}
    assert schema_problem(union, "x", "u") is None and schema_problem(union, 1, "u") is None
    assert schema_problem(union, 1.5, "u") == "u must be of type integer or string, got float"
    assert schema_problem({"type": "number"}, 3, "n") is None  # an integer is a number


def test_tool_output_text() -> None:
    assert tool_output_text("a") == "a"
    assert tool_output_text(12) == "12"
    assert tool_output_text(None) == "null"
    assert tool_output_text(b"\xffok") == "\ufffdok"
    assert tool_output_text({1, 2}) == "{1, 2}"  # not JSON: repr
