"""Tool-call parsers: the model's text of one turn -> the tool calls it asked for.

Every parser has the signature ``(text: str) -> ParsedTurn`` and lives in :data:`PARSERS`:

* ``hermes`` (default): Hermes / Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks (``"parameters"`` is accepted for ``"arguments"``, and ``arguments`` may be a JSON string
  holding an object, as some chat templates emit);
* ``action``: ``<action>...</action>`` with optional ``<think>...</think>`` before it; the action
  becomes a call of the tool ``action`` with ``{"command": ...}``;
* ``python``: fenced ```` ```python ```` blocks, each a call of the tool ``python`` with
  ``{"code": ...}``.

A parser never raises: a block it cannot read becomes an :class:`InvalidCall` whose ``error`` is
written for the model ("invalid JSON in <tool_call>: ..."). A turn with neither calls nor invalid
calls is a final answer (``ParsedTurn.is_final``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spear.registry import Registry


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One well-formed call: the tool's name and its arguments object."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class InvalidCall:
    """A call block that could not be read; ``error`` is the text shown to the model."""

    raw: str
    error: str


@dataclass(frozen=True, slots=True)
class ParsedTurn:
    """The calls of one turn, in the order written, and the text outside the call blocks."""

    calls: tuple[ToolCall, ...]
    invalid: tuple[InvalidCall, ...]
    content: str

    @property
    def is_final(self) -> bool:
        """No call was attempted: the turn is the model's final answer."""
        return not self.calls and not self.invalid


Parser = Callable[[str], ParsedTurn]
PARSERS: Registry[Parser] = Registry("tool-call parser")

_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|\Z)", re.DOTALL)
_ACTION = re.compile(r"<action>(.*?)(</action>|\Z)", re.DOTALL | re.IGNORECASE)
_THINK = re.compile(r"<think>.*?(</think>|\Z)", re.DOTALL | re.IGNORECASE)
_PY_FENCE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)(```|\Z)", re.DOTALL)
_SNIPPET = 80  # characters of a bad block quoted back to the model


def _snippet(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _SNIPPET else text[: _SNIPPET - 3] + "..."


def read_call_json(body: str) -> ToolCall | InvalidCall:
    """Read the JSON body of one ``<tool_call>`` block."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # ValueError: also over-long integer literals
        msg = getattr(e, "msg", None) or (
            "too deeply nested" if isinstance(e, RecursionError) else str(e)
        )
        return InvalidCall(body, f"invalid JSON in <tool_call>: {msg} in {_snippet(body)!r}")
    if not isinstance(obj, dict):
        return InvalidCall(
            body, "a <tool_call> must hold a JSON object with 'name' and 'arguments'"
        )
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return InvalidCall(body, "a <tool_call> needs a string 'name'")
    args: Any = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError) as e:
            why = getattr(e, "msg", None) or type(e).__name__
            return InvalidCall(body, f"'arguments' of {name!r} is a string but not JSON: {why}")
    if not isinstance(args, dict):
        return InvalidCall(body, f"'arguments' of {name!r} must be a JSON object")
    return ToolCall(name, args)


def _split(
    text: str, pattern: re.Pattern[str], read: Callable[[str], ToolCall | InvalidCall], closer: str
) -> ParsedTurn:
    calls: list[ToolCall] = []
    invalid: list[InvalidCall] = []
    for m in pattern.finditer(text):
        if not m.group(2):
            invalid.append(InvalidCall(m.group(0), f"unterminated call: missing {closer}"))
            continue
        got = read(m.group(1))
        (calls if isinstance(got, ToolCall) else invalid).append(got)  # type: ignore[arg-type]
    return ParsedTurn(tuple(calls), tuple(invalid), pattern.sub("", text).strip())


def hermes_call(name: str, arguments: dict[str, Any]) -> str:
    """The text of one Hermes-style call, as the model writes it (what :func:`parse_hermes`
    reads back as ``ToolCall(name, arguments)``)."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


@PARSERS.register("hermes")
def parse_hermes(text: str) -> ParsedTurn:
    """Hermes / Qwen ``<tool_call>{json}</tool_call>`` blocks."""
    return _split(text, _HERMES_BLOCK, lambda body: read_call_json(body.strip()), "</tool_call>")


@PARSERS.register("action")
def parse_action_tags(text: str) -> ParsedTurn:
    """``<action>command</action>`` (after an optional ``<think>`` block) as a call of ``action``."""
    without_think = _THINK.sub("", text)

    def read(body: str) -> ToolCall | InvalidCall:
        command = " ".join(body.split())
        if not command:
            return InvalidCall(body, "the <action></action> block is empty")
        return ToolCall("action", {"command": command})

    return _split(without_think, _ACTION, read, "</action>")


@PARSERS.register("python")
def parse_python_fences(text: str) -> ParsedTurn:
    """Fenced ```` ```python ```` blocks as calls of the ``python`` tool."""

    def read(body: str) -> ToolCall | InvalidCall:
        if not body.strip():
            return InvalidCall(body, "the ```python block is empty")
        return ToolCall("python", {"code": body})

    return _split(text, _PY_FENCE, read, "the closing ```")
