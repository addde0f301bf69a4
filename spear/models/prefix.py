"""Run a decoder once per shared prefix instead of once per row (training and scoring passes).

The rows of a training batch repeat most of their tokens: every row starts with the same system
prompt, and the G rollouts of a task share the whole task prompt. Token ``t``'s hidden state
depends only on tokens ``<= t`` (causal attention), so a prefix common to several rows can be
run once and its KV cache handed to each of them. A :class:`PrefixPlan` arranges the rows as a
three-level tree:

1. the prefix common to *all* rows (batch of one);
2. each distinct rest-of-prompt (the part of the prompt a group shares), on top of level 1;
3. each row's own suffix (its last prompt token and everything after), on top of its level-2
   parent.

Each level is one decoder call with the previous level's KV cache (expanded to its rows by
index, so gradients flow back to the shared prefix and add up) and a 2-D attention mask that
covers cache + new tokens; padding inside a level is a hole in that mask, and position ids are
given explicitly, so every real token sees exactly the keys and positions it sees in a plain
forward pass. The values equal the plain pass up to float rounding (different matrix shapes).

Only the last level's hidden states come back: a plan is built from ``shareable`` lengths, the
number of leading tokens of each row whose outputs nobody reads (for log-probs: everything
before the last token preceding the first scored position).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

MIN_SAVING = 0.25  # use a plan only if it runs at least this fraction fewer token positions


def cache_kwarg(model: nn.Module) -> str:
    """The forward argument taking the KV cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older releases)."""
    unwrap = getattr(model, "get_base_model", None)  # peft wrappers
    base = unwrap() if callable(unwrap) else model
    try:
        names = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in names else "past_key_values"


def cache_of(out: Any) -> Any:
    """The KV cache a transformers forward returned (``cache`` or ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass(frozen=True, slots=True)
class PrefixLevel:
    """One decoder call of a plan. ``R`` rows of width ``W``."""

    ids: Tensor  # [R, W] long, right-padded
    mask: Tensor  # [R, W] long, 1 on real tokens
    start: Tensor  # [R] long: position id of column 0
    parent: Tensor | None  # [R] long: row of the previous level each row continues (None: first)


@dataclass(frozen=True, slots=True)
class PrefixPlan:
    """Levels to run in order; the last has one row per input row, in input order."""

    levels: tuple[PrefixLevel, ...]
    suffix_start: Tensor  # [N] long: input column of the last level's column 0, per row
    positions: int  # token positions the plan runs (sum of R * W over levels)
    plain_positions: int  # token positions a plain pass runs (N * T)


def _right_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _common_prefix_length(input_ids: Tensor, limit: int) -> int:
    """Length of the prefix all rows of ``input_ids [N, T]`` share, at most ``limit``."""
    same = (input_ids[:, :limit] == input_ids[:1, :limit]).all(dim=0)  # [limit]
    return int(same.long().cumprod(dim=0).sum())


def plan_shared_prefix(
    input_ids: Tensor, attention_mask: Tensor, shareable: Tensor, *, pad_id: int = 0
) -> PrefixPlan | None:
    """A plan for right-padded ``input_ids [N, T]`` whose first ``shareable [N]`` tokens per row
    need no output, or None when sharing would save less than :data:`MIN_SAVING` of the
    positions (or no prefix is common to all rows: every query must see at least one key).
    """
    n, t = input_ids.shape
    device = input_ids.device
    lengths = attention_mask.sum(dim=1)  # [N]
    q = torch.minimum(shareable.to(lengths.device), lengths - 1).clamp(min=0)  # [N]
    q_min = int(q.min())
    if n < 2 or q_min < 1:
        return None
    l0 = _common_prefix_length(input_ids, q_min)
    if l0 < 1:
        return None
    ids, q_list, len_list = input_ids.tolist(), q.tolist(), lengths.tolist()
    keys = [tuple(ids[i][l0 : q_list[i]]) for i in range(n)]
    distinct: dict[tuple[int, ...], int] = {}
    inverse = [distinct.setdefault(k, len(distinct)) for k in keys]
    first = PrefixLevel(
        ids=input_ids[:1, :l0],
        mask=attention_mask[:1, :l0],
        start=torch.zeros(1, dtype=torch.long, device=device),
        parent=None,
    )
    levels = [first]
    if len(distinct) < n and any(keys):  # a group level pays off
        mid_ids, mid_mask = _right_pad([list(k) for k in distinct], pad_id, device)
        levels.append(
            PrefixLevel(
                mid_ids,
                mid_mask,
                torch.full((len(distinct),), l0, dtype=torch.long, device=device),
                torch.zeros(len(distinct), dtype=torch.long, device=device),
            )
        )
        parent = torch.as_tensor(inverse, dtype=torch.long, device=device)
        starts = q_list
    else:
        parent = torch.zeros(n, dtype=torch.long, device=device)
        starts = [l0] * n
    suf_ids, suf_mask = _right_pad(
        [ids[i][starts[i] : len_list[i]] for i in range(n)], pad_id, device
    )
    start = torch.as_tensor(starts, dtype=torch.long, device=device)
    levels.append(PrefixLevel(suf_ids, suf_mask, start, parent))
    positions = sum(lv.ids.numel() for lv in levels)
    if positions > (1 - MIN_SAVING) * n * t:
        return None
    return PrefixPlan(tuple(levels), start, positions, n * t)


def run_prefix_plan(decoder: nn.Module, plan: PrefixPlan) -> Tensor:
    """The decoder's last hidden states of the plan's last level, ``[N, W, H]``: row ``i``
    column ``j`` is input column ``plan.suffix_start[i] + j`` (padding beyond each row's end)."""
    kwarg = cache_kwarg(decoder)
    cache: Any = None
    seen: Tensor | None = None  # [R, K] mask of every key position the cache holds
    out: Any = None
    for level in plan.levels:
        if cache is not None and level.parent is not None and seen is not None:
            cache.batch_select_indices(level.parent)  # differentiable row expansion
            seen = seen[level.parent]
        mask = level.mask if seen is None else torch.cat([seen, level.mask], dim=1)
        width = level.ids.shape[1]
        positions = level.start[:, None] + torch.arange(width, device=level.ids.device)
        extra = {kwarg: cache} if cache is not None else {}
        out = decoder(
            input_ids=level.ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **extra,
        )
        cache, seen = cache_of(out), mask
    return out.last_hidden_state
