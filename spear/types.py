"""Typed records passed between the stages of a training step.

Token convention (used everywhere in spear): every per-token tensor is aligned with ``input_ids``.
``logprobs[t]`` is ``log p(input_ids[t] | input_ids[:t])``; position 0 therefore never carries a
log-prob and is always outside the loss mask. The loss mask is 1 exactly on tokens the model
sampled (assistant output) and 0 on prompt, observation / tool-output and padding tokens.
Sequences are right-padded when collated.

Groups (the G rollouts of one task) and episodes are identified by integer ids carried on every
sample, never by row position.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypedDict

import torch
from torch import Tensor


class Message(TypedDict, total=False):
    """One chat message, as Hugging Face chat templates expect it."""

    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    tool_calls: list[dict[str, Any]]
    name: str


class EndReason(str, enum.Enum):
    """Why an episode stopped."""

    ANSWER = "answer"  # the model gave a final answer (no tool call)
    TERMINATED = "terminated"  # the environment said the episode is over
    MAX_TURNS = "max_turns"
    MAX_TOKENS = "max_tokens"  # total response-token budget of the episode used up
    CONTEXT = "context"  # the next prompt would not fit the model's context
    ENV_ERROR = "env_error"  # the environment or a tool crashed; the episode counts as failed


@dataclass(slots=True)
class Sample:
    """One training sequence on the CPU, unpadded.

    Shapes: ``input_ids``, ``loss_mask`` and ``behavior_logprobs`` are all ``[T]``.
    ``behavior_logprobs[t]`` is the log-prob under which ``input_ids[t]`` was sampled (0 where
    ``loss_mask`` is 0). ``score`` is the scalar reward used for advantages (outcome + intrinsic
    tool bonus - penalties); ``advantage`` is filled by the advantage stage.
    """

    input_ids: Tensor  # [T] long
    loss_mask: Tensor  # [T] bool
    behavior_logprobs: Tensor  # [T] float32
    group_id: int
    episode_id: int
    turn_index: int = 0
    outcome_reward: float = 0.0
    tool_bonus: float = 0.0
    penalty: float = 0.0
    score: float = 0.0
    advantage: float = 0.0
    turn_reward: float = 0.0  # environment reward of this turn (turn layout); GiGPO discounts it
    turn_penalty: float = 0.0  # the env's info["penalty"] of this sample's turn(s): its score only
    anchor: str | None = None  # GiGPO anchor observation (turn layout)
    step: int = 0  # training step at which it was collected
    filtered_by: tuple[str, ...] = ()  # names of response filters that removed it

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_response_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def is_filtered(self) -> bool:
        return bool(self.filtered_by)


@dataclass(slots=True)
class Episode:
    """What happened in one rollout of one task: the record the agent loop returns."""

    task_id: str
    group_id: int
    episode_id: int
    samples: list[Sample]
    end_reason: EndReason
    outcome_reward: float
    success: bool
    num_turns: int
    num_tool_calls: int  # parsed, valid tool calls
    num_invalid_tool_calls: int  # malformed JSON, unknown tools, bad arguments, ...
    num_tool_errors: int = 0  # tools that raised, timed out, exceeded limits
    num_invalid_actions: int = 0  # text games: turns whose action was missing or inadmissible
    response_text: str = ""  # the model's text of the last turn (for filters and logging)
    final_answer: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class TokenBatch:
    """Padded tensors for a forward/backward pass. All ``[N, T]`` unless noted."""

    input_ids: Tensor  # [N, T] long, right-padded
    attention_mask: Tensor  # [N, T] long
    loss_mask: Tensor  # [N, T] float (1 on sampled tokens of unfiltered samples)
    old_logprobs: Tensor  # [N, T] float
    advantages: Tensor  # [N, T] float (0 outside loss_mask)
    group_ids: Tensor  # [N] long
    episode_ids: Tensor  # [N] long

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def collate(cls, samples: Sequence[Sample], pad_id: int) -> TokenBatch:
        """Right-pad ``samples`` into one batch; a filtered sample gets an all-zero loss mask."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        n, t = len(samples), max(s.num_tokens for s in samples)
        ids = torch.full((n, t), pad_id, dtype=torch.long)
        attn = torch.zeros((n, t), dtype=torch.long)
        mask = torch.zeros((n, t), dtype=torch.float32)
        old = torch.zeros((n, t), dtype=torch.float32)
        adv = torch.zeros((n, t), dtype=torch.float32)
        for i, s in enumerate(samples):
            k = s.num_tokens
            ids[i, :k] = s.input_ids
            attn[i, :k] = 1
            if not s.is_filtered:
                mask[i, :k] = s.loss_mask.float()
            old[i, :k] = s.behavior_logprobs
            adv[i, :k] = s.advantage
        adv *= mask
        mask[:, 0] = 0.0  # position 0 has no log-prob (token convention)
        return cls(
            input_ids=ids,
            attention_mask=attn,
            loss_mask=mask,
            old_logprobs=old,
            advantages=adv,
            group_ids=torch.tensor([s.group_id for s in samples], dtype=torch.long),
            episode_ids=torch.tensor([s.episode_id for s in samples], dtype=torch.long),
        )

    def to(self, device: torch.device | str) -> TokenBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, rows: Tensor | slice) -> TokenBatch:
        """Rows ``rows`` of every tensor, trimmed to the longest remaining sequence."""
        picked = {f.name: getattr(self, f.name)[rows] for f in fields(self)}
        width = (
            int(picked["attention_mask"].sum(dim=1).max().item())
            if picked["attention_mask"].numel()
            else 0
        )
        for name in ("input_ids", "attention_mask", "loss_mask", "old_logprobs", "advantages"):
            picked[name] = picked[name][:, : max(width, 1)]
        return TokenBatch(**picked)
