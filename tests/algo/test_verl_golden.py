"""spear against numbers that verl 0.9.1 itself computed (``tests/data/verl_golden.pt``).

The file holds seeded inputs and verl's outputs, written by ``tests/data/make_verl_golden.py``
in a separate virtual environment with verl installed (see its docstring; verl is never a
dependency of spear). Unlike ``test_verl_agreement.py``, which restates verl's formulas, nothing
here re-derives verl: every expected number came out of verl's own code. Values agree to
``TOL = 1e-6`` (absolute; 1e-12 relative for the ~1e11 entries KL-Cov produces).

Pinned intended differences (the module docstrings of :mod:`spear.algo.advantages`,
:mod:`spear.algo.losses` and :mod:`spear.algo.aggregation` say why):

* A group of one: verl gives the lone sample ``R / (1 + eps)`` (GRPO with std) or ``R``
  (without std, RLOO); spear gives it advantage 0 (no group, no group-relative signal).
* Masked means divide by ``max(count, 1)`` (verl: ``count + 1e-8``): a relative difference of
  ``1e-8 / count``, far below ``TOL``.
* Clip-Cov's random subset: same eligible tokens and count as verl, drawn from spear's own
  generator; given verl's draw, the loss is verl's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from spear.algo.advantages import ADVANTAGES, AdvantageInput, AdvantageParams
from spear.algo.aggregation import AGGREGATIONS, AggregationNorm
from spear.algo.kl import KL_ESTIMATORS
from spear.algo.logprobs import token_logprobs_and_entropy
from spear.algo.losses import (
    POLICY_LOSSES,
    PolicyLossInput,
    PolicyLossParams,
    clip_cov_loss_from_selection,
    clip_cov_select,
)

TOL = 1e-6
GOLDEN_PATH = Path(__file__).resolve().parents[1] / "data" / "verl_golden.pt"
AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    data: dict[str, Any] = torch.load(GOLDEN_PATH)
    assert data["verl_version"] == "0.9.1"
    return data


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    # rtol 1e-12: KL-Cov's coefficient makes some entries ~1e11, where float64's last bit is
    # ~1e-5 and summation order (machine-dependent BLAS) may flip it.
    torch.testing.assert_close(got.double(), want.double(), atol=TOL, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# advantages


def _adv_params(norm: bool) -> AdvantageParams:
    return AdvantageParams(
        norm_by_std=norm, eps=1e-6, stats_over="episode", gigpo_step_weight=1.0,
        gigpo_norm_by_std=True,
    )  # fmt: skip


def _spear_adv(golden: dict[str, Any], estimator: str, norm: bool) -> torch.Tensor:
    """spear's advantage broadcast over each row's response mask, like verl's. [N, T]"""
    inp = golden["adv/inputs"]
    n = inp["scores"].numel()
    adv = ADVANTAGES.get(estimator)(
        AdvantageInput(
            scores=inp["scores"], group_ids=inp["index"].long(), episode_ids=torch.arange(n),
            valid=torch.ones(n, dtype=torch.bool),
        ),
        _adv_params(norm),
    )  # fmt: skip
    return adv[:, None] * inp["mask"]


@pytest.mark.parametrize(
    ("estimator", "norm", "key"),
    [
        ("grpo", True, "adv/grpo_std"),
        ("grpo", False, "adv/grpo_no_std"),
        ("drgrpo", True, "adv/grpo_no_std"),  # Dr.GRPO ignores norm_by_std
        ("rloo", False, "adv/rloo"),
    ],
)
def test_advantages_match_verl_and_a_group_of_one_gets_zero(
    golden: dict[str, Any], estimator: str, norm: bool, key: str
) -> None:
    inp, want = golden["adv/inputs"], golden[key]
    got = _spear_adv(golden, estimator, norm)
    index = inp["index"]
    lone = torch.tensor([int((index == g).sum()) == 1 for g in index.tolist()])
    assert lone.tolist() == [False] * 7 + [True, False, False, True]  # groups 2 and 4
    _close(got[~lone], want[~lone])
    # the intended difference: verl keeps the lone score (over 1 + eps with std), spear gives 0
    assert (got[lone] == 0).all()
    scale = 1 / (1 + 1e-6) if key == "adv/grpo_std" else 1.0
    _close(want[lone], inp["scores"][lone, None] * scale * inp["mask"][lone])


# ----------------------------------------------------------------------------------------------
# policy losses


def _loss_input(golden: dict[str, Any]) -> PolicyLossInput:
    x = golden["loss/inputs"]
    return PolicyLossInput(
        log_probs=x["log_prob"], old_log_probs=x["old_log_prob"], advantages=x["advantages"],
        mask=x["mask"],
    )  # fmt: skip


def _loss_params(**kw: float) -> PolicyLossParams:
    base = dict(
        clip_low=0.2, clip_high=0.28, clip_c=3.0, cov_ratio=0.1, cov_lb=-0.5, cov_ub=0.5,
        kl_cov_ratio=0.1, kl_cov_coef=1.0,
    )  # fmt: skip
    return PolicyLossParams(**{**base, **kw})


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask > 0, x, torch.zeros_like(x))


def test_vanilla_clip_higher_dual_clip_matches_verl(golden: dict[str, Any]) -> None:
    inp = _loss_input(golden)
    out = POLICY_LOSSES.get("vanilla")(inp, _loss_params(), None)
    _close(out.token_loss, _masked(golden["loss/vanilla/matrix"], inp.mask))
    clipfrac, ppo_kl, clipfrac_lower = golden["loss/vanilla/metrics"].tolist()
    assert clipfrac > 0 and clipfrac_lower > 0  # both clips acted on these inputs
    assert float(out.metrics["clipfrac"]) == pytest.approx(clipfrac, abs=TOL)
    assert float(out.metrics["approx_kl"]) == pytest.approx(ppo_kl, abs=TOL)
    assert float(out.metrics["clipfrac_lower"]) == pytest.approx(clipfrac_lower, abs=TOL)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_vanilla_pg_loss_per_aggregation_matches_verl(golden: dict[str, Any], mode: str) -> None:
    inp = _loss_input(golden)
    token_loss = POLICY_LOSSES.get("vanilla")(inp, _loss_params(), None).token_loss
    # verl's default Dr.GRPO constant is the padded width of the batch
    norm = AggregationNorm.from_mask(inp.mask, max_response_len=inp.mask.shape[-1])
    got = AGGREGATIONS.get(mode)(token_loss, inp.mask, norm)
    _close(got, golden[f"loss/vanilla/{mode}"])


def test_clip_cov_selects_verls_tokens_when_all_eligible_fit(golden: dict[str, Any]) -> None:
    inp, want = _loss_input(golden), golden["loss/clip_cov_all"]
    params = _loss_params(cov_ratio=1.0)  # every eligible token is detached: no draw matters
    selected = clip_cov_select(inp, params, torch.Generator().manual_seed(0))
    assert int(selected.sum()) > 0 and torch.equal(selected, want["selected"])
    out = POLICY_LOSSES.get("clip_cov")(inp, params, torch.Generator().manual_seed(0))
    _close(out.token_loss, _masked(want["matrix"], inp.mask))
    assert float(out.metrics["cov_frac"]) == pytest.approx(float(want["clipfrac"]), abs=TOL)


def test_clip_cov_random_subset_has_verls_size_and_given_verls_draw_verls_loss(
    golden: dict[str, Any],
) -> None:
    inp, want = _loss_input(golden), golden["loss/clip_cov_few"]
    eligible = golden["loss/clip_cov_all"]["selected"]
    params = _loss_params(cov_ratio=0.1)  # floor(0.1 * 24 valid) = 2 of 9 eligible tokens
    ours = clip_cov_select(inp, params, torch.Generator().manual_seed(0))
    assert int(ours.sum()) == int(want["selected"].sum()) == 2
    assert not (ours & ~eligible).any() and not (want["selected"] & ~eligible).any()
    out = clip_cov_loss_from_selection(inp, params, want["selected"])
    _close(out.token_loss, _masked(want["matrix"], inp.mask))
    assert float(out.metrics["cov_frac"]) == pytest.approx(float(want["clipfrac"]), abs=TOL)


def test_kl_cov_matches_verl(golden: dict[str, Any]) -> None:
    inp, want = _loss_input(golden), golden["loss/kl_cov"]
    out = POLICY_LOSSES.get("kl_cov")(inp, _loss_params(kl_cov_ratio=0.1, kl_cov_coef=1.0), None)
    assert int(out.metrics["cov_selected"]) == 2  # floor(0.1 * 24)
    _close(out.token_loss, _masked(want["matrix"], inp.mask))
    assert float(out.metrics["abs_kl"]) == pytest.approx(float(want["ppo_kl"]), abs=TOL)


# ----------------------------------------------------------------------------------------------
# aggregation, entropy, KL


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregation_matches_verl_agg_loss(golden: dict[str, Any], mode: str) -> None:
    x = golden["agg/inputs"]
    mask = x["mask"]
    assert (mask.sum(-1) == 0).any()  # a row without a valid token is not counted
    norm = AggregationNorm.from_mask(mask, max_response_len=mask.shape[-1])
    _close(AGGREGATIONS.get(mode)(x["loss_mat"], mask, norm), golden[f"agg/{mode}"])


def test_dr_grpo_constant_matches_verl_loss_scale_factor(golden: dict[str, Any]) -> None:
    x = golden["agg/inputs"]
    norm = AggregationNorm.from_mask(x["mask"], max_response_len=16)
    got = AGGREGATIONS.get("seq-mean-token-sum-norm")(x["loss_mat"], x["mask"], norm)
    _close(got, golden["agg/seq-mean-token-sum-norm@16"])


def test_entropy_and_logprobs_from_logits_match_verl(golden: dict[str, Any]) -> None:
    x = golden["entropy/inputs"]
    lp, ent = token_logprobs_and_entropy(
        x["logits"], x["labels"], temperature=1.0, chunk_size=5, with_entropy=True
    )
    assert ent is not None
    _close(ent, golden["entropy/entropy"])
    _close(lp, golden["entropy/logprobs"])


KL_NAMES = ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"]


@pytest.mark.parametrize("name", KL_NAMES + [k + "+" for k in KL_NAMES])
def test_kl_value_and_gradient_match_verl(golden: dict[str, Any], name: str) -> None:
    x = golden["kl/inputs"]
    lp = x["logprob"].clone().requires_grad_(True)
    value = KL_ESTIMATORS.get(name)(lp, x["ref_logprob"])
    value.sum().backward()
    assert lp.grad is not None
    _close(value.detach(), golden[f"kl/{name}/value"])
    _close(lp.grad, golden[f"kl/{name}/grad"])
