"""The policy update taking its old log-probs from its own forward pass (one optimizer step)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spear.algo.losses import PolicyLossParams
from spear.types import Sample, TokenBatch
from spear.update import (
    UpdateSettings,
    finish_metrics,
    metric_weight,
    policy_update,
    single_step,
)
from tests.test_policy import _policy


def _batch() -> TokenBatch:
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 48, (6,), generator=g)
    samples = []
    for i, n in enumerate([5, 9, 3, 7, 6, 4]):  # one shared prompt, responses of n tokens
        ids = torch.cat([prompt, torch.randint(0, 48, (n,), generator=g)])
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[len(prompt) :] = True
        s = Sample(input_ids=ids, loss_mask=mask, behavior_logprobs=torch.zeros(len(ids)),
                   group_id=0, episode_id=i)  # fmt: skip
        s.advantage = (-1.0) ** i * (0.5 + 0.1 * i)
        samples.append(s)
    return TokenBatch.collate(samples, pad_id=0)


def _settings(*, epochs: int = 1, mini: int = 6, loss: str = "clip_cov") -> UpdateSettings:
    params = PolicyLossParams(
        clip_low=0.2, clip_high=0.28, clip_c=3.0, cov_ratio=0.3, cov_lb=-5.0, cov_ub=5.0,
        kl_cov_ratio=0.3, kl_cov_coef=1.0,
    )  # fmt: skip
    return UpdateSettings(
        policy_loss=loss, loss_params=params, aggregation="token-mean", max_response_len=16,
        entropy_coef=0.01, kl_coef=0.0, kl_type="k3", epochs=epochs, mini_batch_size=mini,
        micro_batch_size=2, grad_clip=10.0, temperature=1.0,
    )  # fmt: skip


def test_single_step_is_one_epoch_over_one_mini_batch() -> None:
    assert single_step(_settings(), 6) and single_step(_settings(mini=8), 6)
    assert not single_step(_settings(mini=4), 6)
    assert not single_step(_settings(epochs=2), 6)


@pytest.mark.parametrize("loss", ["vanilla", "clip_cov"])
def test_old_logprobs_from_the_forward_pass_equal_a_separate_pass(loss: str) -> None:
    batch = _batch()
    separate = _policy()
    old = separate.batch_logprobs(batch, micro_batch_size=4, temperature=1.0)
    want = policy_update(
        separate,
        dataclasses.replace(batch, old_logprobs=old),
        _settings(loss=loss),
        torch.Generator().manual_seed(7),
    )
    fused = _policy()
    got = policy_update(
        fused,
        dataclasses.replace(batch, old_logprobs=torch.full_like(old, 9.0)),  # must be ignored
        _settings(loss=loss),
        torch.Generator().manual_seed(7),
        old_from_forward=True,
    )
    assert want.old_logprobs is None and got.old_logprobs is not None
    scored = batch.loss_mask > 0
    torch.testing.assert_close(got.old_logprobs[scored], old[scored], atol=1e-5, rtol=0)
    assert (got.old_logprobs[~scored] == 0).all()
    for (name, a), b in zip(separate.model.named_parameters(), fused.model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)
    for k in want.metrics:
        torch.testing.assert_close(got.metrics[k], want.metrics[k], atol=1e-5, rtol=1e-4, msg=k)


def test_kl_cov_penalty_has_no_gradient_at_the_exact_old_logprobs() -> None:
    """KL-Cov adds ``coef * |log r|`` on its selected tokens. With the old log-probs taken from
    the same forward pass, ``log r`` is exactly 0 and so is the penalty's (sub)gradient: the
    update equals the plain one (with a separate pass, ``log r`` is float noise of ~1e-6 whose
    sign drives ``+-coef`` gradients on those tokens)."""
    batch, result = _batch(), {}
    for loss in ("vanilla", "kl_cov"):
        policy = _policy()
        policy_update(
            policy, batch, _settings(loss=loss), torch.Generator().manual_seed(7),
            old_from_forward=True,
        )  # fmt: skip
        result[loss] = [p.detach().clone() for p in policy.model.parameters()]
    for a, b in zip(result["vanilla"], result["kl_cov"]):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs", [{"epochs": 2}, {"mini": 4}])
def test_old_logprobs_from_the_forward_pass_need_a_single_step(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="one optimizer step"):
        policy_update(
            _policy(),
            _batch(),
            _settings(**kwargs),
            torch.Generator().manual_seed(7),
            old_from_forward=True,
        )


def _three_prompts() -> TokenBatch:
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 48, (6,), generator=g) for _ in range(3)]
    samples = []
    for i, n in enumerate([5, 9, 3, 7, 6, 4]):  # rows alternate between the three prompts
        ids = torch.cat([prompts[i % 3], torch.randint(0, 48, (n,), generator=g)])
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[6:] = True
        s = Sample(input_ids=ids, loss_mask=mask, behavior_logprobs=torch.zeros(len(ids)),
                   group_id=i % 3, episode_id=i)  # fmt: skip
        s.advantage = (-1.0) ** i * (0.5 + 0.1 * i)
        samples.append(s)
    return TokenBatch.collate(samples, pad_id=0)


def test_micro_batches_hold_rows_that_share_a_prompt_and_the_update_is_unchanged(
    monkeypatch,
) -> None:
    # Within one mini-batch the split into micro-batches does not change the gradient, so rows
    # that share a prompt go together (the prefix tree then runs each prompt once per
    # micro-batch) whatever order the shuffle drew.
    from spear.policy import Policy

    seen: list[torch.Tensor] = []
    real = Policy.forward_logprobs
    monkeypatch.setattr(
        Policy,
        "forward_logprobs",
        lambda self, b, **k: seen.append(b.input_ids) or real(self, b, **k),
    )
    batch, result = _three_prompts(), {}
    for share in (True, False):
        policy = _policy()
        policy.share_prefix = share
        seen.clear()
        old = policy.batch_logprobs(batch, micro_batch_size=6, temperature=1.0)
        seen.clear()
        res = policy_update(
            policy, batch, _settings(loss="vanilla"), torch.Generator().manual_seed(7),
            old_from_forward=True,
        )  # fmt: skip
        assert res.old_logprobs is not None
        scored = batch.loss_mask > 0
        torch.testing.assert_close(res.old_logprobs[scored], old[scored], atol=1e-5, rtol=0)
        grouped = all(torch.equal(m[0, :6], m[1, :6]) for m in seen)
        assert grouped == share  # the seeded shuffle alone pairs different prompts
        result[share] = [p.detach().clone() for p in policy.model.parameters()]
    for a, b in zip(result[True], result[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _split_settings(micro: int, aggregation: str) -> UpdateSettings:
    return dataclasses.replace(
        _settings(loss="vanilla"), micro_batch_size=micro, aggregation=aggregation, kl_coef=0.1
    )


@pytest.mark.parametrize(
    "aggregation",
    ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"],
)
def test_logged_metrics_do_not_depend_on_the_micro_batch_split(aggregation: str) -> None:
    # one mini-batch of 6 rows split into micro-batches of 6 / 3 / 2 / 1 rows: the same gradient
    # and the same logged metrics (before the fix entropy, pg_loss and kl were divided by the
    # number of micro-batches: entropy 4.15 / 2.26 / 1.53 / 0.78 on the batch)
    batch = _batch()
    lp = _policy().batch_logprobs(batch, micro_batch_size=6, temperature=1.0)
    noise = torch.randn(lp.shape, generator=torch.Generator().manual_seed(11))
    batch = dataclasses.replace(batch, old_logprobs=(lp + 0.3 * noise) * batch.attention_mask)
    ref = (lp - 0.2 * noise.abs()) * batch.attention_mask
    # the entropy the update must log: the token mean over the batch before the step
    with torch.no_grad():
        _, ent = _policy().forward_logprobs(batch, temperature=1.0, with_entropy=True)
    assert ent is not None
    scored = batch.loss_mask > 0
    want_entropy = float(ent[scored].mean())
    results = {}
    for micro in (6, 3, 2, 1):
        policy = _policy()
        res = policy_update(
            policy, batch, _split_settings(micro, aggregation), torch.Generator().manual_seed(7),
            ref_logprobs=ref,
        )  # fmt: skip
        results[micro] = (
            {k: float(v) for k, v in res.metrics.items()},
            list(policy.model.parameters()),
        )
    metrics, params = results[6]
    assert {"entropy", "pg_loss", "kl", "loss", "clipfrac", "approx_kl"} <= metrics.keys()
    assert metrics["entropy"] == pytest.approx(want_entropy, rel=1e-5)
    assert metrics["kl"] > 0 and metrics["clipfrac"] > 0
    assert metrics["loss"] == pytest.approx(
        metrics["pg_loss"]
        - 0.01 * _aggregated_entropy(ent, batch, aggregation)
        + 0.1 * metrics["kl"],
        rel=1e-5,
    )
    for micro in (3, 2, 1):
        got, got_params = results[micro]
        assert got.keys() == metrics.keys()
        for k, v in metrics.items():
            assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (micro, k)
        for a, b in zip(params, got_params):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def _aggregated_entropy(ent: torch.Tensor, batch: TokenBatch, aggregation: str) -> float:
    from spear.algo.aggregation import AGGREGATIONS, AggregationNorm

    norm = AggregationNorm.from_mask(batch.loss_mask, 16)
    return float(AGGREGATIONS.get(aggregation)(ent, batch.loss_mask, norm))


def test_finish_metrics_by_hand() -> None:
    # two micro-batches of 3 and 1 valid tokens: entropy means 2.0 and 6.0 -> (3*2 + 1*6)/4 = 3;
    # pg_loss shares 0.5 + 0.25 of mini-batch 1 and 1.25 of mini-batch 2 -> (0.75 + 1.25)/2 = 1;
    # cov_selected counts 2 + 3 = 5
    sums: dict[str, torch.Tensor] = {}
    for name, value, tokens in [
        ("entropy", 2.0, 3), ("entropy", 6.0, 1), ("pg_loss", 0.5, 3), ("pg_loss", 0.25, 1),
        ("pg_loss", 1.25, 2), ("cov_selected", 2.0, 3), ("cov_selected", 3.0, 1),
    ]:  # fmt: skip
        w = metric_weight(name, torch.tensor(tokens))
        sums[name] = sums.get(name, torch.zeros(())) + torch.tensor(value) * w
    got = finish_metrics(sums, torch.tensor(4.0), num_mini_batches=2)
    assert {k: float(v) for k, v in got.items()} == {
        "entropy": 3.0,
        "pg_loss": 1.0,
        "cov_selected": 5.0,
    }
