"""Shared-prefix forward passes: the plan's shape on hand-made rows, and equality with a plain
forward pass (hidden states, log-probs, entropies, gradients) on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spear.models.prefix import (
    cache_kwarg,
    group_runs,
    plan_shared_prefix,
    rows_of,
    run_prefix_plan,
    select_rows,
    split_by_length,
    supports_prefix_sharing,
)
from spear.policy import Policy, unscored_prefix
from spear.types import Sample, TokenBatch


def _right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


# a system prompt [1, 2, 3], two tasks ([4, 5] and [6]), two rollouts each with own responses
ROWS = [
    [1, 2, 3, 4, 5, 9, 10, 11],
    [1, 2, 3, 4, 5, 9, 12],
    [1, 2, 3, 6, 9, 13, 14, 15, 16],
    [1, 2, 3, 6, 9, 17],
]
SHAREABLE = torch.tensor([5, 5, 4, 4])  # each row's prompt minus its last token ([9])


def test_plan_has_a_common_level_a_group_level_and_row_suffixes() -> None:
    ids, mask = _right_padded(ROWS)
    plan = plan_shared_prefix(ids, mask, SHAREABLE)
    assert plan is not None
    (common, groups), (rows,) = plan.levels, plan.tails
    assert common.ids.tolist() == [[1, 2, 3]] and common.parent is None
    assert groups.ids.tolist() == [[4, 5], [6, 0]]  # right-padded: the pad is a mask hole
    assert groups.mask.tolist() == [[1, 1], [1, 0]]
    assert groups.positions.tolist() == [[3, 4], [3, 4]] and groups.parent.tolist() == [0, 0]
    assert rows.parent.tolist() == [0, 0, 1, 1]
    assert plan.suffix_start.tolist() == [5, 5, 4, 4]
    assert rows.positions[:, 0].tolist() == [5, 5, 4, 4]
    assert rows.ids.tolist() == [[9, 10, 11, 0, 0], [9, 12, 0, 0, 0], [9, 13, 14, 15, 16],
                                 [9, 17, 0, 0, 0]]  # fmt: skip
    # 3 + 2 * 2 + 4 * 5 positions instead of 4 * 9
    assert (plan.positions, plan.plain_positions) == (27, 36)


def test_distinct_groups_skip_the_group_level() -> None:
    ids, mask = _right_padded([[1, 2, 3, 4, 5, 6, 7, 9, 10, 11], [1, 2, 3, 4, 5, 6, 8, 9, 12]])
    plan = plan_shared_prefix(ids, mask, torch.tensor([7, 7]))
    assert plan is not None and len(plan.levels) == 1
    assert plan.tails[0].ids.tolist() == [[7, 9, 10, 11], [8, 9, 12, 0]]
    assert plan.suffix_start.tolist() == [6, 6]


def test_no_plan_without_a_common_first_token_or_enough_saving() -> None:
    ids, mask = _right_padded([[1, 2, 3, 4], [7, 2, 3, 4]])
    assert plan_shared_prefix(ids, mask, torch.tensor([3, 3])) is None
    ids, mask = _right_padded([[1, 2, 3, 4, 5, 6, 7, 8], [1, 9, 10, 11, 12, 13, 14, 15]])
    assert plan_shared_prefix(ids, mask, torch.tensor([6, 6])) is None  # 1 + 2 * 7 > 0.75 * 16
    ids, mask = _right_padded(ROWS)
    assert plan_shared_prefix(ids, mask, torch.tensor([5, 5, 4, 0])) is None  # a row shares 0
    assert plan_shared_prefix(ids[:1], mask[:1], SHAREABLE[:1]) is None  # one row


def _lm(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


def test_split_by_length_pays_for_padding_against_calls() -> None:
    # one part: 4 * 100 + 64 = 464; [2, 2, 2] | [100]: 3 * 2 + 64 + 100 + 64 = 234
    assert split_by_length([2, 100, 2, 2], 3) == [[0, 2, 3], [1]]
    assert split_by_length([2, 100, 2, 2], 1) == [[0, 1, 2, 3]]
    assert split_by_length([5, 6, 7], 3) == [[0, 1, 2]]  # a second call costs more than padding


LONG_ROWS = [*ROWS[:3], ROWS[3] + list(range(18, 32)) * 3 + [9]]  # a long last response


def test_plan_hidden_states_equal_a_plain_forward() -> None:
    lm = _lm()
    ids, mask = _right_padded(LONG_ROWS)
    plan = plan_shared_prefix(ids, mask, SHAREABLE)
    assert plan is not None and len(plan.tails) == 2  # the long row runs alone
    with torch.no_grad():
        plain = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        flat = torch.cat(
            [o.last_hidden_state.flatten(0, 1) for o, _ in run_prefix_plan(lm.model, plan)]
        )
    for i, row in enumerate(LONG_ROWS):
        start, base = int(plan.suffix_start[i]), int(plan.row_base[i])
        torch.testing.assert_close(
            flat[base : base + len(row) - start], plain[i, start : len(row)], atol=1e-5, rtol=0
        )


def _policy(share: bool) -> Policy:
    lm = _lm(1)
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return Policy(lm, None, torch.device("cpu"), opt, sched, share_prefix=share)


def _episode_batch() -> TokenBatch:
    """Multi-turn rows: a scored response, an unscored observation, another scored response."""
    samples = []
    for i, row in enumerate(LONG_ROWS):
        scored = torch.zeros(len(row), dtype=torch.bool)
        scored[int(SHAREABLE[i]) + 1 :] = True
        if len(row) > 8:
            scored[7] = False  # an observation token between two responses
        samples.append(
            Sample(input_ids=torch.tensor(row), loss_mask=scored,
                   behavior_logprobs=torch.zeros(len(row)), group_id=i // 2, episode_id=i)
        )  # fmt: skip
    batch = TokenBatch.collate(samples, pad_id=0)
    return batch


def test_unscored_prefix_stops_before_the_first_scored_token() -> None:
    batch = _episode_batch()
    assert unscored_prefix(batch.loss_mask, batch.attention_mask).tolist() == [5, 5, 4, 4]


def test_shared_prefix_logprobs_entropy_and_gradients_equal_the_plain_pass() -> None:
    batch = _episode_batch()
    out = {}
    for share in (False, True):
        policy = _policy(share)
        lp, ent = policy.forward_logprobs(batch, temperature=0.7, with_entropy=True)
        assert ent is not None
        weights = torch.linspace(-1, 1, lp.numel()).view_as(lp)
        ((lp * weights).sum() + 0.3 * ent.sum()).backward()
        grads = {
            n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None
        }
        out[share] = (lp.detach(), ent.detach(), grads)
    (lp0, ent0, g0), (lp1, ent1, g1) = out[False], out[True]
    assert (lp0 != 0).sum() == int(batch.loss_mask.sum()) > 0
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent1, ent0, atol=1e-5, rtol=0)
    assert set(g1) == set(g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_activation_checkpointing_turns_sharing_off_in_training_passes(monkeypatch) -> None:
    """Checkpointed transformers layers drop the KV cache in training mode: the training pass
    must then run plainly (and still give the plain values); eval-mode scoring still shares."""
    import spear.policy as policy_module

    batch = _episode_batch()
    plain = _policy(False)
    want, _ = plain.forward_logprobs(batch, temperature=1.0, with_entropy=False)
    policy = _policy(True)
    enable = getattr(policy.model, "activation_checkpointing_enable", None)
    (enable or policy.model.gradient_checkpointing_enable)()  # renamed in transformers 5.2x
    policy.model.train()
    planned = []
    real_plan = policy_module.plan_shared_prefix
    monkeypatch.setattr(
        policy_module, "plan_shared_prefix", lambda *a, **k: planned.append(1) or real_plan(*a, **k)
    )
    got, _ = policy.forward_logprobs(batch, temperature=1.0, with_entropy=False)
    assert not planned
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    policy.model.eval()  # scoring passes (old log-probs) run in eval mode
    with torch.no_grad():
        got, _ = policy.forward_logprobs(batch, temperature=1.0, with_entropy=False)
    assert planned
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_group_runs_maximise_the_saved_positions() -> None:
    # sorted: [2,3] | [5,6,1] [5,6,7,8] [5,6,7,9]; adjacent common prefixes 0, 2, 3.
    # One run of the three [5,6,..] rows sharing 2 tokens saves 2 * 2 = 4 positions, more than
    # the pair sharing 3 (saves 3); the lone row shares its whole rest.
    assert group_runs([[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 1], [2, 3]]) == ([0, 0, 0, 1], [2, 2])
    # [5,1] | [5,6,7,8] [5,6,7,9]: all three share 1 token (saves 2) < the pair shares 3 (saves 3)
    assert group_runs([[5, 6, 7, 8], [5, 6, 7, 9], [5, 1]]) == ([0, 0, 1], [3, 2])
    assert group_runs([[4], [4], [4]]) == ([0, 0, 0], [1])
    assert group_runs([[1], [2]]) == ([0, 1], [1, 1])


def test_growing_cache_appends_in_place_and_matches_dynamic_cache_sampling() -> None:
    from transformers import DynamicCache

    from spear.models.kv_cache import SPARE, growing_cache

    lm = _lm(2)
    ids, mask = _right_padded(ROWS)
    outs = {}
    with torch.no_grad():
        for name, cache in (("dynamic", DynamicCache()), ("growing", growing_cache())):
            kw = {cache_kwarg(lm): cache}
            out = lm(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
            steps = [out.logits[:, -1]]
            attn = mask
            for t in range(3):
                tok = steps[-1].argmax(-1, keepdim=True)
                if t == 1:  # drop a finished row, as the engine does
                    cache.batch_select_indices(torch.tensor([0, 2, 3]))
                    attn, tok = attn[[0, 2, 3]], tok[[0, 2, 3]]
                attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
                out = lm(input_ids=tok, attention_mask=attn, use_cache=True, **kw)
                steps.append(out.logits[:, -1])
            outs[name] = (steps, cache)
    for a, b in zip(outs["dynamic"][0], outs["growing"][0]):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    layer = outs["growing"][1].layers[0]
    assert layer.keys.shape[2] == ids.shape[1] + 3 and layer._kbuf.shape[2] == ids.shape[1] + SPARE
    assert layer.keys.data_ptr() == layer._kbuf.data_ptr()  # a view of the buffer, no copy


def test_prefix_sharing_needs_full_attention_in_every_layer() -> None:
    from transformers import MistralConfig, Qwen2Config

    assert supports_prefix_sharing(_lm().config)
    assert not supports_prefix_sharing(MistralConfig(sliding_window=8))
    assert supports_prefix_sharing(MistralConfig(sliding_window=None))
    assert supports_prefix_sharing(Qwen2Config(use_sliding_window=False, sliding_window=16))
    assert not supports_prefix_sharing(Qwen2Config(use_sliding_window=True, sliding_window=16))
    assert not supports_prefix_sharing(None)


def test_a_sliding_window_model_scores_with_the_plain_pass(monkeypatch) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    import spear.policy as policy_module

    cfg = MistralConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=4,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = MistralForCausalLM(cfg).float()
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    policy = Policy(
        lm, None, torch.device("cpu"), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    )
    monkeypatch.setattr(
        policy_module, "plan_shared_prefix", lambda *a, **k: pytest.fail("planned a prefix tree")
    )
    lp, _ = policy.forward_logprobs(_episode_batch(), temperature=1.0, with_entropy=False)
    assert lp.abs().sum() > 0


def test_select_rows_equals_batch_select_indices_in_values_and_gradients() -> None:
    from transformers import DynamicCache

    index = torch.tensor([0, 0, 2, 1, 2])
    results = []
    for select in (select_rows, lambda c, i: c.batch_select_indices(i)):
        torch.manual_seed(0)
        leaves = [torch.randn(3, 2, 4, 8, requires_grad=True) for _ in range(4)]
        cache = DynamicCache(ddp_cache_data=[(leaves[0], leaves[1]), (leaves[2], leaves[3])])
        select(cache, index)
        states = [t for lay in cache.layers for t in (lay.keys, lay.values)]
        weights = torch.arange(1.0, 1.0 + states[0].numel()).view_as(states[0])
        sum((w * t).sum() for w, t in zip([weights] * 4, states)).backward()
        results.append((states, [x.grad for x in leaves]))
    (states, grads), (ref_states, ref_grads) = results
    for a, b in zip([*states, *grads], [*ref_states, *ref_grads]):
        assert a.shape == b.shape and torch.equal(a, b)
    assert states[0].shape == (5, 2, 4, 8)
    assert torch.equal(grads[0][1], torch.arange(1.0, 1.0 + 64).view(2, 4, 8) + 3 * 64)


def test_rows_of_equals_index_select_with_a_gradient_sliced_from_a_cat() -> None:
    # What a level's keys see in training: expanded to the rows, then concatenated with the next
    # level's keys, so their gradient is a non-contiguous slice of the cat's.
    index = torch.tensor([0, 0, 1, 2, 2, 2])
    grads = []
    for select in (rows_of, lambda x, i: x.index_select(0, i)):
        torch.manual_seed(0)
        keys = torch.randn(3, 2, 5, 4, requires_grad=True)
        rows = select(keys, index)
        assert torch.equal(rows, keys.detach()[index])
        full = torch.cat([rows, torch.randn(6, 2, 3, 4)], dim=2)  # [6, 2, 8, 4]
        (full * torch.arange(full.numel()).view_as(full).sin()).sum().backward()
        grads.append(keys.grad)
    assert grads[0] is not None and grads[1] is not None
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)
    with torch.no_grad():  # no graph: a plain index_select
        assert not rows_of(torch.ones(2, 3, requires_grad=True), index[:2]).requires_grad
