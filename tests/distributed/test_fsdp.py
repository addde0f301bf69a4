"""Even batch splitting, FSDP2 sharding and the data-parallel update.

The 1-rank tests run in-process (gloo over a HashStore). The 2-rank test spawns two gloo
processes and is opt-in (``-m slow``): it shows that the distributed update equals the
single-process ``policy_update`` on the whole batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.device_mesh import init_device_mesh
from transformers import LlamaConfig, LlamaForCausalLM

from spear.algo.aggregation import AggregationNorm
from spear.algo.losses import PolicyLossParams
from spear.distributed.fsdp import (
    ShardedPolicy,
    data_parallel_update,
    free_port,
    gather_full_state_dict,
    global_norm,
    init_distributed,
    mask_last_rows,
    shard_policy,
    shard_sizes,
    share_rows,
    split_batch,
)
from spear.policy import Policy
from spear.types import Sample, TokenBatch
from spear.update import UpdateSettings, policy_update

# ----------------------------------------------------------------------------------------------
# Even splitting (pure)


def test_shard_sizes_hand_examples() -> None:
    assert shard_sizes(5, 2) == [3, 2]  # divmod(5, 2) = (2, 1): rank 0 gets the extra row
    assert shard_sizes(6, 4) == [2, 2, 1, 1]  # divmod(6, 4) = (1, 2)
    assert shard_sizes(1, 3) == [1, 0, 0]
    assert shard_sizes(0, 2) == [0, 0]
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        shard_sizes(3, 0)


def test_share_rows_pads_with_the_first_row() -> None:
    rows = torch.tensor([10, 11, 12, 13, 14])
    idx0, fill0 = share_rows(rows, 2, 0)
    idx1, fill1 = share_rows(rows, 2, 1)
    assert idx0.tolist() == [10, 11, 12] and fill0 == 0
    assert idx1.tolist() == [13, 14, 10] and fill1 == 1  # 2 real rows + 1 masked copy of row 10
    idx, fill = share_rows(torch.tensor([7]), 3, 2)
    assert idx.tolist() == [7] and fill == 1  # an empty share still runs one (masked) row
    with pytest.raises(ValueError, match="rank must be in"):
        share_rows(rows, 2, 2)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), world=st.integers(1, 9))
def test_share_rows_property(n: int, world: int) -> None:
    rows = torch.randperm(n)
    shares = [share_rows(rows, world, r) for r in range(world)]
    width = -(-n // world)  # ceil(n / world)
    assert all(idx.numel() == width for idx, _ in shares)
    real = torch.cat([idx[: idx.numel() - fill] for idx, fill in shares])
    assert torch.equal(real, rows)  # every row exactly once, in order; nothing dropped
    assert sum(fill for _, fill in shares) == width * world - n


def _batch(lengths: list[int], seed: int, vocab: int = 64) -> TokenBatch:
    """Samples whose second half is the response (loss mask 1), with +-1 advantages."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, t in enumerate(lengths):
        mask = torch.zeros(t, dtype=torch.bool)
        mask[t // 2 :] = True
        samples.append(
            Sample(
                input_ids=torch.randint(0, vocab, (t,), generator=g),
                loss_mask=mask,
                behavior_logprobs=torch.zeros(t),
                group_id=i // 2,
                episode_id=i,
                advantage=1.0 if i % 3 else -1.0,
            )
        )
    return TokenBatch.collate(samples, pad_id=0)


def test_split_batch_keeps_every_token_once() -> None:
    batch = _batch([4, 6, 5, 8, 3], seed=0)
    parts = split_batch(batch, 2)
    assert [p.num_rows for p in parts] == [3, 3]
    # rank 1 holds rows 3, 4 and a masked copy of row 0
    assert torch.equal(parts[1].input_ids[2, :4], batch.input_ids[0, :4])
    assert parts[1].loss_mask[2].sum() == 0 and parts[1].advantages[2].abs().sum() == 0
    # valid tokens: rows have t - t//2 response tokens, minus none at position 0 (t//2 >= 1):
    # 2 + 3 + 3 + 4 + 2 = 14 in total, 8 on rank 0 (rows 0-2) and 6 on rank 1 (rows 3-4)
    assert [float(p.loss_mask.sum()) for p in parts] == [8.0, 6.0]
    assert float(batch.loss_mask.sum()) == 14.0


def test_mask_last_rows_does_not_touch_the_input() -> None:
    batch = _batch([4, 6], seed=1)
    masked = mask_last_rows(batch, 1)
    assert masked.loss_mask[1].sum() == 0 and batch.loss_mask[1].sum() == 3  # 6 - 6 // 2 = 3
    assert mask_last_rows(batch, 0) is batch


# ----------------------------------------------------------------------------------------------
# Tiny model, settings, and single-process reference


def _tiny_lm(seed: int, tied: bool) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def _sgd(
    params: list[torch.nn.Parameter],
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.SGD(params, lr=1.0)  # lr 1: the parameter change is the clipped gradient
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _adamw(
    params: list[torch.nn.Parameter],
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)  # Adam ~ lr * sign(g) per step
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


OPTIMIZERS = {"sgd": _sgd, "adamw": _adamw}


def _settings(aggregation: str, mini: int, micro: int, epochs: int) -> UpdateSettings:
    loss = PolicyLossParams(
        clip_low=0.2, clip_high=0.28, clip_c=3.0, cov_ratio=0.2, cov_lb=1.0, cov_ub=5.0,
        kl_cov_ratio=0.2, kl_cov_coef=1.0,
    )  # fmt: skip
    return UpdateSettings(
        policy_loss="vanilla", loss_params=loss, aggregation=aggregation, max_response_len=8,
        entropy_coef=0.01, kl_coef=0.0, kl_type="k3", epochs=epochs, mini_batch_size=mini,
        micro_batch_size=micro, grad_clip=0.5, temperature=1.0,
    )  # fmt: skip


def _policy(lm: torch.nn.Module, optimizer: str) -> Policy:
    opt, sched = OPTIMIZERS[optimizer]([p for p in lm.parameters() if p.requires_grad])
    return Policy(lm, None, torch.device("cpu"), opt, sched)


def _problem(seed: int) -> TokenBatch:
    """6 rows of mixed lengths; old log-probs = current ones + noise so some ratios clip."""
    batch = _batch([5, 9, 7, 12, 6, 10], seed=seed)
    lp = _policy(_tiny_lm(0, tied=True), "sgd").batch_logprobs(
        batch, micro_batch_size=8, temperature=1.0
    )
    noise = 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed + 1))
    return dataclasses.replace(batch, old_logprobs=(lp + noise) * batch.attention_mask)


# (aggregation, mini-batch, micro-batch, epochs, optimizer, tied embeddings)
CASES = [
    ("token-mean", 6, 2, 1, "sgd", True),
    ("seq-mean-token-sum-norm", 3, 2, 2, "adamw", True),
    ("seq-mean-token-mean", 4, 1, 1, "sgd", False),
]


def _reference(case: tuple, batch: TokenBatch) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    agg, mini, micro, epochs, optimizer, tied = case
    policy = _policy(_tiny_lm(0, tied), optimizer)
    res = policy_update(
        policy, batch, _settings(agg, mini, micro, epochs), torch.Generator().manual_seed(5)
    )
    assert res.optimizer_steps == epochs * -(-6 // mini)
    return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}, {
        k: float(v) for k, v in res.metrics.items()
    }


def _distributed(
    case: tuple, batch: TokenBatch, mesh: object
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    agg, mini, micro, epochs, optimizer, tied = case
    sharded = shard_policy(_policy(_tiny_lm(0, tied), optimizer), mesh, OPTIMIZERS[optimizer])  # type: ignore[arg-type]
    res = data_parallel_update(
        sharded, batch, _settings(agg, mini, micro, epochs), torch.Generator().manual_seed(5)
    )
    return gather_full_state_dict(sharded), {k: float(v) for k, v in res.metrics.items()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert set(got) >= set(want) - {"lm_head.weight"}
    initial = _tiny_lm(0, tied=True).state_dict()
    moved = 0
    for k, w in want.items():
        if k in got:
            torch.testing.assert_close(got[k], w, atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
            moved += (
                int(not torch.equal(w, initial[k]))
                if k in initial and initial[k].shape == w.shape
                else 0
            )
    assert moved > 0  # the update really changed parameters


# ----------------------------------------------------------------------------------------------
# One rank, in-process


@pytest.fixture
def one_rank() -> Iterator[object]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_global_norm_one_rank(one_rank: object) -> None:
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    norm = global_norm(mask, 8, None, torch.device("cpu"))
    want = AggregationNorm.from_mask(mask, 8)  # 3 valid tokens in 2 non-empty rows
    assert float(norm.num_tokens) == float(want.num_tokens) == 3.0
    assert float(norm.num_sequences) == float(want.num_sequences) == 2.0


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: f"{c[0]}-{c[4]}")
def test_one_rank_fsdp_update_equals_policy_update(one_rank: object, case: tuple) -> None:
    batch = _problem(seed=3)
    want, want_metrics = _reference(case, batch)
    got, got_metrics = _distributed(case, batch, one_rank)
    _assert_same(got, want, atol=1e-5)
    assert got_metrics.keys() == want_metrics.keys()
    for k, v in want_metrics.items():
        assert got_metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_sharded_policy_logprobs_match(one_rank: object) -> None:
    batch = _problem(seed=4)
    plain = _policy(_tiny_lm(0, tied=True), "sgd")
    want = plain.batch_logprobs(batch, micro_batch_size=4, temperature=0.7)
    sharded = shard_policy(_policy(_tiny_lm(0, tied=True), "sgd"), one_rank, _sgd)  # type: ignore[arg-type]
    assert isinstance(sharded, ShardedPolicy)
    got = sharded.batch_logprobs(batch, micro_batch_size=4, temperature=0.7)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_one_rank_fsdp_update_with_a_kl_term_equals_policy_update(one_rank: object) -> None:
    """The KL term's reference log-probs reach the data-parallel update (trainer.backend=ray
    with train ranks), which then equals the single-process update with the same reference."""
    batch = _problem(seed=3)
    g = torch.Generator().manual_seed(9)
    ref = batch.old_logprobs + 0.2 * torch.randn(batch.old_logprobs.shape, generator=g)
    settings = dataclasses.replace(
        _settings("token-mean", 3, 2, 1), kl_coef=0.5, kl_type="low_var_kl"
    )
    runs = []
    for kl in (True, False):
        s = settings if kl else dataclasses.replace(settings, kl_coef=0.0)
        plain = _policy(_tiny_lm(0, True), "sgd")
        want = policy_update(plain, batch, s, torch.Generator().manual_seed(5), ref_logprobs=ref)
        sharded = shard_policy(_policy(_tiny_lm(0, True), "sgd"), one_rank, _sgd)  # type: ignore[arg-type]
        got = data_parallel_update(
            sharded, batch, s, torch.Generator().manual_seed(5), ref_logprobs=ref
        )
        _assert_same(gather_full_state_dict(sharded), plain.model.state_dict(), atol=1e-5)
        assert ("kl" in got.metrics) == kl == ("kl" in want.metrics)
        if kl:
            assert float(got.metrics["kl"]) == pytest.approx(float(want.metrics["kl"]), rel=1e-4)
        runs.append(gather_full_state_dict(sharded))
    assert any(not torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # the KL term acted
    with pytest.raises(ValueError, match="needs the reference"):
        data_parallel_update(sharded, batch, settings, torch.Generator())


def test_data_parallel_update_rejects_different_batches_and_bad_backend(one_rank: object) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        init_distributed("mpi", 0, 1, "tcp://127.0.0.1:1", 5.0)
    with pytest.raises(ValueError, match="rank must be in"):
        init_distributed("gloo", 1, 1, "tcp://127.0.0.1:1", 5.0)


# ----------------------------------------------------------------------------------------------
# Two gloo ranks (spawned processes) == one process


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    mesh = init_distributed("gloo", rank, world, f"tcp://127.0.0.1:{port}", 120.0)
    try:
        batch = _problem(seed=3)  # every rank builds the same whole batch
        for i, case in enumerate(CASES):
            state, metrics = _distributed(case, batch, mesh)
            if rank == 0:
                torch.save({"state": state, "metrics": metrics}, Path(out_dir) / f"case{i}.pt")
        if rank == 1:  # a rank holding a different batch is refused on every rank
            batch = _batch([5, 9, 7, 12, 6, 11], seed=3)
        sharded = shard_policy(_policy(_tiny_lm(0, True), "sgd"), mesh, _sgd)
        try:
            data_parallel_update(
                sharded, batch, _settings("token-mean", 6, 2, 1), torch.Generator().manual_seed(5)
            )
        except ValueError as exc:
            (Path(out_dir) / f"refused{rank}.txt").write_text(str(exc))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    batch = _problem(seed=3)
    for i, case in enumerate(CASES):
        want, want_metrics = _reference(case, batch)
        got = torch.load(tmp_path / f"case{i}.pt")
        _assert_same(got["state"], want, atol=1e-5)
        # each rank splits its share into its own micro-batches, so the split differs from the
        # one process's: every logged metric is split-independent and must still agree
        assert got["metrics"].keys() == want_metrics.keys()
        for k, v in want_metrics.items():
            assert got["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (case, k)
    for rank in (0, 1):
        assert "same whole batch" in (tmp_path / f"refused{rank}.txt").read_text()
