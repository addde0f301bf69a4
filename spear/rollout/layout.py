"""Chat rendering without re-tokenisation drift, and the two sample layouts.

Token bookkeeping. A conversation's token list is grown by appending: the first prompt (the
reset messages rendered with the generation prompt), then each turn's *sampled* ids verbatim,
then only the tokens the chat template puts between the end of that assistant turn and the next
generation prompt (the observation *delta*). The delta is the suffix of
``render(conversation + observation, generation_prompt=True)`` after
``render(conversation)``, starting right after the assistant's end-of-turn marker (so the
newline a Qwen-style template writes after ``<|im_end|>`` belongs to the observation). When the
template is not prefix-stable on the real conversation, the delta is taken on a two-message
stand-in conversation instead (``ObservationTokens.exact`` is then False). A turn whose ids do
not end with the end-of-turn marker (stopped by length, by a stop string, by another stop token,
or empty) gets the marker appended with loss mask 0.

Layouts.
``episode``: one :class:`~spear.types.Sample` per episode holding the whole conversation; sampled
tokens have mask 1, everything else 0 (the math / code-interpreter setting).
``turn``: one Sample per turn whose prompt is re-rendered each turn by a
:data:`TurnPromptFormatter` from the task, the last ``history_length`` (observation, action)
pairs and the current observation (the ALFWorld setting). Each turn sample carries
``turn_index``, ``anchor`` (the raw current observation, for GiGPO) and, in ``turn_reward``, the
env reward of that turn (undiscounted: the advantage stage discounts), and in ``turn_penalty``
the env's ``info["penalty"]`` of that turn (the episode layout's one sample: their sum).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from spear.envs.base import Task
from spear.registry import Registry
from spear.types import Message, Sample

log = logging.getLogger(__name__)

Layout = Literal["episode", "turn"]
LAYOUTS: tuple[Layout, ...] = ("episode", "turn")

_SENTINEL = "Zq7SENTINELq7Z"  # an assistant text no template rewrites
_STAND_IN: list[Message] = [
    {"role": "user", "content": "ping"},
    {"role": "assistant", "content": "pong"},
]


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot render what the loop needs."""


@dataclass(frozen=True, slots=True)
class ObservationTokens:
    ids: list[int]
    exact: bool  # False when the stand-in fallback produced the delta


class ChatFormat:
    """A tokenizer's chat template, bound to the tool schemas offered to the model.

    ``eot_text`` / ``eot_ids``: the marker the template writes after an assistant message
    (``<|im_end|>`` for Qwen, ``<|eot_id|>`` for Llama 3), derived by rendering a probe.
    """

    def __init__(self, tokenizer: Any, tools: Sequence[dict[str, Any]] | None) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ChatTemplateError("the tokenizer has no chat_template")
        self.tokenizer = tokenizer
        self.tools = list(tools) if tools else None
        self.eot_text = end_of_turn_text(tokenizer)
        self.eot_ids = self.encode(self.eot_text)
        if not self.eot_ids:
            raise ChatTemplateError(f"end-of-turn marker {self.eot_text!r} encodes to no tokens")
        self._prompts: dict[str, list[int]] = {}  # prompt_ids of messages rendered before

    def render(self, messages: Sequence[Message], *, generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            list(messages),
            tools=self.tools,
            add_generation_prompt=generation_prompt,
            tokenize=False,
        )
        if not isinstance(text, str):
            raise ChatTemplateError(f"apply_chat_template returned {type(text).__name__}, not str")
        return text

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The ids of ``messages`` followed by the generation prompt (a new list). Rendered and
        encoded once per distinct message list: the rollouts of a group start from the same
        messages, and a format lives for one rollout (:func:`~spear.rollout.loop.run_episodes`)."""
        key = json.dumps(list(messages), sort_keys=True, default=repr)
        ids = self._prompts.get(key)
        if ids is None:
            ids = self._prompts[key] = self.encode(self.render(messages, generation_prompt=True))
        return list(ids)

    def stop_token_ids(self) -> tuple[int, ...]:
        """Stop ids when the sampling params name none: the marker (if one token) and eos."""
        ids = set(self.eot_ids[-1:]) if len(self.eot_ids) == 1 else set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    def ends_turn(self, ids: Sequence[int]) -> bool:
        k = len(self.eot_ids)
        return len(ids) >= k and list(ids[-k:]) == self.eot_ids

    def observation_ids(
        self, conversation: Sequence[Message], observation: Sequence[Message]
    ) -> ObservationTokens:
        """Tokens between the end of the last assistant turn and the next generation prompt."""
        delta = self._delta(conversation, observation)
        if delta is not None:
            return ObservationTokens(self.encode(delta), exact=True)
        delta = self._delta(_STAND_IN, observation)
        if delta is None:
            raise ChatTemplateError("the chat template is not prefix-stable even on a stand-in")
        log.debug("chat template not prefix-stable on this conversation; used the stand-in delta")
        return ObservationTokens(self.encode(delta), exact=False)

    def _delta(self, conversation: Sequence[Message], observation: Sequence[Message]) -> str | None:
        before = self.render(conversation, generation_prompt=False)
        after = self.render([*conversation, *observation], generation_prompt=True)
        if not after.startswith(before):
            return None
        cut = before.rfind(self.eot_text)
        if cut < 0 or before[cut + len(self.eot_text) :].strip():
            return None  # ``before`` does not end with the marker (+ whitespace)
        return before[cut + len(self.eot_text) :] + after[len(before) :]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; never raises (undecodable ids become U+FFFD)."""
        try:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))
        except Exception:  # out-of-vocabulary ids from a foreign engine, broken byte sequences
            pieces = []
            for i in ids:
                try:
                    pieces.append(str(self.tokenizer.decode([i], skip_special_tokens=False)))
                except Exception:
                    pieces.append("\ufffd")
            return "".join(pieces)

    def response_text(self, ids: Sequence[int], stop_ids: Sequence[int]) -> str:
        """The assistant's text: ``ids`` without a trailing marker / stop token."""
        body = list(ids)
        if self.ends_turn(body):
            body = body[: -len(self.eot_ids)]
        elif body and body[-1] in stop_ids:
            body = body[:-1]
        return self.decode(body)


def end_of_turn_text(tokenizer: Any) -> str:
    """What the chat template writes right after an assistant message's content (stripped)."""
    probe: list[Message] = [
        {"role": "user", "content": "ping"},
        {"role": "assistant", "content": _SENTINEL},
    ]
    try:
        text = tokenizer.apply_chat_template(probe, add_generation_prompt=False, tokenize=False)
    except Exception as exc:
        raise ChatTemplateError(
            f"the chat template failed on a user/assistant probe: {exc}"
        ) from exc
    at = text.rfind(_SENTINEL) if isinstance(text, str) else -1
    marker = text[at + len(_SENTINEL) :].strip() if at >= 0 else ""
    if not marker:
        marker = tokenizer.eos_token or ""
    if not marker:
        raise ChatTemplateError("cannot tell how the chat template ends an assistant turn")
    return str(marker)


def message_text(messages: Sequence[Message]) -> str:
    """Plain text of observation messages (their contents, newline-joined)."""
    return "\n".join(str(m.get("content", "")) for m in messages)


# ----------------------------------------------------------------------------------------------
# Token tracks and samples


@dataclass(slots=True)
class TokenTrack:
    """A growing token sequence with its loss mask and behaviour log-probs (all length T)."""

    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add_context(self, ids: Sequence[int]) -> None:
        """Prompt / observation / padding-marker tokens: loss mask 0, log-prob 0."""
        self.ids.extend(int(i) for i in ids)
        self.mask.extend([False] * len(ids))
        self.logprobs.extend([0.0] * len(ids))

    def add_sampled(self, ids: Sequence[int], logprobs: Sequence[float]) -> None:
        """Tokens the model sampled, verbatim: loss mask 1, their sampling log-probs."""
        if len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} sampled ids but {len(logprobs)} log-probs")
        self.ids.extend(int(i) for i in ids)
        self.mask.extend([True] * len(ids))
        self.logprobs.extend(float(x) for x in logprobs)

    def to_sample(self, *, group_id: int, episode_id: int, step: int, turn_index: int) -> Sample:
        return Sample(
            input_ids=torch.tensor(self.ids, dtype=torch.long),
            loss_mask=torch.tensor(self.mask, dtype=torch.bool),
            behavior_logprobs=torch.tensor(self.logprobs, dtype=torch.float32),
            group_id=group_id,
            episode_id=episode_id,
            turn_index=turn_index,
            step=step,
        )


def turn_sample(
    prompt_ids: Sequence[int],
    sampled_ids: Sequence[int],
    sampled_logprobs: Sequence[float],
    closing_ids: Sequence[int],
    *,
    group_id: int,
    episode_id: int,
    step: int,
    turn_index: int,
    anchor: str,
    reward: float,
    penalty: float = 0.0,
) -> Sample:
    """One turn-layout sample: prompt (mask 0) + sampled ids (mask 1) + closing marker (mask 0)."""
    track = TokenTrack()
    track.add_context(prompt_ids)
    track.add_sampled(sampled_ids, sampled_logprobs)
    track.add_context(closing_ids)
    sample = track.to_sample(
        group_id=group_id, episode_id=episode_id, step=step, turn_index=turn_index
    )
    sample.anchor = anchor
    sample.turn_reward = reward
    sample.turn_penalty = penalty
    return sample


# ----------------------------------------------------------------------------------------------
# Turn-layout prompts


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """One past turn: what the agent saw and what it answered."""

    observation: str
    action: str


@dataclass(frozen=True, slots=True)
class TurnContext:
    """Everything a turn prompt may show. ``history`` is already cut to ``history_length``."""

    task: Task
    first_messages: tuple[Message, ...]  # what ``Env.reset`` returned
    history: tuple[TurnRecord, ...]
    observation: tuple[Message, ...]  # the current observation (``first_messages`` at turn 0)
    turn_index: int


TurnPromptFormatter = Callable[[TurnContext], list[Message]]
TURN_PROMPTS: Registry[TurnPromptFormatter] = Registry("turn prompt")


def _system(messages: Sequence[Message]) -> list[Message]:
    return [messages[0]] if messages and messages[0].get("role") == "system" else []


@TURN_PROMPTS.register("history")
def history_turn_prompt(ctx: TurnContext) -> list[Message]:
    """Turn 0: the reset messages. Later: the system message and one user message with the
    task, the last k observation/action pairs and the current observation."""
    if ctx.turn_index == 0:
        return list(ctx.first_messages)
    users = [m for m in ctx.first_messages if m.get("role") == "user"]
    task_text = str(users[-1].get("content", "")) if users else ctx.task.prompt
    lines = [task_text, "", f"You have taken {ctx.turn_index} steps."]
    if ctx.history:
        first = ctx.turn_index - len(ctx.history) + 1
        lines.append(f"Your last {len(ctx.history)} observations and actions:")
        for i, rec in enumerate(ctx.history, start=first):
            lines.append(f"[Observation {i}: {rec.observation!r}, Action {i}: {rec.action!r}]")
    lines += [
        "",
        f"Current observation (step {ctx.turn_index + 1}):",
        message_text(ctx.observation),
    ]
    return [*_system(ctx.first_messages), {"role": "user", "content": "\n".join(lines)}]


@TURN_PROMPTS.register("observation")
def observation_turn_prompt(ctx: TurnContext) -> list[Message]:
    """For envs whose observation already is the whole turn prompt (e.g. TextWorldEnv): the
    system message followed by the current observation messages."""
    if ctx.turn_index == 0:
        return list(ctx.first_messages)
    return [*_system(ctx.first_messages), *ctx.observation]
