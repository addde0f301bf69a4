"""Kept KV caches between turns: a next turn prefills only its new tokens and samples what a
fresh prefill samples; stale or foreign rows are never reused."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import spear.rollout.engine as engine_module
import spear.rollout.turn_cache as turn_cache_module
from spear.rollout.engine import HFEngine, KeepsTurns
from spear.rollout.turn_cache import Continuation, TurnCache, ragged_stages, weights_version
from tests.rollout.conftest import EnvScript, sampling
from tests.rollout.test_engine import _forward_logprobs, _prompts, _with_system
from tests.rollout.test_loop import loop_params, run


def _spy(monkeypatch, on_result: Any = None) -> list[Continuation | None]:
    """Record what ``continue_rows`` returns; ``on_result(cont)`` sees it before it is run."""
    seen: list[Continuation | None] = []
    real = TurnCache.continue_rows

    def wrapped(self: TurnCache, *a: Any, **k: Any) -> Continuation | None:
        seen.append(real(self, *a, **k))
        if on_result is not None and seen[-1] is not None:
            on_result(seen[-1])
        return seen[-1]

    monkeypatch.setattr(TurnCache, "continue_rows", wrapped)
    return seen


def _two_turns(
    engine: HFEngine,
    tokenizer,
    first_budgets: list[int],
    seed: int = 2,
    observations: tuple[int, ...] = (1, 2, 3, 4, 5, 6),
):
    prompts = [p for p in _with_system(tokenizer, _prompts(tokenizer)) for _ in range(2)]
    params = sampling(9, stop_token_ids=(-1,))  # rows run their whole budget
    gen = torch.Generator().manual_seed(seed)
    first = engine.generate(prompts, params, generator=gen, max_new_tokens=first_budgets)
    # the next turn: the conversation so far plus an observation of a different length per row
    nxt = [
        p + g.token_ids + [7 + i] * n
        for i, (p, g, n) in enumerate(zip(prompts, first, observations, strict=True))
    ]
    second = engine.generate(nxt, params, generator=gen, max_new_tokens=[6, 3, 5, 2, 4, 6])
    return nxt, second


@pytest.mark.parametrize("compact_at", [1.0, 0.5, 0.0])
def test_next_turn_continues_kept_rows_and_samples_what_a_fresh_prefill_samples(
    model, tokenizer, monkeypatch, compact_at
) -> None:
    # Rows finish the first turn at different steps (dropped from the batch at once, at half,
    # or never): each kept row must hold exactly its own tokens' keys.
    monkeypatch.setattr(engine_module, "COMPACT_AT", compact_at)
    seen = _spy(monkeypatch)
    budgets = [9, 2, 5, 1, 7, 3]
    nxt, kept = _two_turns(HFEngine(model, tokenizer), tokenizer, budgets)
    assert seen[0] is None and seen[1] is not None  # turn 2 ran only its new tokens
    assert seen[1].ids.shape == (6, 7)  # last sampled token + up to 6 observation tokens
    _, fresh = _two_turns(HFEngine(model, tokenizer, keep_turns=False), tokenizer, budgets)
    assert [g.token_ids for g in kept] == [g.token_ids for g in fresh]
    for a, b, prompt in zip(kept, fresh, nxt):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        ref = _forward_logprobs(model, prompt, a.token_ids, temperature=1.0)
        assert torch.allclose(torch.tensor(a.logprobs), ref, atol=1e-5)


def test_ragged_stages_cut_where_the_fewest_positions_run() -> None:
    # Costs with 64 positions per extra call. Ten rows of 2 new tokens and one of 100: one call
    # runs 11 x 100 = 1100 positions; two calls 11 x 2 + 1 x 98 + 64 = 184.
    assert ragged_stages([2] * 10 + [100]) == [2, 100]
    assert ragged_stages([7, 7, 7]) == [7]
    assert ragged_stages([1, 2]) == [2]  # 2 x 2 = 4 against 2 + 1 + 64
    # 50 x 1, 10 x 20, 1 x 200: [1, 20, 200] runs 61 + 11 x 19 + 180 = 450 (+128); [20, 200]
    # 61 x 20 + 180 = 1400 (+64); [1, 200] 61 + 11 x 199 = 2250 (+64); one call 61 x 200.
    lengths = [1] * 50 + [20] * 10 + [200]
    assert ragged_stages(lengths) == [1, 20, 200]
    assert ragged_stages(lengths, max_stages=2) == [20, 200]
    assert ragged_stages(lengths, max_stages=1) == [200]


def test_ragged_new_parts_run_in_stages_and_sample_what_a_fresh_prefill_samples(
    model, tokenizer, monkeypatch
) -> None:
    # With no cost per call, new parts of 2, 2, 4, 4, 2, 13 tokens (the last sampled token plus
    # the observation) run in three stages: depths (4, 13] (new columns 0-8) for the row of 13,
    # (2, 4] (columns 9-10) for the rows of 4 and 13, then the last two columns for every row.
    monkeypatch.setattr(turn_cache_module, "TAIL_CALL_COST", 0)
    lead_cols: list[torch.Tensor] = []  # the leads' columns of every layer, as left to run

    def snapshot(c: Continuation) -> None:
        kept = c.mask.shape[1] - c.ids.shape[1]
        lead_cols.extend(
            buf[:, :, kept : kept + c.main_start].clone()
            for lay in c.cache.layers
            for buf in (lay._kbuf, lay._vbuf)
        )

    seen = _spy(monkeypatch, snapshot)
    obs = (1, 1, 3, 3, 1, 12)
    budgets = [9, 2, 5, 1, 7, 3]
    nxt, staged = _two_turns(HFEngine(model, tokenizer), tokenizer, budgets, observations=obs)
    cont = seen[1]
    assert cont is not None and cont.ids.shape == (6, 13)
    new = cont.mask[:, -13:].sum(dim=1).tolist()  # batch rows are in prompt-length order
    assert sorted(new) == [2, 2, 2, 4, 4, 13]
    deep, mid = [i for i, n in enumerate(new) if n > 4], [i for i, n in enumerate(new) if n > 2]
    leads = [(st.rows.tolist(), st.start, st.end) for st in cont.leads]
    assert leads == [(deep, 0, 9), (mid, 9, 11)] and cont.main_start == 11
    # Rows outside a lead never get keys in its columns: they are holes, and were zeroed
    # (attention reads them, masked; memory left as allocated could hold a NaN).
    shallow = [i for i in range(6) if i not in mid]
    assert len(lead_cols) == 2 * len(cont.cache.layers)
    for cols in lead_cols:
        assert not cols[shallow].any() and not cols[[i for i in mid if i not in deep], :, :9].any()
    _, fresh = _two_turns(
        HFEngine(model, tokenizer, keep_turns=False), tokenizer, budgets, observations=obs
    )
    assert [g.token_ids for g in staged] == [g.token_ids for g in fresh]
    for a, b, prompt in zip(staged, fresh, nxt):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        ref = _forward_logprobs(model, prompt, a.token_ids, temperature=1.0)
        assert torch.allclose(torch.tensor(a.logprobs), ref, atol=1e-5)


def test_rows_kept_from_several_batches_of_a_call_are_found(model, tokenizer, monkeypatch) -> None:
    seen = _spy(monkeypatch)
    engine = HFEngine(model, tokenizer, max_batch_size=4)  # turn 1 in two batches
    nxt, second = _two_turns(engine, tokenizer, [3, 2, 5, 1, 4, 3])
    assert sum(c is not None for c in seen) == 2  # both batches of turn 2 continued kept rows
    for prompt, g in zip(nxt, second):
        ref = _forward_logprobs(model, prompt, g.token_ids, temperature=1.0)
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-5)


def test_changed_weights_drop_the_kept_rows(model, tokenizer, monkeypatch) -> None:
    seen = _spy(monkeypatch)
    engine = HFEngine(model, tokenizer)
    prompts = _with_system(tokenizer, _prompts(tokenizer))
    params = sampling(4, stop_token_ids=(-1,))
    first = engine.generate(prompts, params, generator=torch.Generator().manual_seed(1))
    before = weights_version(model)
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)  # what an optimizer step does: in place
    assert weights_version(model) != before
    nxt = [p + g.token_ids + [9] for p, g in zip(prompts, first)]
    second = engine.generate(nxt, params, generator=torch.Generator().manual_seed(1))
    assert seen[-1] is None  # stale keys are not reused
    for prompt, g in zip(nxt, second):
        ref = _forward_logprobs(model, prompt, g.token_ids, temperature=1.0)
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-5)


def test_a_prompt_that_continues_no_kept_row_prefills_the_call_from_scratch(
    model, tokenizer, monkeypatch
) -> None:
    seen = _spy(monkeypatch)
    engine = HFEngine(model, tokenizer)
    prompts = _with_system(tokenizer, _prompts(tokenizer))
    params = sampling(4, stop_token_ids=(-1,))
    first = engine.generate(prompts, params, generator=torch.Generator().manual_seed(1))
    # row 1 edits a sampled token: its prompt is no longer a continuation of its kept row
    nxt = [p + g.token_ids + [9] for p, g in zip(prompts, first)]
    nxt[1][len(prompts[1])] = (nxt[1][len(prompts[1])] + 1) % 50
    second = engine.generate(nxt, params, generator=torch.Generator().manual_seed(1))
    assert seen[-1] is None
    for prompt, g in zip(nxt, second):
        ref = _forward_logprobs(model, prompt, g.token_ids, temperature=1.0)
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-5)


def test_keep_marks_only_the_columns_a_row_owns() -> None:
    # Batch of 2, 6 columns: row 0 has a hole at column 1 (padding); its sequence has 3 tokens,
    # so columns 4-5 (fed after it finished) are not its own. Row 1 owns columns 2-5 (4 tokens).
    keys = torch.arange(2 * 1 * 8 * 1, dtype=torch.float32).reshape(2, 1, 8, 1)
    cache = SimpleNamespace(layers=[SimpleNamespace(keys=keys[:, :, :6], values=keys[:, :, :6])])
    attn = torch.tensor([[1, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    turns = TurnCache()
    turns.keep(cache, attn, [0, 1], [[4, 5, 6], [7, 8, 9, 10]])
    turns.finish()
    assert len(turns) == 2
    chunk = turns._kept.chunks[0]
    assert chunk.mask.tolist() == [[1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    cont = turns.continue_rows([[7, 8, 9, 10, 11, 12], [4, 5, 6, 3]], pad_id=0, device=attn.device)
    assert cont is not None
    # the longest kept prefix of each prompt: row 1's 4 tokens, row 0's 3; new tokens left-padded
    assert cont.ids.tolist() == [[11, 12], [0, 3]]
    assert cont.positions.tolist() == [[4, 5], [0, 3]]
    assert cont.next_pos.tolist() == [6, 4]
    assert cont.mask.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0, 0, 1]]
    layer = cont.cache.layers[0]
    assert torch.equal(layer.keys[0, 0, :, 0], keys[1, 0, :6, 0])
    assert torch.equal(layer.keys[1, 0, :, 0], keys[0, 0, :6, 0])
    assert turns.continue_rows([[4, 5, 6]], pad_id=0, device=attn.device) is None  # no new token


def test_the_agent_loop_samples_later_turns_from_kept_rows_and_frees_them(
    model, tokenizer, env_factory, monkeypatch
) -> None:
    seen = _spy(monkeypatch)
    engine = HFEngine(model, tokenizer)
    assert isinstance(engine, KeepsTurns)
    params = loop_params(max_turns=3, sampling=sampling(8))
    episodes = run(
        engine,
        tokenizer,
        env_factory(EnvScript(answer_turn=None)),
        params,
        generator=torch.Generator().manual_seed(5),
    )
    assert [c is not None for c in seen] == [False, True, True]
    assert len(engine._turns or []) == 0  # freed when the rollout ended
    for e in episodes:  # every sampled token scored by one plain pass of the whole episode
        (s,) = e.samples
        ids, mask = s.input_ids.tolist(), s.loss_mask
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        at = mask.nonzero().squeeze(1)
        ref = lp[at - 1, torch.tensor(ids)[at]]
        assert torch.allclose(s.behavior_logprobs[at], ref, atol=1e-5)
