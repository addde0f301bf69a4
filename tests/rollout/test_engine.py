"""Sampling math and the Hugging Face engine (seeding, log-probs, stopping, batching)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear.rollout.engine import (
    HFEngine,
    RolloutEngine,
    draw_tokens,
    filter_logits,
    left_pad,
    sampling_logprobs,
)
from tests.rollout.conftest import sampling

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------ pure functions


def test_top_k_keeps_the_k_largest_logits() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    # the two largest are 3 (index 1) and 2 (index 2)
    assert filter_logits(logits, top_k=2, top_p=1.0).tolist() == [[NEG_INF, 3.0, 2.0, NEG_INF]]


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    # descending: 0.5 (mass before 0), 0.3 (before 0.5 < 0.7), 0.15 (before 0.8 >= 0.7: dropped)
    lp = sampling_logprobs(probs.log(), temperature=1.0, top_k=None, top_p=0.7)
    # kept mass 0.8 renormalised: log(0.5/0.8), log(0.3/0.8)
    expected = [NEG_INF, math.log(0.5 / 0.8), NEG_INF, math.log(0.3 / 0.8)]
    assert lp[0, [0, 2]].tolist() == [NEG_INF, NEG_INF]
    assert lp[0, [1, 3]].tolist() == pytest.approx([expected[1], expected[3]], abs=1e-6)


def test_temperature_divides_logits_and_greedy_reports_temperature_one() -> None:
    logits = torch.tensor([[0.0, 2.0]])
    # T=2: logits [0, 1] -> p = [1/(1+e), e/(1+e)]
    lp = sampling_logprobs(logits, temperature=2.0, top_k=None, top_p=1.0)
    assert lp[0].tolist() == pytest.approx(
        [-math.log(1 + math.e), 1 - math.log(1 + math.e)], abs=1e-6
    )
    greedy = sampling_logprobs(logits, temperature=0.0, top_k=1, top_p=0.1)
    # greedy ignores filters: log_softmax([0, 2]) = [-log(1+e^2), 2-log(1+e^2)]
    assert greedy[0].tolist() == pytest.approx(
        [-math.log(1 + math.e**2), 2 - math.log(1 + math.e**2)], abs=1e-6
    )


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=12),
        min_size=1,
        max_size=4,
    ),
    temperature=st.floats(0.05, 3.0),
    top_k=st.one_of(st.none(), st.integers(1, 12)),
    top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
)
def test_sampling_distribution_is_normalised_and_keeps_the_mode(
    rows: list[list[float]], temperature: float, top_k: int | None, top_p: float
) -> None:
    width = min(len(r) for r in rows)
    logits = torch.tensor([r[:width] for r in rows], dtype=torch.float64)
    lp = sampling_logprobs(logits, temperature, top_k, top_p)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(len(rows), dtype=torch.float64))
    mode = logits.argmax(-1, keepdim=True)
    assert torch.isfinite(lp.gather(1, mode)).all()
    kept = torch.isfinite(lp)
    if top_k is not None:
        kth = torch.topk(logits / temperature, min(top_k, width), dim=-1).values[:, -1:]
        in_top_k = logits / temperature >= kth  # ties at the k-th value are all kept
        assert not (kept & ~in_top_k).any()
        if top_p == 1.0:
            assert torch.equal(kept, in_top_k)
    elif top_p == 1.0:
        assert kept.all()


def test_left_pad_right_aligns_prompts_with_positions_from_zero() -> None:
    ids, attn, pos = left_pad([[7, 8, 9], [5]], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert attn.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_sampling_params_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="temperature"):
        sampling(4, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        sampling(4, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        sampling(4, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling(0)
    with pytest.raises(ValueError, match="stop_strings"):
        sampling(4, stop_strings=("",))


# ------------------------------------------------------------------------------ HFEngine


def _prompts(tokenizer) -> list[list[int]]:
    return [
        tokenizer("<|im_start|>user\nWhat is 12 times 34?<|im_end|>\n<|im_start|>assistant\n")[
            "input_ids"
        ],
        tokenizer("Take the key.")["input_ids"],
        tokenizer("<|im_start|>user\nhello<|im_end|>\n")["input_ids"],
    ]


def _forward_logprobs(model, prompt: list[int], new: list[int], temperature: float) -> torch.Tensor:
    """log p(new[k] | prompt + new[:k]) from one unpadded forward pass at ``temperature``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new])).logits[0].float() / temperature
    lp = torch.log_softmax(logits, -1)
    n = len(prompt)
    return lp[torch.arange(n - 1, n - 1 + len(new)), torch.tensor(new)]


def test_engine_satisfies_the_protocol(model, tokenizer) -> None:
    assert isinstance(HFEngine(model, tokenizer), RolloutEngine)


def test_same_seed_same_samples_and_logprobs_match_a_forward_pass(model, tokenizer) -> None:
    engine = HFEngine(model, tokenizer)
    prompts, params = _prompts(tokenizer), sampling(10)
    budgets = [10, 3, 7]  # rows leave the batch at different steps
    a = engine.generate(
        prompts, params, generator=torch.Generator().manual_seed(3), max_new_tokens=budgets
    )
    b = engine.generate(
        prompts, params, generator=torch.Generator().manual_seed(3), max_new_tokens=budgets
    )
    c = engine.generate(
        prompts, params, generator=torch.Generator().manual_seed(4), max_new_tokens=budgets
    )
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    assert [len(g.token_ids) for g in a] == budgets
    assert all(g.finish_reason == "length" for g in a)
    for prompt, g in zip(prompts, a):
        ref = _forward_logprobs(model, prompt, g.token_ids, temperature=1.0)
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-5)


def test_filtered_sampling_reports_the_filtered_distribution(model, tokenizer) -> None:
    engine = HFEngine(model, tokenizer, seed=11)
    prompts, params = _prompts(tokenizer), sampling(6, temperature=0.7, top_k=5)
    for prompt, g in zip(prompts, engine.generate(prompts, params)):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + g.token_ids])).logits[0].float()
        n = len(prompt)
        for k, (t, lp) in enumerate(zip(g.token_ids, g.logprobs)):
            row = logits[n - 1 + k] / 0.7
            top5 = torch.topk(row, 5).indices.tolist()
            assert t in top5
            # renormalised over the top 5 at T=0.7
            assert lp == pytest.approx((row[t] - torch.logsumexp(row[top5], 0)).item(), abs=1e-5)


def test_stop_token_ends_a_row_and_is_kept(model, tokenizer) -> None:
    engine = HFEngine(model, tokenizer)
    stop = tuple(range(0, len(tokenizer), 2))  # half the vocabulary: every row stops early
    gens = engine.generate(
        _prompts(tokenizer),
        sampling(40, stop_token_ids=stop),
        generator=torch.Generator().manual_seed(0),
    )
    for g in gens:
        assert g.finish_reason == "stop"
        assert g.token_ids[-1] in stop and not set(g.token_ids[:-1]) & set(stop)


def test_stop_string_ends_a_row(model, tokenizer) -> None:
    engine = HFEngine(model, tokenizer)
    gens = engine.generate(
        _prompts(tokenizer),
        sampling(60, stop_strings=("e",)),
        generator=torch.Generator().manual_seed(0),
    )
    for g in gens:
        assert g.finish_reason == "stop"
        assert "e" in tokenizer.decode(g.token_ids) and "e" not in tokenizer.decode(
            g.token_ids[:-1]
        )


def test_greedy_is_independent_of_batching(model, tokenizer) -> None:
    prompts, params = _prompts(tokenizer), sampling(8, temperature=0.0)
    whole = HFEngine(model, tokenizer).generate(prompts, params)
    chunked = HFEngine(model, tokenizer, max_batch_size=1).generate(prompts, params)
    assert [g.token_ids for g in whole] == [g.token_ids for g in chunked]
    for prompt, g in zip(prompts, whole):  # greedy = argmax of the forward pass
        with torch.no_grad():
            logits = model(torch.tensor([prompt + g.token_ids])).logits[0]
        assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == g.token_ids


def test_generation_runs_in_eval_and_inference_mode_and_restores_training(model, tokenizer) -> None:
    seen: list[tuple[bool, bool]] = []
    hook = model.register_forward_hook(
        lambda mod, args, out: seen.append((mod.training, torch.is_inference_mode_enabled()))
    )
    try:
        model.train()
        HFEngine(model, tokenizer, seed=0).generate(_prompts(tokenizer)[:1], sampling(3))
    finally:
        hook.remove()
        was_training = model.training
        model.eval()
    assert seen and all(s == (False, True) for s in seen)
    assert was_training


def test_bad_prompts_are_rejected_with_the_index(model, tokenizer) -> None:
    engine = HFEngine(model, tokenizer, seed=0)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        engine.generate([[5], []], sampling(2))
    with pytest.raises(ValueError, match=r"prompts\[0\] has token ids outside"):
        engine.generate([[len(tokenizer) + 5]], sampling(2))
    with pytest.raises(ValueError, match="max_new_tokens has 1 entries for 2 prompts"):
        engine.generate([[5], [6]], sampling(2), max_new_tokens=[1])
    with pytest.raises(ValueError, match="max_batch_size"):
        HFEngine(model, tokenizer, max_batch_size=0)
    assert engine.generate([], sampling(2)) == []


@pytest.mark.gpu
def test_engine_on_cuda_is_seeded_and_matches_a_forward_pass(tokenizer) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from tests.rollout.conftest import build_model

    model = build_model(len(tokenizer), seed=0).cuda()
    engine = HFEngine(model, tokenizer)  # device taken from the model
    prompts, params = _prompts(tokenizer), sampling(8)
    a = engine.generate(prompts, params, generator=torch.Generator().manual_seed(1))
    b = engine.generate(prompts, params, generator=torch.Generator().manual_seed(1))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    for prompt, g in zip(prompts, a):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + g.token_ids], device="cuda")).logits[0].float()
        n = len(prompt)
        ref = torch.log_softmax(logits, -1)[
            torch.arange(n - 1, n - 1 + len(g.token_ids)), g.token_ids
        ]
        assert torch.allclose(torch.tensor(g.logprobs), ref.cpu(), atol=1e-4)


def _with_system(tokenizer, prompts: list[list[int]]) -> list[list[int]]:
    system = tokenizer("<|im_start|>system\nYou add.<|im_end|>\n")["input_ids"]
    return [system + p for p in prompts]


def _sample_both_ways(model, tokenizer, prompts, monkeypatch) -> dict:
    import spear.rollout.engine as engine_module

    plans = []
    real = engine_module.plan_prefix_tree
    monkeypatch.setattr(
        engine_module, "plan_prefix_tree", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1]
    )
    params = sampling(8, temperature=1.0)
    out = {}
    for share in (True, False):
        engine = HFEngine(model, tokenizer, share_prefill=share)
        out[share] = engine.generate(prompts, params, generator=torch.Generator().manual_seed(5))
    assert plans and all(p is not None for p in plans)  # the shared path really ran
    assert [g.token_ids for g in out[True]] == [g.token_ids for g in out[False]]
    for a, b in zip(out[True], out[False]):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert a.finish_reason == b.finish_reason
    return {"plans": plans}


def test_shared_prefill_samples_what_separate_prefills_sample(model, tokenizer, monkeypatch):
    # The G rollouts of a task start from the same prompt: one prefill, cache copied per row.
    prompts = [p for p in _with_system(tokenizer, _prompts(tokenizer)) for _ in range(3)]
    plan = _sample_both_ways(model, tokenizer, prompts, monkeypatch)["plans"][0]
    assert plan.tails[0].ids.shape == (9, 1)  # each row runs only its last prompt token


def test_shared_prefill_of_later_turns_samples_what_separate_prefills_sample(
    model, tokenizer, monkeypatch
):
    # Later turns: rows share the system prompt and, per task, the task prompt, then diverge
    # (each rollout's own earlier turns); prompts of different lengths, so the levels are padded.
    base = _with_system(tokenizer, _prompts(tokenizer))
    prompts = [p + [5 + r] * (1 + 2 * r) for p in base for r in range(3)]
    plan = _sample_both_ways(model, tokenizer, prompts, monkeypatch)["plans"][0]
    assert len(plan.levels) == 2 and plan.levels[1].ids.shape[0] == 3  # one row per task


def test_draw_tokens_samples_the_distribution_and_never_a_filtered_token() -> None:
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    lp = probs.log().expand(40_000, -1)  # filtered tokens have log-prob -inf
    tok = draw_tokens(lp, False, torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=5).double() / tok.numel()
    assert freq[1] == 0 and freq[4] == 0
    # binomial std at n = 40000 is <= 0.0025: 4 sigma
    torch.testing.assert_close(freq, probs.double(), atol=0.01, rtol=0)
    again = draw_tokens(lp, False, torch.Generator().manual_seed(0))
    assert torch.equal(tok, again)  # seeded
    assert draw_tokens(lp[:3], True, None).tolist() == [0, 0, 0]


@pytest.mark.parametrize("compact_at", [1.0, 0.5, 0.0])
def test_finished_rows_waiting_in_the_batch_record_nothing(
    model, tokenizer, monkeypatch, compact_at
) -> None:
    # Rows finish at different steps; finished rows stay in the batch until few enough run
    # (COMPACT_AT; 1.0 drops them at once, 0.0 never). Every row must still get exactly its own
    # tokens, each scored by a plain forward pass of that row alone.
    import spear.rollout.engine as engine_module

    monkeypatch.setattr(engine_module, "COMPACT_AT", compact_at)
    prompts = [p for p in _prompts(tokenizer) for _ in range(2)]
    budgets = [9, 2, 5, 1, 7, 3]
    out = HFEngine(model, tokenizer).generate(
        prompts,
        sampling(9, stop_token_ids=(-1,)),  # no stop token: each row runs its whole budget
        generator=torch.Generator().manual_seed(8),
        max_new_tokens=budgets,
    )
    assert [len(g.token_ids) for g in out] == budgets
    for prompt, g in zip(prompts, out):
        ref = _forward_logprobs(model, prompt, g.token_ids, temperature=1.0)
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-5)
