"""Tool-call parsers: well-formed calls, clear errors, never raising."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spear.rollout.parsers import (
    PARSERS,
    ParsedTurn,
    ToolCall,
    parse_action_tags,
    parse_hermes,
    parse_python_fences,
)


def _call(name: str, args: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


def test_hermes_calls_in_order_and_content() -> None:
    text = "Let me compute. " + _call("calc", {"e": "1+1"}) + " and " + _call("calc", {"e": "2"})
    turn = parse_hermes(text)
    assert turn.calls == (ToolCall("calc", {"e": "1+1"}), ToolCall("calc", {"e": "2"}))
    assert turn.invalid == () and not turn.is_final
    assert turn.content == "Let me compute.  and"


def test_hermes_accepts_parameters_and_string_arguments() -> None:
    a = parse_hermes('<tool_call>{"name": "f", "parameters": {"x": 1}}</tool_call>')
    b = parse_hermes('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    c = parse_hermes('<tool_call>{"name": "f"}</tool_call>')
    assert a.calls == b.calls == (ToolCall("f", {"x": 1}),)
    assert c.calls == (ToolCall("f", {}),)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("{not json}", "invalid JSON in <tool_call>"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"arguments": {}}', "needs a string 'name'"),
        ('{"name": "", "arguments": {}}', "needs a string 'name'"),
        ('{"name": "f", "arguments": [1]}', "must be a JSON object"),
        ('{"name": "f", "arguments": "nope"}', "is a string but not JSON"),
        ("[" * 100_000 + "]" * 100_000, "invalid JSON"),
        ('{"name": "f", "arguments": {"x": ' + "1" * 5000 + "}}", "invalid JSON"),
    ],
)
def test_hermes_invalid_blocks_get_clear_errors(body: str, error: str) -> None:
    turn = parse_hermes(f"<tool_call>{body}</tool_call>")
    assert turn.calls == () and len(turn.invalid) == 1
    assert error in turn.invalid[0].error
    assert len(turn.invalid[0].error) < 300  # the bad block is quoted, shortened


def test_unterminated_call_is_invalid_and_plain_text_is_final() -> None:
    turn = parse_hermes('<tool_call>{"name": "f", "arguments": {}}')
    assert turn.invalid and "missing </tool_call>" in turn.invalid[0].error
    final = parse_hermes("The answer is \\boxed{3}.")
    assert final.is_final and final.content == "The answer is \\boxed{3}."


def test_action_parser() -> None:
    turn = parse_action_tags("<think>go <action>no</action></think><action>  take   coin </action>")
    assert turn.calls == (ToolCall("action", {"command": "take coin"}),)
    assert "empty" in parse_action_tags("<action> </action>").invalid[0].error
    assert "missing </action>" in parse_action_tags("<action>open door").invalid[0].error


def test_python_fence_parser() -> None:
    turn = parse_python_fences("Run:\n```python\nprint(1)\n```\nthen\n```py\nprint(2)\n```")
    assert turn.calls == (
        ToolCall("python", {"code": "print(1)\n"}),
        ToolCall("python", {"code": "print(2)\n"}),
    )
    assert "empty" in parse_python_fences("```python\n\n```").invalid[0].error
    assert parse_python_fences("```\nnot python\n```").is_final


def test_registry() -> None:
    assert PARSERS.get("hermes") is parse_hermes
    with pytest.raises(KeyError, match="hermes"):
        PARSERS.get("hermess")


_pieces = st.sampled_from(
    [
        "<tool_call>",
        "</tool_call>",
        "{",
        "}",
        '"name"',
        ":",
        '"f"',
        ",",
        '"arguments"',
        "[",
        "]",
        '"',
        "\\",
        "<action>",
        "</action>",
        "<think>",
        "```python\n",
        "```",
        "x",
        " ",
        "\n",
        "1e999",
        "null",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(_pieces, max_size=40).map("".join)))
def test_parsers_never_raise(text: str) -> None:
    for name in ("hermes", "action", "python"):
        turn = PARSERS.get(name)(text)
        assert isinstance(turn, ParsedTurn)
        assert all(isinstance(c.arguments, dict) for c in turn.calls)
        assert all(isinstance(i.error, str) and i.error for i in turn.invalid)


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8), st.integers() | st.text(max_size=8), max_size=4
    )
)
def test_hermes_round_trips_any_arguments(args: dict[str, object]) -> None:
    assert parse_hermes(_call("tool", args)).calls == (ToolCall("tool", args),)
