"""Keep each row's KV cache from one ``generate`` call to the next (the turns of an episode).

In the ``episode`` layout a turn's prompt is the previous turn's prompt, the tokens sampled in
it and the observation's tokens, appended (:mod:`spear.rollout.layout`). Without help the
engine prefills that whole conversation again every turn, although it computed the keys and
values of everything but the last sampled token while sampling. :class:`TurnCache` keeps, for
every row of a call, its cache (the batch's buffers, by reference: dropping a finished row copies
nothing extra) and the token sequence those keys belong to. When every prompt of the next call
continues a kept sequence, :meth:`TurnCache.continue_rows` gathers the rows' kept columns into
one cache and only the new tokens are run (:func:`run_continuation`).

The new parts are ragged: most rows add the last sampled token and a short observation, a few a
long one (an error message). Padded to the longest, one call would run mostly padding, so the
new columns (right-aligned, every row's last token in the last column) are cut into stages by
depth from the right (:func:`ragged_stages`): the leftmost stage runs only the rows long enough
to reach into it, each next stage the rows reaching into its columns, the last one every row;
each stage writes its rows' keys into the one cache the next stages and the sampler read.

The kept keys equal a fresh prefill's up to float rounding: same weights (checked by the
parameters' storage and version counters, so an optimizer step or a weight load drops the
store), same tokens, same position ids (each row's own, as in every prefill of the engine).
Columns a row does not own (padding, holes of the prefix tree, tokens fed after the row had
finished) are holes of the attention mask. Only the previous call's rows are kept; a call whose
prompts do not all continue a kept row prefills from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from spear.models.kv_cache import SPARE, GrowingLayer, growing_cache
from spear.models.prefix import TAIL_CALL_COST, cache_kwarg

MAX_STAGES = 3  # calls a continuation prefill is cut into at most (ragged_stages)


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Rows of one batch, taken when they left it. ``n`` rows, ``C`` columns."""

    keys: list[Tensor]  # per layer [B, H, >= C, D]: the batch's buffers, rows ``rows`` kept
    values: list[Tensor]
    rows: Tensor  # [n] long: batch positions of the kept rows
    mask: Tensor  # [n, C] long: 1 on the columns each row owns


@dataclass(frozen=True, slots=True)
class LeadStage:
    """A call run before a continuation's last one: new columns ``[start, end)`` of rows ``rows``
    (the rows whose new tokens reach into them)."""

    rows: Tensor  # [R] long
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Continuation:
    """A prefill of only the new tokens of rows that continue kept rows (``N`` rows): the
    ``leads`` in order, then new columns ``[main_start, S)`` of every row (:func:`run_continuation`)."""

    cache: Any  # a growing cache of ``C`` kept columns per row
    ids: Tensor  # [N, S] long: each row's new tokens, left-padded
    mask: Tensor  # [N, C + S] long: attention mask over kept columns and new tokens
    positions: Tensor  # [N, S] long
    next_pos: Tensor  # [N] long: position of the first sampled token
    leads: tuple[LeadStage, ...] = ()
    main_start: int = 0  # new columns before it are run by the leads (or are padding)


def ragged_stages(lengths: Sequence[int], max_stages: int = MAX_STAGES) -> list[int]:
    """Depths ``t_1 < ... < t_k = max(lengths)`` (``k <= max_stages``) that cut right-aligned
    rows of ``lengths`` into calls: call ``j`` runs the columns at depths ``(t_{j-1}, t_j]``
    from the right (``t_0 = 0``) for the rows longer than ``t_{j-1}``. Chosen by dynamic
    programming to run the fewest positions, with :data:`~spear.models.prefix.TAIL_CALL_COST`
    per extra call; ``[max(lengths)]`` is one call padded to the longest row."""
    cands = [0, *sorted(set(lengths))]
    longer = [sum(1 for x in lengths if x > t) for t in cands]  # rows reaching past depth t
    inf = float("inf")
    # best[k][b]: cheapest cover of depths (0, cands[b]] by k calls; cut: where the last began
    best = [[inf] * len(cands) for _ in range(max_stages + 1)]
    cut = [[0] * len(cands) for _ in range(max_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, max_stages + 1):
        for b in range(1, len(cands)):
            for a in range(b):
                c = best[k - 1][a] + longer[a] * (cands[b] - cands[a]) + TAIL_CALL_COST
                if c < best[k][b]:
                    best[k][b], cut[k][b] = c, a
    last = len(cands) - 1
    k = min(range(1, max_stages + 1), key=lambda m: best[m][last])
    depths, b = [], last
    while b > 0:
        depths.append(cands[b])
        b, k = cut[k][b], k - 1
    return depths[::-1]


def _stages(lengths: list[int], width: int, device: torch.device) -> tuple[list[LeadStage], int]:
    """The lead stages of new parts ``lengths`` right-aligned in ``width`` columns, deepest
    first, and the column where the last call starts."""
    depths = ragged_stages(lengths)
    leads = []
    for shallow, deep in zip(depths[-2::-1], depths[:0:-1]):  # (t_{j-1}, t_j], deepest first
        rows = [i for i, x in enumerate(lengths) if x > shallow]
        leads.append(LeadStage(torch.as_tensor(rows, device=device), width - deep, width - shallow))
    return leads, width - depths[0]


def run_continuation(model: nn.Module, cont: Continuation, **last: Any) -> Any:
    """Run ``cont``'s new tokens through ``model`` on top of the kept columns: each lead stage
    on its rows' own copy of the cache, its keys then written into ``cont.cache``; then the last
    call over every row, whose output (``last``: extra arguments, e.g. ``logits_to_keep=1``)
    is returned, its cache holding every row's columns."""
    kwarg = cache_kwarg(model)
    kept = cont.mask.shape[1] - cont.ids.shape[1]
    for st in cont.leads:
        end = kept + st.end
        sub = growing_cache([lay.gather_rows(st.rows, end) for lay in cont.cache.layers])
        model(
            input_ids=cont.ids[st.rows, st.start : st.end],
            attention_mask=cont.mask[st.rows, :end],
            position_ids=cont.positions[st.rows, st.start : st.end],
            use_cache=True,
            logits_to_keep=1,
            **{kwarg: sub},
        )
        for lay, part in zip(cont.cache.layers, sub.layers):
            lay.put_rows(st.rows, part, kept + st.start, end)
    s = cont.main_start
    return model(
        input_ids=cont.ids[:, s:],
        attention_mask=cont.mask,
        position_ids=cont.positions[:, s:],
        use_cache=True,
        **{kwarg: cont.cache},
        **last,
    )


@dataclass(slots=True)
class _Store:
    chunks: list[_Chunk] = field(default_factory=list)
    where: dict[tuple[int, ...], tuple[int, int]] = field(default_factory=dict)  # -> chunk, row
    lengths: set[int] = field(default_factory=set)


def weights_version(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Storage address and in-place version counter of every parameter: changes whenever an
    optimizer step, ``load_state_dict`` or ``.to()`` changes the weights."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


class TurnCache:
    """The rows of the last ``generate`` call, to continue in the next one."""

    def __init__(self) -> None:
        self._kept = _Store()  # read by this call
        self._next = _Store()  # filled by this call
        self._version: tuple[tuple[int, int], ...] | None = None

    def begin(self, model: nn.Module) -> None:
        """Start a call: forget the kept rows if the weights changed since they were kept."""
        version = weights_version(model)
        if version != self._version:
            self._kept = _Store()
        self._version = version

    def finish(self) -> None:
        """End a call: its rows become the kept ones."""
        self._kept, self._next = self._next, _Store()

    def clear(self) -> None:
        """Drop every kept row (frees their memory)."""
        self._kept, self._next = _Store(), _Store()

    def __len__(self) -> int:
        return len(self._kept.where)

    def keep(
        self, cache: Any, attn: Tensor, positions: Sequence[int], seqs: Sequence[Sequence[int]]
    ) -> None:
        """Keep batch rows ``positions`` of ``cache`` (attention mask ``attn [B, K]``); row
        ``positions[i]`` holds the keys of ``seqs[i]`` in its first columns that ``attn``
        marks, the rest of them being tokens fed after it finished."""
        if not positions:
            return
        rows = torch.as_tensor(list(positions), dtype=torch.long, device=attn.device)
        mask = attn[rows]  # [n, K] (a copy)
        owned = mask.cumsum(dim=1)  # [n, K]: real columns up to here
        lengths = torch.as_tensor([len(s) for s in seqs], dtype=torch.long, device=attn.device)
        mask = mask * (owned <= lengths[:, None])
        width = int(mask.any(dim=0).nonzero().max()) + 1 if bool(mask.any()) else 1
        chunk = _Chunk(
            [lay.keys for lay in cache.layers],
            [lay.values for lay in cache.layers],
            rows,
            mask[:, :width],
        )
        store = self._next
        store.chunks.append(chunk)
        for i, s in enumerate(seqs):
            store.where[tuple(s)] = (len(store.chunks) - 1, i)
            store.lengths.add(len(s))

    def _find(self, prompt: Sequence[int], lengths: list[int]) -> tuple[int, int, int] | None:
        """``(chunk, row, length)`` of the longest kept sequence that is a proper prefix
        (``lengths``: the kept lengths, longest first)."""
        for length in lengths:
            if length < len(prompt):
                hit = self._kept.where.get(tuple(prompt[:length]))
                if hit is not None:
                    return (*hit, length)
        return None

    def continue_rows(
        self, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
    ) -> Continuation | None:
        """The prefill of ``prompts`` on top of their kept rows, or None unless every prompt
        continues one."""
        if not self._kept.where:
            return None
        lengths = sorted(self._kept.lengths, reverse=True)
        hits = [self._find(p, lengths) for p in prompts]
        if any(h is None for h in hits):
            return None
        found = [h for h in hits if h is not None]
        width = max(self._kept.chunks[c].mask.shape[1] for c, _, _ in found)
        suffixes = [list(p[k:]) for p, (_, _, k) in zip(prompts, found)]
        new = max(len(s) for s in suffixes)
        n = len(prompts)
        mask = torch.zeros((n, width + new), dtype=torch.long, device=device)
        leads, main_start = _stages([len(s) for s in suffixes], new, device)
        layers = self._gather(found, width, width + main_start, width + new + SPARE, mask)
        ids = torch.full((n, new), pad_id, dtype=torch.long)
        positions = torch.zeros((n, new), dtype=torch.long)
        for i, (s, (_, _, k)) in enumerate(zip(suffixes, found)):
            ids[i, new - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            positions[i, new - len(s) :] = torch.arange(k, k + len(s))
            mask[i, width + new - len(s) :] = 1
        return Continuation(
            growing_cache(layers),
            ids.to(device),
            mask,
            positions.to(device),
            torch.as_tensor([len(p) for p in prompts], dtype=torch.long, device=device),
            tuple(leads),
            main_start,
        )

    def _gather(
        self,
        found: list[tuple[int, int, int]],
        width: int,
        leads_end: int,
        capacity: int,
        mask: Tensor,
    ) -> list[GrowingLayer]:
        """Copy the found rows' kept columns into new buffers; fill ``mask[:, :width]``. Columns
        a row's copy or the calls leave unwritten below ``leads_end`` (its holes: a narrower
        chunk's, the lead stages' of other rows) are zeroed: attention reads them, masked, and
        a masked NaN would still spread; later columns are written before anything reads them."""
        chunks = self._kept.chunks
        first = chunks[found[0][0]]
        layers = []
        for li in range(len(first.keys)):
            k0, v0 = first.keys[li], first.values[li]
            n, h, d, dv = len(found), k0.shape[1], k0.shape[3], v0.shape[3]
            kbuf = k0.new_empty((n, h, capacity, d))
            vbuf = v0.new_empty((n, h, capacity, dv))
            kbuf[:, :, width:leads_end] = 0
            vbuf[:, :, width:leads_end] = 0
            layers.append(GrowingLayer.holding(kbuf, vbuf, width))
        by_chunk: dict[int, tuple[list[int], list[int]]] = {}
        for i, (c, r, _) in enumerate(found):
            dest, src = by_chunk.setdefault(c, ([], []))
            dest.append(i)
            src.append(r)
        for c, (dest, src) in by_chunk.items():
            chunk = chunks[c]
            cols = chunk.mask.shape[1]
            to = torch.as_tensor(dest, dtype=torch.long, device=mask.device)
            frm = torch.as_tensor(src, dtype=torch.long, device=mask.device)
            mask[to, :cols] = chunk.mask[frm]
            batch_rows = chunk.rows[frm]
            for lay, k, v in zip(layers, chunk.keys, chunk.values):
                assert lay._kbuf is not None and lay._vbuf is not None
                lay._kbuf[to, :, :cols] = k[:, :, :cols].index_select(0, batch_rows)
                lay._vbuf[to, :, :cols] = v[:, :, :cols].index_select(0, batch_rows)
                if cols < width:
                    lay._kbuf[to, :, cols:width] = 0
                    lay._vbuf[to, :, cols:width] = 0
        return layers
