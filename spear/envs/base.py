"""Environment and tool interfaces.

An :class:`Env` is gymnasium-style with text in and chat messages out: ``reset`` starts an
episode of one task and returns the first messages (system / user) plus info; ``step`` takes the
model's whole response text for a turn and returns the observation messages that follow it
(``user`` messages for text games, ``tool`` messages for tool results), the reward, and whether
the episode is over. ``info`` may carry ``"admissible_actions"`` (text games), ``"success"``,
``"anchor"`` (GiGPO anchor observation), ``"tool_calls"`` / ``"invalid_tool_calls"`` counts,
``"final_answer"`` and ``"penalty"`` (>= 0: what this turn costs, e.g. an inadmissible action;
kept out of the reward and the episode's outcome: the trainer subtracts it from the score of the
sample holding this turn only, and under GiGPO from this turn's step return only, reference
§5.1 / §5.3).

A :class:`Tool` has a name, a JSON-schema of its parameters (OpenAI function format, which
Hugging Face chat templates render) and a call that returns text. A tool-using task is an Env
whose ``step`` parses tool calls out of the response and runs its tools.

Envs never raise because of what the model wrote: malformed or invalid actions become
observation text. An Env that raises anyway ends that episode as failed (the loop counts it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from spear.types import Message


@dataclass(frozen=True, slots=True)
class Task:
    """One task instance: an id, what the agent is asked, and what counts as right."""

    task_id: str
    prompt: str
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class StepResult:
    messages: list[Message]
    reward: float
    terminated: bool
    truncated: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    """A multi-turn text environment holding one episode at a time."""

    def reset(self, task: Task, *, seed: int | None = None) -> tuple[list[Message], dict[str, Any]]:
        """Start an episode of ``task``; return the first messages and info."""
        ...

    def step(self, action_text: str) -> StepResult:
        """Apply the model's response of one turn."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Tool(Protocol):
    """A callable tool the model may invoke by name."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object

    def __call__(self, **arguments: Any) -> str: ...


def tool_schema(tool: Tool) -> dict[str, Any]:
    """The OpenAI-style function schema chat templates expect in ``tools=``."""
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


@runtime_checkable
class TaskSource(Protocol):
    """A seeded, split-aware provider of tasks and of envs that play them."""

    name: str

    def tasks(self, split: str, n: int, seed: int) -> list[Task]:
        """``n`` tasks of ``split`` ("train" or "test"; "validation" where the source has one),
        deterministic in ``seed``; an unknown split raises ``ValueError`` naming the splits."""
        ...

    def make_env(self) -> Env:
        """A fresh env able to play any task of this source."""
        ...

    def tools(self) -> list[Tool]:
        """The tools the model is offered (rendered into the chat template)."""
        ...
