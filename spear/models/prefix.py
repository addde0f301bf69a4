"""Run a decoder once per shared prefix instead of once per row (training, scoring, prefill).

The rows of a training batch repeat most of their tokens: every row starts with the same system
prompt, and the G rollouts of a task share the whole task prompt. Token ``t``'s hidden state
depends only on tokens ``<= t`` (causal attention), so a prefix common to several rows can be
run once and its KV cache handed to each of them. A :class:`PrefixPlan` arranges the rows as a
tree of at most three levels:

1. the prefix common to *all* rows (batch of one);
2. each group's shared rest of prompt (groups of rows found by :func:`group_runs`), on top of
   level 1 (skipped when no group has two rows);
3. the tails: each row's own tokens (its last prompt token and everything after), on top of
   its level-2 parent, in up to a few calls of rows of similar length (:func:`split_by_length`).

Each level is one decoder call with the previous level's KV cache (expanded to its rows by
index, so gradients flow back to the shared prefix and add up) and a 2-D attention mask that
covers cache + new tokens; padding inside a level is a hole in that mask, and position ids are
given explicitly, so every real token sees exactly the keys and positions it sees in a plain
forward pass. The values equal the plain pass up to float rounding (different matrix shapes).

Only the tails' outputs come back: a plan is built from ``shareable`` lengths, the number of
leading tokens of each row whose outputs nobody reads (for log-probs: everything before the
last token preceding the first scored position; for sampling: all but the last prompt token).
"""

from __future__ import annotations

import functools
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
    cls: Any = type(base)
    return _cache_kwarg_of(cls)


@functools.cache
def _cache_kwarg_of(cls: Any) -> str:
    try:
        names = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in names else "past_key_values"


def cache_of(out: Any) -> Any:
    """The KV cache a transformers forward returned (``cache`` or ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def supports_prefix_sharing(config: Any) -> bool:
    """Whether a model with this (transformers) config can run a prefix plan: every layer must be
    full causal attention, which the plan's index-space masks with holes reproduce exactly.
    Sliding-window layers measure their window in cache columns (the holes would shift it) and
    linear-attention / recurrent layers keep no per-token keys to hand on."""
    if config is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return False
    window = getattr(text, "sliding_window", None)
    return window is None or getattr(text, "use_sliding_window", True) is False


@dataclass(frozen=True, slots=True)
class PrefixLevel:
    """One decoder call of a plan. ``R`` rows of width ``W``."""

    ids: Tensor  # [R, W] long, padded
    mask: Tensor  # [R, W] long, 1 on real tokens
    positions: Tensor  # [R, W] long: position id of every column
    parent: Tensor | None  # [R] long: row of the previous level each row continues (None: first)


@dataclass(frozen=True, slots=True)
class PrefixPlan:
    """Shared levels to run in order, then the tails: every input row's own last tokens, in one
    or more calls (rows of similar length together), each continuing the last shared level.

    Hidden state of input ``(row, col)`` (``col >= suffix_start[row]``) in the tails' outputs
    flattened and concatenated (``[sum R * W, H]``): ``row_base[row] + col - suffix_start[row]``.
    """

    levels: tuple[PrefixLevel, ...]
    tails: tuple[PrefixLevel, ...]
    suffix_start: Tensor  # [N] long: input column of each row's first tail token
    row_base: Tensor  # [N] long: flat index of each row's first tail column
    positions: int  # token positions the plan runs (sum of R * W over levels and tails)
    plain_positions: int  # token positions a plain padded pass runs


TAIL_CALL_COST = 64  # positions one extra tail call is worth (its fixed per-call overhead)


def split_by_length(lengths: list[int], max_parts: int) -> list[list[int]]:
    """Rows (indices of ``lengths``) in at most ``max_parts`` parts of similar length, so that
    padding each part to its longest row plus :data:`TAIL_CALL_COST` per part is smallest
    (dynamic programming over the rows sorted by length). Shortest part first; each part's
    rows in input order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n, inf = len(order), float("inf")
    # cost[k][j]: the first j sorted rows in k parts; the part (i, j] costs (j - i) * len(j - 1)
    cost = [[inf] * (n + 1) for _ in range(max_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(max_parts + 1)]
    cost[0][0] = 0.0
    for k in range(1, max_parts + 1):
        for j in range(1, n + 1):
            width = lengths[order[j - 1]]
            for i in range(j):
                c = cost[k - 1][i] + (j - i) * width + TAIL_CALL_COST
                if c < cost[k][j]:
                    cost[k][j], cut[k][j] = c, i
    k = min(range(1, max_parts + 1), key=lambda m: cost[m][n])
    parts, j = [], n
    while j > 0:
        i = cut[k][j]
        parts.append(sorted(order[i:j]))
        j, k = i, k - 1
    return parts[::-1]


def _pad(
    rows: list[list[int]], starts: list[int], device: torch.device, *, left: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``rows`` padded to one width (pad id 0, mask 0), with the position ids of each column:
    ``starts[i] + k`` for row ``i``'s ``k``-th token (pads take the nearest real position)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offset = torch.zeros(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        at = width - len(r) if left else 0
        ids[i, at : at + len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, at : at + len(r)] = 1
        offset[i] = at
    cols = torch.arange(width)[None, :] - offset[:, None]  # [R, W]
    positions = torch.as_tensor(starts, dtype=torch.long)[:, None] + cols.clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def group_runs(rests: list[list[int]]) -> tuple[list[int], list[int]]:
    """Group rows so each group runs a common prefix once: ``(group of each row, shared length of
    each group)``.

    Rows are sorted; a group is a run of adjacent sorted rows sharing their first ``g`` tokens
    (``g`` = the smallest adjacent common-prefix length in the run). Runs are chosen by dynamic
    programming to maximise the saved positions ``sum (|run| - 1) * g``. A lone row shares its
    whole rest (it is run once either way)."""
    n = len(rests)
    order = sorted(range(n), key=lambda i: rests[i])
    adj = [0] + [_lcp(rests[order[j - 1]], rests[order[j]]) for j in range(1, n)]
    best = [0] * (n + 1)  # best[j]: most saved positions over the first j sorted rows
    cut = list(range(n))  # cut[j - 1]: where the last run of the first j rows starts
    for j in range(1, n + 1):
        best[j], cut[j - 1] = best[j - 1], j - 1
        g = 1 << 62
        for i in range(j - 2, -1, -1):  # the run is sorted rows i .. j - 1
            g = min(g, adj[i + 1])
            if g == 0:
                break
            if best[i] + (j - 1 - i) * g > best[j]:
                best[j], cut[j - 1] = best[i] + (j - 1 - i) * g, i
    group, shared = [0] * n, list[int]()
    j = n
    while j > 0:
        i = cut[j - 1]
        rows = order[i:j]
        g = min(adj[i + 1 : j]) if j - i > 1 else len(rests[rows[0]])
        for r in rows:
            group[r] = len(shared)
        shared.append(g)
        j = i
    renumber: dict[int, int] = {}  # groups in order of their first row
    for k in group:
        renumber.setdefault(k, len(renumber))
    return [renumber[k] for k in group], [
        shared[k] for k in sorted(renumber, key=lambda k: renumber[k])
    ]


def plan_prefix_tree(
    seqs: list[list[int]],
    shareable: list[int],
    device: torch.device,
    *,
    left_pad_last: bool = False,
    tail_parts: int = 1,
    plain_positions: int | None = None,
) -> PrefixPlan | None:
    """A plan for token sequences ``seqs`` whose first ``shareable[i]`` tokens need no output,
    or None when it would save less than :data:`MIN_SAVING` of ``plain_positions`` (default:
    all rows padded to the longest) or no token is common to all rows (every query must see at
    least one key). ``left_pad_last`` left-pads the tails, so every row's last token is in its
    last column (for sampling); otherwise they are right-padded. ``tail_parts`` > 1 splits the
    rows' own tokens into up to that many calls by length (:func:`split_by_length`)."""
    n = len(seqs)
    q = [max(0, min(s, len(x) - 1)) for s, x in zip(shareable, seqs)]
    if n < 2 or min(q) < 1:
        return None
    l0 = min(min(q), min(_lcp(seqs[0], x) for x in seqs[1:]))
    if l0 < 1:
        return None
    group, shared = group_runs([x[l0:qi] for x, qi in zip(seqs, q)])
    lead = [seqs[group.index(k)][l0 : l0 + g] for k, g in enumerate(shared)]
    ids0, mask0, pos0 = _pad([seqs[0][:l0]], [0], device, left=False)
    levels = [PrefixLevel(ids0, mask0, pos0, None)]
    if any(lead) and len(shared) < n:  # a group level pays off
        ids1, mask1, pos1 = _pad(lead, [l0] * len(lead), device, left=False)
        zeros = torch.zeros(len(lead), dtype=torch.long, device=device)
        levels.append(PrefixLevel(ids1, mask1, pos1, zeros))
        parent = torch.as_tensor(group, dtype=torch.long, device=device)
        starts = [l0 + shared[k] for k in group]
    else:
        parent = torch.zeros(n, dtype=torch.long, device=device)
        starts = [l0] * n
    tails, bases, base = [], [0] * n, 0
    rests = [x[s:] for x, s in zip(seqs, starts)]
    parts = (
        split_by_length([len(r) for r in rests], tail_parts) if tail_parts > 1 else [[*range(n)]]
    )
    for rows in parts:
        ids2, mask2, pos2 = _pad(
            [rests[r] for r in rows], [starts[r] for r in rows], device, left=left_pad_last
        )
        picked = torch.as_tensor(rows, dtype=torch.long, device=device)
        tails.append(PrefixLevel(ids2, mask2, pos2, parent[picked]))
        for k, r in enumerate(rows):
            bases[r] = base + k * ids2.shape[1]
        base += ids2.numel()
    positions = sum(lv.ids.numel() for lv in levels) + base
    plain = plain_positions if plain_positions is not None else n * max(len(x) for x in seqs)
    if positions > (1 - MIN_SAVING) * plain:
        return None
    return PrefixPlan(
        tuple(levels),
        tuple(tails),
        torch.as_tensor(starts, dtype=torch.long, device=device),
        torch.as_tensor(bases, dtype=torch.long, device=device),
        positions,
        plain,
    )


def plan_shared_prefix(
    input_ids: Tensor, attention_mask: Tensor, shareable: Tensor, *, tail_parts: int = 3
) -> PrefixPlan | None:
    """:func:`plan_prefix_tree` of a right-padded batch ``input_ids [N, T]`` whose first
    ``shareable [N]`` tokens per row need no output; right-padded tails, split by length (one
    tail with transformers releases whose caches have no ``layers``, see :func:`cache_rows`)."""
    if not _caches_have_layers():
        tail_parts = 1
    lengths = attention_mask.sum(dim=1).tolist()
    ids = input_ids.tolist()
    seqs = [row[:k] for row, k in zip(ids, lengths)]
    return plan_prefix_tree(
        seqs,
        shareable.tolist(),
        input_ids.device,
        tail_parts=tail_parts,
        plain_positions=input_ids.numel(),
    )


@functools.cache
def _caches_have_layers() -> bool:
    from transformers import DynamicCache

    return hasattr(DynamicCache(), "layers")


class _RowSelect(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward adds the rows' gradients up by ``index_add_``
    on a contiguous copy of them. The gradient of a cache's keys is a slice of the ``torch.cat``
    that appended the next level's keys, not contiguous, and for such a source PyTorch's CPU
    ``index_add_`` (the stock backward) falls back to a ``scatter_add_`` over an expanded index,
    four to five times slower at these shapes."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.rows, *grad.shape[1:]))
        return out.index_add_(0, index, grad.contiguous()), None


def rows_of(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``index [R]`` of ``x [N, ...]``, differentiable (:class:`_RowSelect`)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.index_select(0, index)
    out: Tensor = _RowSelect.apply(x, index)
    return out


def cache_rows(cache: Any, index: Tensor) -> Any:
    """A new transformers ``DynamicCache`` holding rows ``index`` of ``cache`` (left intact);
    differentiable like any indexing."""
    from transformers import DynamicCache

    return DynamicCache(
        ddp_cache_data=[
            (rows_of(lay.keys, index), rows_of(lay.values, index)) for lay in cache.layers
        ]
    )


def select_rows(cache: Any, index: Tensor) -> None:
    """Keep rows ``index`` of every layer of ``cache``, in place: what transformers'
    ``batch_select_indices`` does, by ``index_select`` instead of advanced indexing where the
    layers are plain ``DynamicLayer`` s (the same values; on CPU its backward, an ``index_add``,
    is two to three times faster than the accumulating ``index_put`` of advanced indexing).
    Other layer kinds (spear's sampling cache, layers with extra state) select their own rows."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or any(type(lay) is not DynamicLayer for lay in layers):
        cache.batch_select_indices(index)
        return
    for lay in layers:
        if lay.get_seq_length() > 0:
            lay.keys, lay.values = rows_of(lay.keys, index), rows_of(lay.values, index)


def _call(
    decoder: nn.Module, level: PrefixLevel, cache: Any, seen: Tensor | None, last: dict
) -> tuple[Any, Tensor]:
    mask = level.mask if seen is None else torch.cat([seen, level.mask], dim=1)
    extra = {cache_kwarg(decoder): cache} if cache is not None else {}
    out = decoder(
        input_ids=level.ids,
        attention_mask=mask,
        position_ids=level.positions,
        use_cache=True,
        **extra,
        **last,
    )
    return out, mask


def run_prefix_plan(
    decoder: nn.Module, plan: PrefixPlan, *, cache: Any = None, **last: Any
) -> list[tuple[Any, Tensor]]:
    """Run the plan through ``decoder`` (a transformers decoder or causal LM). Returns, per tail,
    its output (its ``cache`` holds every key and value its rows see) and the attention mask
    ``[R, K]`` over them; ``last`` are extra arguments of every call (e.g.
    ``logits_to_keep=1``); ``cache`` is an empty cache for the first level to fill (None: the
    model's default). See :class:`PrefixPlan` for where each input column's hidden state is."""
    seen: Tensor | None = None  # [R, K] mask of every key position the cache holds
    for level in plan.levels:
        if level.parent is not None and seen is not None:
            select_rows(cache, level.parent)  # differentiable row expansion
            seen = seen[level.parent]
        out, seen = _call(decoder, level, cache, seen, last)
        cache = cache_of(out)
    assert seen is not None
    outs = []
    for i, tail in enumerate(plan.tails):
        assert tail.parent is not None
        if i == len(plan.tails) - 1:  # the last tail may take the shared cache itself
            rows = cache
            select_rows(rows, tail.parent)
        else:
            rows = cache_rows(cache, tail.parent)
        outs.append(_call(decoder, tail, rows, seen[tail.parent], last))
    return outs
