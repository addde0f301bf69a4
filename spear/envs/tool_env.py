"""A tool-using task as an :class:`~spear.envs.base.Env`.

``reset(task)`` gives the system prompt and the task's prompt. Each ``step(text)`` parses the
turn with the configured tool-call parser:

* no call at all: the turn is the final answer; the scorer gives reward and success and the
  episode terminates (``info["final_answer"]`` is the extracted answer, or None);
* otherwise every call becomes one ``tool`` message, in order: a valid call runs its tool (in a
  daemon thread under the tool's own ``timeout_s`` if it has one, else ``tool_timeout_s``, so a
  hung tool never blocks the loop), a bad call gets an error text. Calls beyond
  ``max_calls_per_turn`` are not run and say so. ``ToolEnv.calls`` keeps a
  :class:`CallRecord` of every attempted call of the episode.

Nothing the model writes or a tool does raises out of ``step``: malformed JSON, unknown tools,
wrong argument types, a tool that raises, hangs, returns a non-string or non-UTF-8 bytes, or
prints too much, each becomes a clear observation and is counted in ``info``
(``tool_calls`` = valid calls run, ``invalid_tool_calls``, ``tool_errors``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from spear.envs.answers import Score
from spear.envs.base import StepResult, Task, Tool
from spear.envs.function_tool import schema_problem
from spear.rollout.parsers import InvalidCall, Parser, ToolCall
from spear.types import Message

Scorer = Callable[[str, Task], Score]

# the tool-call format (a spear.rollout.parsers name) that the built-in tool tasks' system prompts
# ask for and their warm-start demonstrations are written in; ``rollout.parser`` overrides it
NATIVE_PARSER = "hermes"


def boxed_number_env(
    tools: Sequence[Tool],
    parser: str,
    *,
    system_prompt: str,
    tool_timeout_s: float,
    max_calls_per_turn: int,
    max_observation_chars: int,
) -> ToolEnv:
    """A :class:`ToolEnv` scored by a ``\\boxed{}`` number equal to the task's answer (the
    built-in ``arithmetic`` and ``lookup`` tasks); ``parser`` names a ``spear.rollout.parsers``
    entry."""
    from spear.envs.answers import score_boxed_number
    from spear.rollout.parsers import PARSERS

    return ToolEnv(
        tools,
        PARSERS.get(parser),
        score_boxed_number,
        system_prompt=system_prompt,
        tool_timeout_s=tool_timeout_s,
        max_calls_per_turn=max_calls_per_turn,
        max_observation_chars=max_observation_chars,
    )


def check_tool_limits(tool_timeout_s: float, max_observation_chars: int) -> None:
    """Raise ``ValueError`` naming the field unless a tool env's limits are usable."""
    if not tool_timeout_s > 0:
        raise ValueError(f"tool_timeout_s must be > 0, got {tool_timeout_s}")
    if max_observation_chars < 1:
        raise ValueError(f"max_observation_chars must be >= 1, got {max_observation_chars}")


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One attempted tool call of an episode: the tool's name (``"invalid"`` for an unreadable
    block), its arguments, the observation text the model got, and whether the tool ran and
    returned (False for bad calls, tool errors and time-outs)."""

    name: str
    arguments: dict[str, Any]
    output: str
    ok: bool


def truncate(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters with a visible marker saying how much went."""
    if len(text) <= limit:
        return text
    longest = f"\n...[truncated {len(text)} characters]"  # the count can only be shorter
    keep = max(0, limit - len(longest))
    return (text[:keep] + f"\n...[truncated {len(text) - keep} characters]")[:limit]


def as_text(value: Any) -> str:
    """A tool's return value as valid text (bytes are decoded, bad bytes become U+FFFD)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    text = value if isinstance(value, str) else repr(value)
    return text.encode("utf-8", errors="replace").decode("utf-8")


def check_arguments(tool: Tool, arguments: dict[str, Any]) -> str | None:
    """Why ``arguments`` do not fit ``tool``'s JSON schema (required keys, unknown keys, and
    each argument's type, enum and nested items, see
    :func:`~spear.envs.function_tool.schema_problem`), or None when they do."""
    schema = tool.parameters or {}
    props: dict[str, Any] = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in arguments]
    if missing:
        return f"{tool.name} is missing the argument(s) {', '.join(map(repr, missing))}"
    unknown = [k for k in arguments if k not in props]
    if unknown and props:
        return f"{tool.name} has no argument(s) {', '.join(map(repr, unknown))}; it takes {', '.join(props)}"
    for key, value in arguments.items():
        sub = props.get(key)
        if isinstance(sub, dict):
            problem = schema_problem(sub, value, f"argument {key!r} of {tool.name}")
            if problem is not None:
                return problem
    return None


def run_with_timeout(fn: Callable[[], Any], timeout_s: float) -> tuple[Any, str | None]:
    """Run ``fn`` in a daemon thread; ``(value, None)``, or ``(None, error text)`` when it raised
    or did not return within ``timeout_s`` (the thread is then abandoned)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # a tool may raise anything, SystemExit included
            box["error"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=target, daemon=True, name="spear-tool")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        return None, f"timed out after {timeout_s:g}s"
    if "error" in box:
        return None, box["error"]
    return box.get("value"), None


class ToolEnv:
    """Tool-using task env (see the module docstring)."""

    def __init__(
        self,
        tools: Sequence[Tool],
        parser: Parser,
        scorer: Scorer,
        *,
        system_prompt: str | None,
        tool_timeout_s: float,
        max_calls_per_turn: int,
        max_observation_chars: int,
    ) -> None:
        self.tools = {t.name: t for t in tools}
        self.parser, self.scorer = parser, scorer
        self.system_prompt = system_prompt
        self.tool_timeout_s = tool_timeout_s
        self.max_calls_per_turn = max_calls_per_turn
        self.max_observation_chars = max_observation_chars
        self._task: Task | None = None
        self.calls: list[CallRecord] = []  # this episode's attempted calls, in order

    def reset(self, task: Task, *, seed: int | None = None) -> tuple[list[Message], dict[str, Any]]:
        self._task = task
        self.calls = []
        messages: list[Message] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": task.prompt})
        return messages, {}

    def step(self, action_text: str) -> StepResult:
        if self._task is None:
            raise RuntimeError("ToolEnv.step called before reset")
        parsed = self.parser(action_text)
        if parsed.is_final:
            score = self.scorer(action_text, self._task)
            info = {"success": score.success, "final_answer": score.answer, "tool_calls": 0}
            if score.check_bounded:  # a wrong answer whose check hit its time or memory bound
                info["answer_check_bounded"] = True
            return StepResult([], score.reward, terminated=True, info=info)
        messages: list[Message] = []
        counts = {"tool_calls": 0, "invalid_tool_calls": 0, "tool_errors": 0}
        attempts: list[ToolCall | InvalidCall] = [*parsed.calls, *parsed.invalid]
        for k, call in enumerate(attempts):
            if k >= self.max_calls_per_turn:
                text = f"error: at most {self.max_calls_per_turn} tool call(s) per turn; this one was not run"
                counts["invalid_tool_calls"] += 1
                ok = False
            else:
                text, ok = self._run(call, counts)
            name = call.name if isinstance(call, ToolCall) else "invalid"
            content = truncate(text, self.max_observation_chars)
            messages.append({"role": "tool", "name": name, "content": content})
            args = call.arguments if isinstance(call, ToolCall) else {}
            self.calls.append(CallRecord(name, dict(args), content, ok))
        return StepResult(messages, 0.0, terminated=False, info=counts)

    def _run(self, call: ToolCall | InvalidCall, counts: dict[str, int]) -> tuple[str, bool]:
        """The observation text of one call and whether the tool ran and returned."""
        if isinstance(call, InvalidCall):
            counts["invalid_tool_calls"] += 1
            return f"error: {call.error}", False
        tool = self.tools.get(call.name)
        if tool is None:
            counts["invalid_tool_calls"] += 1
            known = ", ".join(sorted(self.tools))
            return f"error: unknown tool {call.name!r}; available: {known}", False
        problem = check_arguments(tool, call.arguments)
        if problem is not None:
            counts["invalid_tool_calls"] += 1
            return f"error: {problem}", False
        counts["tool_calls"] += 1
        timeout = getattr(tool, "timeout_s", None) or self.tool_timeout_s  # a tool's own wins
        value, error = run_with_timeout(lambda: tool(**call.arguments), timeout)
        if error is not None:
            counts["tool_errors"] += 1
            return f"error: tool {call.name} failed: {error}", False
        text = as_text(value)
        return (text if text.strip() else "(the tool printed nothing)"), True

    def close(self) -> None:
        self._task = None
        self.calls = []
