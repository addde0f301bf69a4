"""Per-token policy losses: PPO clip (+ clip-higher, dual clip), Clip-Cov, KL-Cov, GPG.

One signature: ``fn(inp: PolicyLossInput, params: PolicyLossParams, generator) -> PolicyLossOutput``.
The output is the per-token loss ``[N, T]`` (NOT aggregated; exactly 0 outside the mask; the
caller aggregates it with :mod:`spear.algo.aggregation`) and 0-dim, detached metric tensors.
Nothing in here synchronises with the host (no ``.item()``, no Python branch on tensor values),
so a loss can be queued on an accelerator without stalling it. The only randomness (Clip-Cov's
token choice) draws from ``generator``, which Clip-Cov requires; the global RNG is never used.

Notation: ``lp``/``olp`` current/old log-probs, ``A`` advantages, ``m`` mask,
``delta = lp - olp``, ``r = exp(delta)``, ``L1 = -A r``, ``L2 = -A clip(r, 1 - clip_low,
1 + clip_high)``.

Relation to verl 0.9.1 ``verl/trainer/ppo/core_algos.py`` (pinned by ``tests/algo``):

* Per valid token, every loss equals verl's ``pg_losses`` matrix (vanilla, clip_cov and kl_cov
  given the same selected tokens, gpg); aggregating it with the same mode gives verl's
  ``pg_loss`` (see :mod:`spear.algo.aggregation` for the one intended difference there).
* Masked means (metrics, covariance centring) divide by ``max(count, 1)``; verl divides by
  ``count + 1e-8``. The relative difference is ``1e-8 / count``. One visible consequence: when
  the advantages are constant over a micro-batch's valid tokens our covariance is exactly 0,
  verl's a tiny non-zero number, so with ``cov_lb == 0`` verl may find eligible tokens that we
  (correctly: the covariance is 0) do not.
* ``delta`` is replaced by 0 outside the mask before anything else, so garbage log-probs in
  padding can neither produce NaN/inf nor leak gradient; those tokens get loss 0 and gradient 0.
  verl computes on padding too and relies on the mask afterwards (same result for finite inputs).
* Clip-Cov draws a uniform subset from an explicit generator (verl: ``torch.randperm`` on the
  global RNG): same distribution, different draws. KL-Cov breaks covariance ties by the lowest
  flat index (verl: whatever ``torch.topk`` returns).
* Metric names: ``approx_kl`` = verl's ``ppo_kl`` for vanilla / clip_cov; for kl_cov verl's
  ``ppo_kl`` is our ``abs_kl``; for clip_cov verl's ``pg_clipfrac`` (fraction of selected
  tokens) is our ``cov_frac``, and our ``clipfrac`` is the PPO-clipped fraction, which verl does
  not report for clip_cov. gpg reports ``approx_kl`` (verl: no metric).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from spear.algo.aggregation import masked_values
from spear.registry import Registry


@dataclass(frozen=True)
class PolicyLossInput:
    """All ``[N, T]``; ``mask`` is float 0/1; only ``log_probs`` carries gradient."""

    log_probs: Tensor
    old_log_probs: Tensor
    advantages: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.log_probs.dim() != 2:
            raise ValueError(f"log_probs must be [N, T], got shape {tuple(self.log_probs.shape)}")
        for name in ("old_log_probs", "advantages", "mask"):
            t = getattr(self, name)
            if t.shape != self.log_probs.shape:
                raise ValueError(
                    f"{name} shape {tuple(t.shape)} != log_probs shape {tuple(self.log_probs.shape)}"
                )


@dataclass(frozen=True)
class PolicyLossParams:
    """Loss settings (defaults live in ``spear.config``)."""

    clip_low: float  # PPO ratio lower clip: r >= 1 - clip_low
    clip_high: float  # PPO ratio upper clip (clip-higher): r <= 1 + clip_high
    clip_c: float  # dual-clip bound for A < 0 (vanilla only); must be > 1
    cov_ratio: float  # Clip-Cov: fraction of valid tokens to detach
    cov_lb: float  # Clip-Cov: eligible iff cov_lb < cov < cov_ub (strict)
    cov_ub: float
    kl_cov_ratio: float  # KL-Cov: fraction of valid tokens (top covariance) to penalise
    kl_cov_coef: float  # KL-Cov: coefficient of |delta| on the selected tokens

    def __post_init__(self) -> None:
        checks = [
            ("clip_low", 0 < self.clip_low < 1, "in (0, 1)"),
            ("clip_high", self.clip_high > 0, "> 0"),
            ("clip_c", self.clip_c > 1, "> 1 (dual clip)"),
            ("cov_ratio", 0 < self.cov_ratio <= 1, "in (0, 1]"),
            ("kl_cov_ratio", 0 < self.kl_cov_ratio <= 1, "in (0, 1]"),
            ("kl_cov_coef", self.kl_cov_coef >= 0 and math.isfinite(self.kl_cov_coef), ">= 0"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)}")
        if not self.cov_lb < self.cov_ub:
            raise ValueError(f"cov_lb ({self.cov_lb}) must be < cov_ub ({self.cov_ub})")


@dataclass(frozen=True)
class PolicyLossOutput:
    token_loss: Tensor  # [N, T], 0 outside the mask
    metrics: dict[str, Tensor]  # 0-dim, detached


PolicyLossFn = Callable[
    [PolicyLossInput, PolicyLossParams, "torch.Generator | None"], PolicyLossOutput
]

POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


# ----------------------------------------------------------------------------------------------
# Pure building blocks


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values [N, T]`` over ``mask > 0`` (0 if empty). []"""
    count = (mask > 0).sum().clamp(min=1).to(values.dtype)
    return masked_values(values, mask).sum() / count


def log_ratio(inp: PolicyLossInput, *, clamp: bool) -> Tensor:
    """``delta = lp - olp`` on valid tokens, 0 elsewhere; clamped to [-20, 20] if asked. [N, T]"""
    delta = torch.where(
        inp.mask > 0, inp.log_probs - inp.old_log_probs, torch.zeros_like(inp.log_probs)
    )
    return delta.clamp(min=-20.0, max=20.0) if clamp else delta


def ppo_terms(
    advantages: Tensor, ratio: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """``(L1, L2) = (-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``. Both [N, T]."""
    return -advantages * ratio, -advantages * ratio.clamp(min=1 - clip_low, max=1 + clip_high)


def token_covariance(advantages: Tensor, log_probs: Tensor, mask: Tensor) -> Tensor:
    """``(A - mean_m A)(lp - mean_m lp)``, detached (used for selection only). [N, T]"""
    a, lp = advantages.detach(), log_probs.detach()
    return (a - masked_mean(a, mask)) * (lp - masked_mean(lp, mask))


def cov_count(num_valid: Tensor, ratio: float) -> Tensor:
    """``max(floor(ratio * num_valid), 1)`` as a 0-dim long tensor (float64 math, like Python)."""
    return torch.floor(num_valid.to(torch.float64) * ratio).clamp(min=1).long()


def _ranks(keys: Tensor) -> Tensor:
    """Rank of each entry of ``keys [N, T]`` in ascending (stable) order over all entries."""
    flat = keys.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(flat.numel(), device=flat.device)
    return ranks.view(keys.shape)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Move a freshly drawn CPU tensor to ``device`` without waiting for queued device work.

    A plain CPU -> CUDA ``.to()`` synchronises the stream; a pinned, non-blocking copy does not
    (the caching host allocator keeps the pinned buffer alive until the copy has run).
    """
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def random_subset(eligible: Tensor, k: Tensor, generator: torch.Generator) -> Tensor:
    """Uniformly random ``min(k, #eligible)`` entries of the bool mask ``eligible [N, T]``.

    The uniform keys ``[N, T]`` are drawn from ``generator`` on the generator's own device, so
    a given generator state picks the same tokens whichever device the loss runs on.
    """
    u = torch.rand(
        eligible.shape, dtype=torch.float64, generator=generator, device=generator.device
    )  # [N, T]
    u = _to_device(u, eligible.device)
    keys = torch.where(eligible, u, torch.full_like(u, 2.0))  # ineligible sort last
    return eligible & (_ranks(keys) < k)


def _require_generator(generator: torch.Generator | None, what: str) -> torch.Generator:
    if generator is None:
        raise ValueError(
            f"{what} draws random tokens: pass an explicit torch.Generator (the global RNG is "
            "never used, so that runs are reproducible and resumable)"
        )
    return generator


def top_k_subset(scores: Tensor, eligible: Tensor, k: Tensor) -> Tensor:
    """The ``min(k, #eligible)`` eligible entries with the largest ``scores`` (ties: first index)."""
    keys = torch.where(eligible, -scores, torch.full_like(scores, math.inf))
    return eligible & (_ranks(keys) < k)


def _metric(x: Tensor) -> Tensor:
    return x.detach()


# ----------------------------------------------------------------------------------------------
# vanilla


@POLICY_LOSSES.register("vanilla")
def vanilla_loss(
    inp: PolicyLossInput, params: PolicyLossParams, generator: torch.Generator | None = None
) -> PolicyLossOutput:
    """PPO clip with asymmetric bounds (clip-higher) and dual clip for negative advantages.

    ``delta`` is clamped to [-20, 20]; ``Lc = max(L1, L2)``; ``L = min(Lc, -A clip_c)`` where
    ``A < 0``, else ``Lc``. Metrics: ``clipfrac`` = mean[L2 > L1]; ``clipfrac_lower`` =
    mean[Lc > -A clip_c and A < 0]; ``approx_kl`` = mean(-delta). Same as verl
    ``compute_policy_loss_vanilla`` before aggregation.
    """
    a, m = inp.advantages, inp.mask
    delta = log_ratio(inp, clamp=True)
    l1, l2 = ppo_terms(a, torch.exp(delta), params.clip_low, params.clip_high)
    clipped = torch.maximum(l1, l2)
    l3 = -a * params.clip_c
    loss = torch.where(a < 0, torch.minimum(clipped, l3), clipped)
    metrics = {
        "clipfrac": masked_mean((l2 > l1).to(a.dtype), m),
        "clipfrac_lower": masked_mean(((clipped > l3) & (a < 0)).to(a.dtype), m),
        "approx_kl": masked_mean(-delta, m),
    }
    return PolicyLossOutput(masked_values(loss, m), {k: _metric(v) for k, v in metrics.items()})


# ----------------------------------------------------------------------------------------------
# Clip-Cov


def clip_cov_select(
    inp: PolicyLossInput, params: PolicyLossParams, generator: torch.Generator | None
) -> Tensor:
    """Clip-Cov's detached tokens: bool ``[N, T]``.

    Eligible = valid, not already PPO-clipped (L2 > L1), and ``cov_lb < cov < cov_ub`` with
    ``cov`` from :func:`token_covariance` over this call's valid tokens. Picks
    ``min(max(floor(cov_ratio * #valid), 1), #eligible)`` eligible tokens uniformly at random,
    drawing only from ``generator`` (required: ``None`` raises ``ValueError``). verl draws the
    same kind of uniform subset with ``torch.randperm`` on the global RNG; the distribution of
    the selection is identical, the individual draws are not.

    Statistics are per call, i.e. per micro-batch as in verl: unlike the aggregation modes, the
    Clip-Cov (and KL-Cov) token choice depends on how a mini-batch is split.
    """
    gen = _require_generator(generator, "clip_cov")
    valid = inp.mask > 0
    l1, l2 = ppo_terms(
        inp.advantages, torch.exp(log_ratio(inp, clamp=False)), params.clip_low, params.clip_high
    )
    cov = token_covariance(inp.advantages, inp.log_probs, inp.mask)
    eligible = valid & ~(l2 > l1) & (cov > params.cov_lb) & (cov < params.cov_ub)
    return random_subset(eligible, cov_count(valid.sum(), params.cov_ratio), gen)


def clip_cov_loss_from_selection(
    inp: PolicyLossInput, params: PolicyLossParams, selected: Tensor
) -> PolicyLossOutput:
    """Clip-Cov loss given the detached tokens ``selected [N, T]`` (bool).

    ``L = max(L1, L2) * (1 - selected)`` with no delta clamp and no dual clip (as verl
    ``compute_policy_loss_clip_cov``); selected tokens keep their place in the aggregation
    denominators but carry no loss and no gradient. Metrics: ``clipfrac`` = PPO-clipped fraction
    (mean[L2 > L1]); ``cov_frac`` = selected fraction (verl's ``pg_clipfrac`` for this loss);
    ``cov_selected`` = number selected; ``approx_kl`` = mean(-delta).
    """
    a, m = inp.advantages, inp.mask
    delta = log_ratio(inp, clamp=False)
    l1, l2 = ppo_terms(a, torch.exp(delta), params.clip_low, params.clip_high)
    keep = (~selected).to(a.dtype)
    loss = torch.maximum(l1, l2) * keep
    sel = (selected & (m > 0)).to(a.dtype)
    metrics = {
        "clipfrac": masked_mean((l2 > l1).to(a.dtype), m),
        "cov_frac": masked_mean(sel, m),
        "cov_selected": sel.sum(),
        "approx_kl": masked_mean(-delta, m),
    }
    return PolicyLossOutput(masked_values(loss, m), {k: _metric(v) for k, v in metrics.items()})


@POLICY_LOSSES.register("clip_cov")
def clip_cov_loss(
    inp: PolicyLossInput, params: PolicyLossParams, generator: torch.Generator | None = None
) -> PolicyLossOutput:
    """Clip-Cov (arXiv 2505.22617): PPO clip, plus a few high-covariance tokens detached."""
    return clip_cov_loss_from_selection(inp, params, clip_cov_select(inp, params, generator))


# ----------------------------------------------------------------------------------------------
# KL-Cov


def kl_cov_select(inp: PolicyLossInput, params: PolicyLossParams) -> Tensor:
    """KL-Cov's penalised tokens: the ``max(floor(kl_cov_ratio * #valid), 1)`` valid tokens with
    the largest :func:`token_covariance` (none if no token is valid). bool ``[N, T]``."""
    valid = inp.mask > 0
    cov = token_covariance(inp.advantages, inp.log_probs, inp.mask)
    return top_k_subset(cov, valid, cov_count(valid.sum(), params.kl_cov_ratio))


def kl_cov_loss_from_selection(
    inp: PolicyLossInput, params: PolicyLossParams, selected: Tensor
) -> PolicyLossOutput:
    """KL-Cov loss given the penalised tokens ``selected [N, T]`` (bool).

    No clipping: ``L = -A r``, plus ``kl_cov_coef * |delta|`` on selected tokens (as verl
    ``compute_policy_loss_kl_cov``). Metrics: ``approx_kl`` = mean(-delta); ``abs_kl`` =
    mean|delta| (verl's ``ppo_kl`` for this loss); ``cov_frac``; ``cov_selected``.
    """
    a, m = inp.advantages, inp.mask
    delta = log_ratio(inp, clamp=False)
    base = -a * torch.exp(delta)
    loss = torch.where(selected, base + params.kl_cov_coef * delta.abs(), base)
    sel = (selected & (m > 0)).to(a.dtype)
    metrics = {
        "approx_kl": masked_mean(-delta, m),
        "abs_kl": masked_mean(delta.abs(), m),
        "cov_frac": masked_mean(sel, m),
        "cov_selected": sel.sum(),
    }
    return PolicyLossOutput(masked_values(loss, m), {k: _metric(v) for k, v in metrics.items()})


@POLICY_LOSSES.register("kl_cov")
def kl_cov_loss(
    inp: PolicyLossInput, params: PolicyLossParams, generator: torch.Generator | None = None
) -> PolicyLossOutput:
    """KL-Cov (arXiv 2505.22617): unclipped PG loss, |delta| penalty on top-covariance tokens."""
    return kl_cov_loss_from_selection(inp, params, kl_cov_select(inp, params))


# ----------------------------------------------------------------------------------------------
# GPG


@POLICY_LOSSES.register("gpg")
def gpg_loss(
    inp: PolicyLossInput, params: PolicyLossParams, generator: torch.Generator | None = None
) -> PolicyLossOutput:
    """GPG: ``L = -lp * A`` (no ratio, no clip). Metric ``approx_kl`` = mean(-delta)."""
    m = inp.mask
    lp = torch.where(m > 0, inp.log_probs, torch.zeros_like(inp.log_probs))
    loss = -lp * inp.advantages
    metrics = {"approx_kl": masked_mean(-log_ratio(inp, clamp=False), m)}
    return PolicyLossOutput(masked_values(loss, m), {k: _metric(v) for k, v in metrics.items()})
