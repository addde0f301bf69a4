"""The KL loss (verl's use_kl_loss): the frozen reference policy and the KL term of the update."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

from spear.algo.kl import KL_ESTIMATORS
from spear.policy import Policy
from spear.reference import ReferencePolicy, build_reference
from spear.trainer import Trainer
from spear.types import TokenBatch
from spear.update import UpdateSettings, policy_update
from tests.test_policy import _policy
from tests.test_trainer import _cfg
from tests.test_update import _batch, _settings

KL_TYPES = ["k1", "k2", "k3", "low_var_kl"]


def _kl_settings(kl_type: str, kl_coef: float, *, micro: int = 2) -> UpdateSettings:
    return dataclasses.replace(
        _settings(loss="vanilla"),
        kl_coef=kl_coef,
        kl_type=kl_type,
        micro_batch_size=micro,
        grad_clip=1e9,  # no clipping: the gradient stays the raw sum of the loss terms
    )


def _grads(policy: Policy) -> list[torch.Tensor]:
    return [
        p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        for p in policy.model.parameters()
    ]


def _shifted_reference(policy: Policy, batch: TokenBatch, shift: float) -> torch.Tensor:
    """Reference log-probs = the policy's own on the scored tokens minus ``shift``. [N, T]"""
    lp = policy.batch_logprobs(batch, micro_batch_size=6, temperature=1.0)
    return (lp - shift) * (batch.loss_mask > 0)


# ----------------------------------------------------------------------------------------------
# the KL term in the update


@pytest.mark.parametrize(
    ("kl_type", "want"),
    [
        # lp - ref = d = +0.5 on every scored token
        ("k1", 0.5),  # d
        ("k2", 0.125),  # d^2 / 2
        ("k3", math.exp(-0.5) + 0.5 - 1),  # x = -d: e^x - x - 1 = 0.1065307
        ("low_var_kl", math.exp(-0.5) + 0.5 - 1),
    ],
)
def test_logged_kl_is_the_estimator_of_the_log_ratio(kl_type: str, want: float) -> None:
    batch = _batch()
    policy = _policy()
    ref = _shifted_reference(policy, batch, 0.5)
    res = policy_update(
        policy,
        batch,
        _kl_settings(kl_type, 0.1, micro=6),
        torch.Generator().manual_seed(7),
        ref_logprobs=ref,
        old_from_forward=True,
    )
    assert float(res.metrics["kl"]) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_kl_step_gradient_differs_by_exactly_the_kl_term(kl_type: str) -> None:
    """One optimizer step (two micro-batches) with ``kl_coef = 0.3`` against one with 0: the
    gradients differ by ``0.3 * grad(token-mean(kl(lp, ref)))``, computed here on its own."""
    batch, coef = _batch(), 0.3
    g = torch.Generator().manual_seed(11)
    ref = (
        _policy().batch_logprobs(batch, micro_batch_size=6, temperature=1.0)
        + 0.4 * torch.randn(batch.input_ids.shape, generator=g)
    ) * (batch.loss_mask > 0)
    grads = {}
    for c in (0.0, coef):
        policy = _policy()
        res = policy_update(
            policy, batch, _kl_settings(kl_type, c), torch.Generator().manual_seed(7),
            ref_logprobs=ref, old_from_forward=True,
        )  # fmt: skip
        assert res.optimizer_steps == 1
        grads[c] = _grads(policy)  # the step's accumulated gradient (left in .grad)
    policy = _policy()
    policy.model.train()
    lp, _ = policy.forward_logprobs(batch, temperature=1.0, with_entropy=False)
    mask = batch.loss_mask
    kl = KL_ESTIMATORS.get(kl_type)(lp, ref)
    (coef * (kl * mask).sum() / (mask > 0).sum()).backward()
    kl_grad = _grads(policy)
    assert any(float(k.abs().max()) > 1e-4 for k in kl_grad)  # the KL term really has a gradient
    for with_kl, without, k in zip(grads[coef], grads[0.0], kl_grad, strict=True):
        torch.testing.assert_close(with_kl - without, k, atol=1e-6, rtol=1e-5)


def test_kl_coef_without_reference_logprobs_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"kl_coef=0\.1 needs the reference"):
        policy_update(_policy(), _batch(), _kl_settings("k3", 0.1), torch.Generator())
    batch = _batch()
    with pytest.raises(ValueError, match="ref_logprobs shape"):
        policy_update(
            _policy(), batch, _kl_settings("k3", 0.1), torch.Generator(),
            ref_logprobs=torch.zeros(2, 2),
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# the reference policy


def test_full_model_reference_is_a_frozen_copy_of_the_initial_weights() -> None:
    batch = _batch()
    policy = _policy()
    ref = build_reference(policy, kl_coef=0.1, lora=False)
    assert ref is not None and ref.model is not policy.model
    assert not any(p.requires_grad for p in ref.model.parameters())
    before = ref.logprobs(batch, micro_batch_size=4, temperature=1.0)
    torch.testing.assert_close(
        before, policy.batch_logprobs(batch, micro_batch_size=4, temperature=1.0)
    )
    policy_update(policy, batch, _settings(loss="vanilla"), torch.Generator().manual_seed(7))
    after = ref.logprobs(batch, micro_batch_size=4, temperature=1.0)
    assert torch.equal(after, before)  # the update moved the policy, not its reference
    moved = policy.batch_logprobs(batch, micro_batch_size=4, temperature=1.0)
    assert not torch.allclose(moved, before)


def test_lora_reference_is_the_base_with_adapters_off_and_no_copy() -> None:
    batch = _batch()
    base_lp = _policy().batch_logprobs(batch, micro_batch_size=4, temperature=1.0)
    plain = _policy()
    lora_model = get_peft_model(
        plain.model,  # type: ignore[arg-type]
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():  # move the adapters away from their zero start
        for name, p in lora_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    policy = dataclasses.replace(plain, model=lora_model)
    ref = build_reference(policy, kl_coef=0.1, lora=True)
    assert isinstance(ref, ReferencePolicy) and ref.model is policy.model  # no second copy
    got = ref.logprobs(batch, micro_batch_size=4, temperature=1.0)
    torch.testing.assert_close(got, base_lp, atol=1e-6, rtol=0)
    with_adapters = policy.batch_logprobs(batch, micro_batch_size=4, temperature=1.0)
    assert not torch.allclose(with_adapters, base_lp, atol=1e-3)  # adapters are back on after


def test_no_reference_without_a_kl_term() -> None:
    assert build_reference(_policy(), kl_coef=0.0, lora=False) is None
    with pytest.raises(TypeError, match="peft model"):
        ReferencePolicy(_policy(), adapters_off=True)


# ----------------------------------------------------------------------------------------------
# the trainer


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spear-cache")


@pytest.mark.parametrize("lora", [False, True])
def test_trainer_computes_reference_logprobs_and_logs_kl(
    cache_dir: Path, tmp_path: Path, lora: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = ["loss.kl_coef=0.5", "loss.kl_type=low_var_kl", "optim.lr=1e-2"]
    if lora:
        extra += ["model.lora.enabled=true", "model.lora.r=4"]
    t = Trainer(_cfg(cache_dir, tmp_path, *extra), tmp_path)
    assert t.c.reference is not None and t.c.reference.adapters_off == lora
    calls: list[tuple[int, ...]] = []
    real = ReferencePolicy.logprobs

    def spy(self: ReferencePolicy, batch: TokenBatch, **kw: Any) -> torch.Tensor:
        calls.append(tuple(batch.input_ids.shape))
        return real(self, batch, **kw)

    monkeypatch.setattr(ReferencePolicy, "logprobs", spy)
    first, second = t.train_step(), t.train_step()
    t.close()
    assert len(calls) == 2  # once per step, before the update
    # step 1: the policy is still the reference (k3 of a zero log-ratio is 0); step 2: it moved
    assert first["actor/kl"] == pytest.approx(0.0, abs=1e-6)
    assert second["actor/kl"] > 1e-7 and math.isfinite(second["actor/kl"])
    assert "time/ref_logprobs" in first
    assert not any(k.startswith("replay/kl") for k in second)  # no KL on replayed data


def test_no_kl_term_builds_no_reference(cache_dir: Path, tmp_path: Path) -> None:
    t = Trainer(_cfg(cache_dir, tmp_path), tmp_path)
    m = t.train_step()
    t.close()
    assert t.c.reference is None and "actor/kl" not in m and "time/ref_logprobs" not in m
