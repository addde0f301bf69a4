"""The PPO-style policy update shared by the on-policy pass and the self-imitation (replay) pass.

For each epoch the batch is shuffled (seeded) and cut into mini-batches; each mini-batch is one
optimizer step, accumulated over micro-batches. The aggregation normaliser (valid tokens,
sequences, Dr.GRPO length constant) is computed over the whole mini-batch, so the gradient does
not depend on how a mini-batch is split into micro-batches. A mini-batch whose loss or gradient
norm is not finite is skipped (no optimizer step) and counted.

When the update is a single optimizer step over the batch (one epoch, one mini-batch), the
parameters do not change until after every micro-batch's forward pass, so each forward pass *is*
the policy before the update: ``old_from_forward`` takes the old log-probs from it (detached)
instead of from a separate pass, and returns them as the batch's behaviour log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spear.algo.aggregation import AGGREGATIONS, AggregationNorm
from spear.algo.kl import KL_ESTIMATORS
from spear.algo.losses import POLICY_LOSSES, PolicyLossInput, PolicyLossParams, masked_mean
from spear.policy import Policy, prefix_order
from spear.types import TokenBatch

# How a logged metric of an update is combined over micro-batches (and data-parallel ranks,
# mini-batches and epochs), so that it does not depend on how a mini-batch is split:
# * MEAN (the default): a mean over one micro-batch's valid tokens (entropy, clip fractions,
#   approx_kl): weighted by the micro-batch's valid-token count, divided by the total count.
# * COUNT: a count (``cov_selected``): summed.
# * STEP: a micro-batch's share of a mini-batch aggregate, normalised by the mini-batch's counts
#   (``pg_loss``, ``kl``, ``loss``): summed over a mini-batch's micro-batches (and ranks), which
#   gives the mini-batch's value, then averaged over the update's mini-batches (all epochs).
COUNT_METRICS = frozenset({"cov_selected"})
STEP_METRICS = frozenset({"pg_loss", "kl", "loss"})


def metric_weight(name: str, num_tokens: Tensor) -> Tensor | float:
    """What a micro-batch's metric ``name`` is multiplied by before it is summed (see above);
    ``num_tokens`` is the micro-batch's valid-token count (0-dim)."""
    return 1.0 if name in COUNT_METRICS or name in STEP_METRICS else num_tokens


def finish_metrics(
    sums: dict[str, Tensor], num_tokens: Tensor, num_mini_batches: int
) -> dict[str, Tensor]:
    """The update's metrics from their weighted sums (:func:`metric_weight`): MEAN sums divided
    by the total valid-token count ``num_tokens`` (0-dim), STEP sums by the number of
    mini-batches, COUNT sums as they are. Empty denominators count as 1."""
    tokens = num_tokens.clamp(min=1)
    steps = max(1, num_mini_batches)
    return {
        k: v if k in COUNT_METRICS else v / steps if k in STEP_METRICS else v / tokens
        for k, v in sums.items()
    }


@dataclass(frozen=True)
class UpdateSettings:
    policy_loss: str
    loss_params: PolicyLossParams
    aggregation: str
    max_response_len: int  # Dr.GRPO constant
    entropy_coef: float
    kl_coef: float
    kl_type: str
    epochs: int
    mini_batch_size: int
    micro_batch_size: int
    grad_clip: float
    temperature: float


@dataclass
class UpdateResult:
    """Tensor metrics (0-dim, not yet synced) of one update pass."""

    metrics: dict[str, Tensor]
    optimizer_steps: int
    skipped_steps: int
    old_logprobs: Tensor | None = None  # [N, T] in batch row order, with ``old_from_forward``


def single_step(settings: UpdateSettings, num_rows: int) -> bool:
    """True when an update of ``num_rows`` rows is one optimizer step (one epoch, one mini-batch)."""
    return settings.epochs == 1 and settings.mini_batch_size >= num_rows


def check_reference(settings: UpdateSettings, batch: TokenBatch, ref: Tensor | None) -> None:
    """A KL term needs the reference log-probs ``ref [N, T]`` of ``batch`` (never a silent no-op)."""
    if settings.kl_coef > 0 and ref is None:
        raise ValueError(
            f"kl_coef={settings.kl_coef} needs the reference policy's log-probs (ref_logprobs)"
        )
    if ref is not None and ref.shape != batch.input_ids.shape:
        raise ValueError(
            f"ref_logprobs shape {tuple(ref.shape)} != batch shape {tuple(batch.input_ids.shape)}"
        )


def _mini_batches(n: int, size: int, generator: torch.Generator) -> list[Tensor]:
    perm = torch.randperm(n, generator=generator)
    return [perm[i : i + size] for i in range(0, n, size)]


def grouped_rows(batch: TokenBatch, rows: Tensor, share_prefix: bool) -> Tensor:
    """``rows`` (one mini-batch) reordered so that rows with the same prompt are adjacent, and
    the micro-batches cut from it run each prompt once (:func:`~spear.policy.prefix_order`);
    unchanged without prefix sharing. How a mini-batch is split into micro-batches does not
    change its gradient (the normaliser is the mini-batch's)."""
    if not share_prefix:
        return rows
    return rows[
        prefix_order(batch.input_ids[rows], batch.attention_mask[rows], batch.loss_mask[rows])
    ]


def _micro_loss(
    policy: Policy,
    micro: TokenBatch,
    settings: UpdateSettings,
    norm: AggregationNorm,
    generator: torch.Generator,
    ref_logprobs: Tensor | None,
    old_from_forward: bool,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch, already scaled so that micro-batch losses sum to the mini-batch
    loss, its log-probs ``[n, t]`` (detached) and its metrics (combined by
    :func:`metric_weight` / :func:`finish_metrics`)."""
    # entropy is always logged; it enters the loss only if entropy_coef != 0
    lp, ent = policy.forward_logprobs(micro, temperature=settings.temperature, with_entropy=True)
    out = POLICY_LOSSES.get(settings.policy_loss)(
        PolicyLossInput(
            log_probs=lp,
            old_log_probs=lp.detach() if old_from_forward else micro.old_logprobs,
            advantages=micro.advantages,
            mask=micro.loss_mask,
        ),
        settings.loss_params,
        generator,
    )
    aggregate = AGGREGATIONS.get(settings.aggregation)
    loss = aggregate(out.token_loss, micro.loss_mask, norm)
    metrics = {f"{k}": v.detach() for k, v in out.metrics.items()}
    metrics["pg_loss"] = loss.detach()  # the policy term alone (verl's pg_loss)
    assert ent is not None
    metrics["entropy"] = masked_mean(ent.detach(), micro.loss_mask)  # this micro-batch's mean
    if settings.entropy_coef:
        loss = loss - settings.entropy_coef * aggregate(ent, micro.loss_mask, norm)
    if settings.kl_coef and ref_logprobs is not None:
        kl = KL_ESTIMATORS.get(settings.kl_type)(lp, ref_logprobs.to(lp.device))
        kl_term = aggregate(kl, micro.loss_mask, norm)
        loss = loss + settings.kl_coef * kl_term
        metrics["kl"] = kl_term.detach()
    metrics["loss"] = loss.detach()  # the whole objective: policy term, entropy bonus, KL
    return loss, lp.detach(), metrics


def policy_update(
    policy: Policy,
    batch: TokenBatch,
    settings: UpdateSettings,
    generator: torch.Generator,
    *,
    loss_scale: float = 1.0,
    ref_logprobs: Tensor | None = None,
    old_from_forward: bool = False,
) -> UpdateResult:
    """Run ``settings.epochs`` passes of mini-batch optimizer steps over ``batch``.

    ``loss_scale`` multiplies the loss (the SIL weight lambda(t) for the replay pass). Metrics
    (unscaled) do not depend on the micro-batch split (:func:`finish_metrics`); they stay tensors
    (the caller syncs once per step).
    ``old_from_forward`` (only for a :func:`single_step` update) ignores ``batch.old_logprobs``
    and uses the forward pass's own log-probs, returned in ``UpdateResult.old_logprobs``.
    ``ref_logprobs [N, T]`` (the reference policy's, :mod:`spear.reference`) is required when
    ``settings.kl_coef > 0``; the loss then adds ``kl_coef * agg(kl_type(lp, ref))``.
    """
    check_reference(settings, batch, ref_logprobs)
    if old_from_forward and not single_step(settings, batch.num_rows):
        raise ValueError(
            "old log-probs can come from the update's forward pass only when the update is one "
            f"optimizer step (epochs={settings.epochs}, mini_batch_size="
            f"{settings.mini_batch_size}, rows={batch.num_rows})"
        )
    policy.model.train()
    olds = torch.zeros(batch.input_ids.shape, device=policy.device) if old_from_forward else None
    sums: dict[str, Tensor] = {}  # on the policy's device: no host sync until the caller's
    zero = torch.zeros((), device=policy.device)
    weight_total = zero
    steps = skipped = 0
    for _ in range(settings.epochs):
        for rows in _mini_batches(batch.num_rows, settings.mini_batch_size, generator):
            rows = grouped_rows(batch, rows, policy.share_prefix)
            mini = batch.select(rows)
            norm = AggregationNorm.from_mask(mini.loss_mask, settings.max_response_len)
            policy.optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=policy.device)
            for start in range(0, mini.num_rows, settings.micro_batch_size):
                micro_rows = slice(start, start + settings.micro_batch_size)
                micro = mini.select(micro_rows).to(policy.device)
                ref = (
                    ref_logprobs[rows][micro_rows, : micro.input_ids.shape[1]]
                    if ref_logprobs is not None
                    else None
                )
                loss, lp, m = _micro_loss(
                    policy, micro, settings, norm, generator, ref, old_from_forward
                )
                (loss * loss_scale).backward()
                if olds is not None:
                    olds[rows[micro_rows], : lp.shape[1]] = lp.float()
                total = total + loss.detach()
                w = (micro.loss_mask > 0).sum()
                for k, v in m.items():
                    sums[k] = sums.get(k, zero) + v.float() * metric_weight(k, w)
                weight_total = weight_total + w
            grad_norm = torch.nn.utils.clip_grad_norm_(
                policy.trainable_parameters, settings.grad_clip
            )
            # the one host sync per optimizer step: skip a non-finite update
            if bool(torch.isfinite(grad_norm) & torch.isfinite(total)):
                policy.optimizer.step()
                steps += 1
            else:
                policy.optimizer.zero_grad(set_to_none=True)
                skipped += 1
            sums["grad_norm"] = sums.get("grad_norm", zero) + grad_norm.detach().float()
    grad_norm_sum = sums.pop("grad_norm", zero)
    metrics = finish_metrics(sums, weight_total, steps + skipped)
    metrics["grad_norm"] = grad_norm_sum / max(1, steps + skipped)
    return UpdateResult(
        metrics=metrics,
        optimizer_steps=steps,
        skipped_steps=skipped,
        old_logprobs=olds.cpu() if olds is not None else None,
    )
