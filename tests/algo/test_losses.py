"""Policy losses: hand-derived numbers (reference §11), selections, masking, no host sync."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear.algo.aggregation import AGGREGATIONS, AggregationNorm
from spear.algo.losses import (
    POLICY_LOSSES,
    PolicyLossInput,
    PolicyLossParams,
    clip_cov_loss_from_selection,
    clip_cov_select,
    cov_count,
    kl_cov_loss_from_selection,
    kl_cov_select,
)
from spear.registry import UnknownNameError

LN = math.log


def params(**kw: float) -> PolicyLossParams:
    base = dict(
        clip_low=0.2, clip_high=0.28, clip_c=3.0, cov_ratio=0.5, cov_lb=1.0, cov_ub=5.0,
        kl_cov_ratio=0.25, kl_cov_coef=0.5,
    )  # fmt: skip
    base.update(kw)
    return PolicyLossParams(**base)


def row(
    lp: list[float], old: list[float], adv: list[float], mask: list[float] | None = None
) -> PolicyLossInput:
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return PolicyLossInput(
        t(lp).requires_grad_(True), t(old), t(adv), t(mask if mask is not None else [1.0] * len(lp))
    )


def grad_of(inp: PolicyLossInput, token_loss: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(token_loss.sum(), inp.log_probs)
    return g


# ---------------------------------------------------------------------------- vanilla


def test_vanilla_dual_clip_reference_vectors() -> None:
    # eps 0.2 / 0.28, c = 3 (reference §11):
    #  t0: A=-1, r=5:   L1 = 5, L2 = -(-1)*1.28 = 1.28, max = 5, dual min(5, 3) = 3, gradient 0
    #  t1: A=+1, r=1.5: L1 = -1.5, L2 = -1.28 -> L = -1.28 (clipped), gradient 0
    #  t2: A=+1, r=1:   L = -1, gradient dL/dlp = -A r = -1
    inp = row([LN(5), LN(1.5), 0.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 1.0])
    out = POLICY_LOSSES.get("vanilla")(inp, params(), None)
    torch.testing.assert_close(
        out.token_loss, torch.tensor([[3.0, -1.28, -1.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        grad_of(inp, out.token_loss), torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64)
    )
    # clipfrac: only t1 has L2 > L1 -> 1/3; clipfrac_lower: only t0 (5 > 3, A < 0) -> 1/3
    # approx_kl = mean(-delta) = -(ln 5 + ln 1.5 + 0) / 3 = -0.671634
    assert out.metrics["clipfrac"].item() == pytest.approx(1 / 3)
    assert out.metrics["clipfrac_lower"].item() == pytest.approx(1 / 3)
    assert out.metrics["approx_kl"].item() == pytest.approx(-(LN(5) + LN(1.5)) / 3)


def test_vanilla_lower_clip_and_delta_clamp() -> None:
    # t0: A=-1, r=0.5: L1 = 0.5, L2 = 0.8 (ratio clipped up to 1 - 0.2) -> L = 0.8
    # t1: A=-1, delta = 30 clamped to 20: L1 = e^20, dual clip -> 3; approx_kl uses -20
    inp = row([LN(0.5), 30.0], [0.0, 0.0], [-1.0, -1.0])
    out = POLICY_LOSSES.get("vanilla")(inp, params(), None)
    torch.testing.assert_close(out.token_loss, torch.tensor([[0.8, 3.0]], dtype=torch.float64))
    assert out.metrics["approx_kl"].item() == pytest.approx((-LN(0.5) - 20.0) / 2)


def test_gpg_hand_values() -> None:
    # L = -lp * A: -(-1)(1) = 1; -(-2)(-0.5) = -1; gradient -A
    inp = row([-1.0, -2.0], [-1.5, -1.0], [1.0, -0.5])
    out = POLICY_LOSSES.get("gpg")(inp, params(), None)
    torch.testing.assert_close(out.token_loss, torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(
        grad_of(inp, out.token_loss), torch.tensor([[-1.0, 0.5]], dtype=torch.float64)
    )


# ---------------------------------------------------------------------------- Clip-Cov


def test_cov_count_reference_vectors() -> None:
    # 4000 valid tokens: ratio 0.02 -> 80; ratio 0.0002 -> floor(0.8) = 0 -> at least 1
    assert cov_count(torch.tensor(4000), 0.02).item() == 80
    assert cov_count(torch.tensor(4000), 0.0002).item() == 1
    assert cov_count(torch.tensor(0), 0.5).item() == 1


# One row, 4 tokens, r = 1 everywhere (no PPO clipping): A = [2, 2, -2, -2] (mean 0),
# lp = [-1, -3, -1, -3] (mean -2) -> cov = A (lp + 2) = [2, -2, -2, 2].
# With lb = 1 < cov < ub = 5 the eligible tokens are 0 and 3.
COV_LP, COV_A = [-1.0, -3.0, -1.0, -3.0], [2.0, 2.0, -2.0, -2.0]


def test_clip_cov_selects_eligible_tokens() -> None:
    inp = row(COV_LP, COV_LP, COV_A)
    g = torch.Generator().manual_seed(0)
    # ratio 0.5 -> n_clip = floor(0.5 * 4) = 2 = #eligible -> both eligible tokens
    assert clip_cov_select(inp, params(cov_ratio=0.5), g).tolist() == [[True, False, False, True]]
    # ratio 0.25 -> n_clip = 1: exactly one of tokens 0 / 3
    sel = clip_cov_select(inp, params(cov_ratio=0.25), g)
    assert int(sel.sum()) == 1 and bool(sel[0, 0] | sel[0, 3])


def test_clip_cov_loss_and_gradient() -> None:
    # r = 1: L = max(-A, -A) = -A = [-2, -2, 2, 2]; selected tokens 0 and 3 -> 0.
    # gradient -A r on kept tokens: [0, -2, 2, 0]
    inp = row(COV_LP, COV_LP, COV_A)
    out = POLICY_LOSSES.get("clip_cov")(
        inp, params(cov_ratio=0.5), torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(
        out.token_loss, torch.tensor([[0.0, -2.0, 2.0, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        grad_of(inp, out.token_loss), torch.tensor([[0.0, -2.0, 2.0, 0.0]], dtype=torch.float64)
    )
    assert out.metrics["cov_selected"].item() == 2
    assert out.metrics["cov_frac"].item() == pytest.approx(0.5)
    assert out.metrics["clipfrac"].item() == 0.0


def test_clip_cov_skips_ppo_clipped_tokens() -> None:
    # token 0 gets r = 1.5 (old = lp - ln 1.5): L1 = -3 < L2 = -2.56 -> PPO-clipped, not eligible.
    # cov is unchanged (it uses the current lp), so only token 3 is left: 1 selected although
    # n_clip = 2. Token 0's loss is the clipped -2 * 1.28 = -2.56.
    old = [COV_LP[0] - LN(1.5), *COV_LP[1:]]
    inp = row(COV_LP, old, COV_A)
    sel = clip_cov_select(inp, params(cov_ratio=0.5), torch.Generator().manual_seed(0))
    assert sel.tolist() == [[False, False, False, True]]
    out = clip_cov_loss_from_selection(inp, params(), sel)
    torch.testing.assert_close(
        out.token_loss, torch.tensor([[-2.56, -2.0, 2.0, 0.0]], dtype=torch.float64)
    )
    assert out.metrics["clipfrac"].item() == pytest.approx(0.25)


def test_clip_cov_bounds_are_strict() -> None:
    inp = row(COV_LP, COV_LP, COV_A)
    g = torch.Generator().manual_seed(0)
    assert not clip_cov_select(inp, params(cov_lb=2.0, cov_ub=5.0), g).any()  # cov 2 is not > 2
    assert not clip_cov_select(inp, params(cov_lb=0.0, cov_ub=2.0), g).any()  # cov 2 is not < 2


def test_clip_cov_selection_is_seeded_by_generator_only() -> None:
    inp = row(
        [-(i % 7) / 2 for i in range(40)],
        [-(i % 7) / 2 for i in range(40)],
        [(-1.0) ** (i // 3) for i in range(40)],
    )
    p = params(cov_ratio=0.1, cov_lb=-10.0, cov_ub=10.0)
    a = clip_cov_select(inp, p, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG must not matter
    b = clip_cov_select(inp, p, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and int(a.sum()) == 4


# ---------------------------------------------------------------------------- KL-Cov


def test_kl_cov_hand_values() -> None:
    # lp = [-1, -3, -1, -4] (mean -2.25), A = [2, 2, -2, -2] (mean 0)
    # cov = [2*1.25, 2*(-0.75), -2*1.25, -2*(-1.75)] = [2.5, -1.5, -2.5, 3.5]
    # ratio 0.25 -> k = 1 -> token 3; ratio 0.5 -> tokens 3 and 0
    # delta = [0.1, 0, 0, -0.2]; coef 0.5:
    #  t0 = -2 e^0.1 = -2.210342; t1 = -2; t2 = 2; t3 = 2 e^-0.2 + 0.5 * 0.2 = 1.737462
    lp = [-1.0, -3.0, -1.0, -4.0]
    delta = [0.1, 0.0, 0.0, -0.2]
    inp = row(lp, [a - d for a, d in zip(lp, delta)], COV_A)
    assert kl_cov_select(inp, params(kl_cov_ratio=0.25)).tolist() == [[False, False, False, True]]
    assert kl_cov_select(inp, params(kl_cov_ratio=0.5)).tolist() == [[True, False, False, True]]
    out = POLICY_LOSSES.get("kl_cov")(inp, params(kl_cov_ratio=0.25, kl_cov_coef=0.5), None)
    expected = [-2 * math.exp(0.1), -2.0, 2.0, 2 * math.exp(-0.2) + 0.1]
    torch.testing.assert_close(out.token_loss, torch.tensor([expected], dtype=torch.float64))
    # gradient: -A r, plus coef * sign(delta) on the selected token: 2 e^-0.2 - 0.5
    g = grad_of(inp, out.token_loss)
    torch.testing.assert_close(g[0, 3], torch.tensor(2 * math.exp(-0.2) - 0.5, dtype=torch.float64))
    assert out.metrics["abs_kl"].item() == pytest.approx(0.075)  # (0.1 + 0.2) / 4
    assert out.metrics["approx_kl"].item() == pytest.approx(0.025)  # -(0.1 - 0.2) / 4
    # selection given explicitly gives the same loss
    same = kl_cov_loss_from_selection(
        inp, params(kl_cov_coef=0.5), kl_cov_select(inp, params(kl_cov_ratio=0.25))
    )
    torch.testing.assert_close(same.token_loss, out.token_loss)


# ---------------------------------------------------------------------------- all losses


@pytest.mark.parametrize("name", ["vanilla", "clip_cov", "kl_cov", "gpg"])
def test_padding_is_inert(name: str) -> None:
    # garbage old log-probs (-inf, nan) on masked tokens: loss 0 and gradient 0 there, no NaN
    inp = row(
        [-1.0, -0.5, -2.0], [-1.2, -math.inf, math.nan], [1.0, 1.0, -1.0], mask=[1.0, 0.0, 0.0]
    )
    out = POLICY_LOSSES.get(name)(inp, params(cov_lb=-10.0), torch.Generator().manual_seed(0))
    assert torch.equal(out.token_loss[0, 1:], torch.zeros(2, dtype=torch.float64))
    g = grad_of(inp, out.token_loss)
    assert torch.isfinite(g).all() and torch.equal(g[0, 1:], torch.zeros(2, dtype=torch.float64))
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("name", ["vanilla", "clip_cov", "kl_cov", "gpg"])
def test_no_host_sync(name: str) -> None:
    """On the meta device every value read (.item(), bool(tensor)) raises: the loss and its
    aggregation must run there end to end, backward included."""
    d = "meta"
    lp = torch.empty(3, 5, device=d, requires_grad=True)
    x = torch.empty(3, 5, device=d)
    gen = torch.Generator().manual_seed(0)  # a CPU generator, as the trainer passes
    out = POLICY_LOSSES.get(name)(PolicyLossInput(lp, x, x, x), params(), gen)
    assert out.token_loss.device.type == "meta"
    for mode in AGGREGATIONS:
        AGGREGATIONS.get(mode)(out.token_loss, x, AggregationNorm.from_mask(x, 5)).backward(
            retain_graph=True
        )
    assert lp.grad is not None and lp.grad.shape == (3, 5)
    assert all(v.device.type == "meta" for v in out.metrics.values())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vanilla", "clip_cov", "kl_cov", "gpg"])
def test_no_host_sync_on_cuda(name: str) -> None:
    """Under CUDA's sync debug mode "error" any synchronising call (``.item()``, ``nonzero``, a
    blocking host -> device copy such as Clip-Cov's random keys) raises."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    d = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 64, generator=g)
    lp = (old + 0.3 * torch.randn(4, 64, generator=g)).to(d).requires_grad_(True)
    adv = torch.randn(4, 1, generator=g).expand(4, 64).contiguous().to(d)
    mask = (torch.rand(4, 64, generator=g) < 0.8).float().to(d)
    old = old.to(d)
    p = params(cov_ratio=0.1, cov_lb=-5.0, cov_ub=5.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = POLICY_LOSSES.get(name)(PolicyLossInput(lp, old, adv, mask), p, g)
        for mode in AGGREGATIONS:
            norm = AggregationNorm.from_mask(mask, 64)
            AGGREGATIONS.get(mode)(out.token_loss, mask, norm).backward(retain_graph=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert lp.grad is not None and bool(torch.isfinite(lp.grad).all())


def test_clip_cov_needs_an_explicit_generator() -> None:
    inp = row(COV_LP, COV_LP, COV_A)
    with pytest.raises(ValueError, match=r"torch\.Generator"):
        POLICY_LOSSES.get("clip_cov")(inp, params(), None)
    with pytest.raises(ValueError, match=r"torch\.Generator"):
        clip_cov_select(inp, params(), None)


def test_param_and_input_validation() -> None:
    with pytest.raises(ValueError, match="clip_c"):
        params(clip_c=1.0)
    with pytest.raises(ValueError, match="clip_low"):
        params(clip_low=1.0)
    with pytest.raises(ValueError, match="cov_ratio"):
        params(cov_ratio=0.0)
    with pytest.raises(ValueError, match="cov_lb"):
        params(cov_lb=5.0, cov_ub=5.0)
    with pytest.raises(ValueError, match="mask shape"):
        PolicyLossInput(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(UnknownNameError, match="clip_cov"):
        POLICY_LOSSES.get("clip-cov")


# ---------------------------------------------------------------------------- properties


@st.composite
def loss_inputs(draw: st.DrawFn) -> PolicyLossInput:
    n, t = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    lp = old + torch.randn(n, t, generator=g, dtype=torch.float64) * draw(
        st.sampled_from([0.0, 0.1, 0.5])
    )
    adv = torch.randn(n, 1, generator=g, dtype=torch.float64).expand(n, t).clone()
    mask = (torch.rand(n, t, generator=g) < draw(st.floats(0.0, 1.0))).double()
    return PolicyLossInput(lp.requires_grad_(True), old, adv, mask)


@settings(max_examples=30, deadline=None)
@given(inp=loss_inputs(), name=st.sampled_from(["vanilla", "clip_cov", "kl_cov", "gpg"]))
def test_masked_tokens_get_zero_gradient(inp: PolicyLossInput, name: str) -> None:
    out = POLICY_LOSSES.get(name)(inp, params(cov_lb=-10.0), torch.Generator().manual_seed(0))
    g = grad_of(inp, out.token_loss)
    assert torch.equal(g[inp.mask == 0], torch.zeros_like(g[inp.mask == 0]))
    assert torch.equal(out.token_loss[inp.mask == 0], torch.zeros_like(g[inp.mask == 0]))


@settings(max_examples=40, deadline=None)
@given(
    inp=loss_inputs(),
    ratio=st.sampled_from([0.01, 0.1, 0.3, 1.0]),
    lb=st.sampled_from([-2.0, -0.5, -0.1, 0.05, 0.3]),  # away from cov == 0 (constant-A rows)
    seed=st.integers(0, 99),
)
def test_clip_cov_selection_properties(
    inp: PolicyLossInput, ratio: float, lb: float, seed: int
) -> None:
    """Never selects masked or PPO-clipped tokens; selects exactly min(n_clip, #eligible)."""
    p = params(cov_ratio=ratio, cov_lb=lb, cov_ub=lb + 1.5)
    sel = clip_cov_select(inp, p, torch.Generator().manual_seed(seed))
    valid = inp.mask > 0
    r = torch.exp(inp.log_probs.detach() - inp.old_log_probs)
    l1, l2 = -inp.advantages * r, -inp.advantages * r.clamp(1 - p.clip_low, 1 + p.clip_high)
    a, lp = inp.advantages[valid], inp.log_probs.detach()[valid]
    cov = torch.zeros_like(r)
    if valid.any():
        cov[valid] = (a - a.mean()) * (lp - lp.mean())
    eligible = valid & ~(l2 > l1) & (cov > p.cov_lb) & (cov < p.cov_ub)
    assert not (sel & ~eligible).any()
    n_clip = max(1, math.floor(ratio * int(valid.sum())))
    assert int(sel.sum()) == min(n_clip, int(eligible.sum()))


def _vanilla_scalar(lp: float, old: float, a: float, p: PolicyLossParams) -> float:
    """Reference §4.1 for one token, in plain Python floats."""
    r = math.exp(min(max(lp - old, -20.0), 20.0))
    clipped = max(-a * r, -a * min(max(r, 1 - p.clip_low), 1 + p.clip_high))
    return min(clipped, -a * p.clip_c) if a < 0 else clipped


@settings(max_examples=20, deadline=None)
@given(inp=loss_inputs())
def test_vanilla_matches_scalar_reference(inp: PolicyLossInput) -> None:
    p = params()
    out = POLICY_LOSSES.get("vanilla")(inp, p, None).token_loss
    n, t = out.shape
    for i, j in itertools.product(range(n), range(t)):
        args = (
            inp.log_probs[i, j].item(),
            inp.old_log_probs[i, j].item(),
            inp.advantages[i, j].item(),
        )
        want = _vanilla_scalar(*args, p) if inp.mask[i, j] > 0 else 0.0
        assert out[i, j].item() == pytest.approx(want, abs=1e-12)
