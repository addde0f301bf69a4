"""Loss aggregation: per-token values ``[N, T]`` -> one scalar, normalised by mini-batch counts.

Every mode divides by counts of the WHOLE mini-batch (:class:`AggregationNorm`), never by counts
of the micro-batch it is called on. Each mode is therefore a sum over rows of a per-row term, so
for any split of a mini-batch into micro-batches::

    sum(fn(values[rows_k], mask[rows_k], norm) for k in splits) == fn(values, mask, norm)

and gradient accumulation over micro-batches gives exactly the full-batch gradient (B13).

Conventions (all modes):

* ``num_tokens`` = number of valid (mask > 0) tokens in the mini-batch.
* ``num_sequences`` = number of rows with at least one valid token. Rows without a valid token
  (response-filtered samples, B11) contribute 0 to every numerator and are not counted, so they
  never dilute the mean and never divide by zero (B13). This is verl 0.9.1's ``seq_mask`` rule.
* Every denominator is clamped to >= 1, so an all-masked batch gives 0, never NaN.

Modes (``L`` = token values, ``m`` = mask, ``i`` rows, ``k`` tokens):

* ``token-mean``:              sum_ik L m / num_tokens
* ``seq-mean-token-sum``:      sum_i (sum_k L m) / num_sequences
* ``seq-mean-token-mean``:     sum_i (sum_k L m / max(sum_k m, 1)) / num_sequences
* ``seq-mean-token-sum-norm``: sum_ik L m / (num_sequences * max_response_len)   (true Dr.GRPO)

Relation to verl (pinned by ``tests/algo/test_verl_agreement.py``):

* verl 0.9.1 ``agg_loss`` on a single micro-batch with its default arguments gives the same
  value for ``token-mean``, ``seq-mean-token-sum`` and ``seq-mean-token-mean`` (verl's per-row
  mean divides by ``count + 1e-8`` instead of ``max(count, 1)``: relative difference
  ``1e-8 / count``), and for ``seq-mean-token-sum-norm`` when its ``loss_scale_factor`` is
  ``max_response_len``; its default there is the padded width ``mask.shape[-1]``, which changes
  from batch to batch with dynamic padding, so here the constant is explicit.
* Across micro-batches verl uses global counts only when ``batch_num_tokens`` /
  ``global_batch_size`` are passed; here they always come from :class:`AggregationNorm`.
  verl also multiplies by ``dp_size`` to undo the data-parallel gradient average; here the
  data-parallel caller sums gradients instead (``spear/distributed/fsdp.py``).
* The SPEAR reference's verl copy computes ``seq-mean-token-sum-norm`` per micro-batch as
  ``sum_ik L m / mask.shape[-1]``, without dividing by the number of sequences, so its gradient
  scale grows with the micro-batch size (B13). On one micro-batch with
  ``max_response_len == mask.shape[-1]`` it is exactly ``num_sequences`` times ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from spear.registry import Registry

AggregationFn = Callable[[Tensor, Tensor, "AggregationNorm"], Tensor]

AGGREGATIONS: Registry[AggregationFn] = Registry("loss aggregation mode")

Count = Tensor | int | float


@dataclass(frozen=True)
class AggregationNorm:
    """Global counts of one mini-batch (see module docstring for the exact definitions).

    ``num_tokens`` and ``num_sequences`` may be Python numbers or 0-dim tensors (tensors avoid a
    host sync; a CPU 0-dim tensor also works with CUDA token values). ``max_response_len`` is the
    Dr.GRPO constant: a fixed maximum response length, not the padded width of a batch.
    """

    num_tokens: Count
    num_sequences: Count
    max_response_len: int

    def __post_init__(self) -> None:
        if isinstance(self.max_response_len, bool) or not isinstance(self.max_response_len, int):
            raise TypeError(f"max_response_len must be an int, got {self.max_response_len!r}")
        if self.max_response_len <= 0:
            raise ValueError(f"max_response_len must be > 0, got {self.max_response_len}")
        for name in ("num_tokens", "num_sequences"):
            value = getattr(self, name)
            if isinstance(value, Tensor):
                if value.dim() != 0:
                    raise ValueError(
                        f"{name} must be a 0-dim tensor, got shape {tuple(value.shape)}"
                    )
            elif not isinstance(value, int | float) or value < 0:
                raise ValueError(
                    f"{name} must be a non-negative number or 0-dim tensor, got {value!r}"
                )

    @classmethod
    def from_mask(cls, mask: Tensor, max_response_len: int) -> AggregationNorm:
        """Counts of the single batch ``mask [N, T]`` (0-dim tensors on ``mask``'s device)."""
        _check_2d(mask, "mask")
        valid = mask > 0  # [N, T]
        num_tokens = valid.sum().to(torch.float64)  # []
        num_sequences = valid.any(dim=-1).sum().to(torch.float64)  # []
        return cls(num_tokens, num_sequences, max_response_len)


def _check_2d(t: Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be [N, T], got shape {tuple(t.shape)}")


def _check_inputs(token_values: Tensor, mask: Tensor) -> None:
    _check_2d(token_values, "token_values")
    if mask.shape != token_values.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} != token_values shape {tuple(token_values.shape)}"
        )


def _at_least_one(count: Count) -> Count:
    """``max(count, 1)`` for a Python number or a 0-dim tensor, without a host sync."""
    if isinstance(count, Tensor):
        return count.clamp(min=1)
    return max(count, 1)


def masked_values(token_values: Tensor, mask: Tensor) -> Tensor:
    """``L * m`` with exact zeros where ``m == 0`` (even if ``L`` is inf/NaN there). [N, T]"""
    return torch.where(mask > 0, token_values * mask, torch.zeros_like(token_values))


def _row_sums(token_values: Tensor, mask: Tensor) -> Tensor:
    return masked_values(token_values, mask).sum(dim=-1)  # [N]


@AGGREGATIONS.register("token-mean")
def token_mean(token_values: Tensor, mask: Tensor, norm: AggregationNorm) -> Tensor:
    """sum_ik L m / num_tokens (0 if the mini-batch has no valid token)."""
    _check_inputs(token_values, mask)
    total = masked_values(token_values, mask).sum()  # []
    return total / _at_least_one(norm.num_tokens)


@AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(token_values: Tensor, mask: Tensor, norm: AggregationNorm) -> Tensor:
    """Mean over non-empty sequences of each sequence's token sum."""
    _check_inputs(token_values, mask)
    return _row_sums(token_values, mask).sum() / _at_least_one(norm.num_sequences)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(token_values: Tensor, mask: Tensor, norm: AggregationNorm) -> Tensor:
    """Mean over non-empty sequences of each sequence's token mean (empty rows add 0, no NaN)."""
    _check_inputs(token_values, mask)
    row_counts = (mask > 0).sum(dim=-1).clamp(min=1).to(token_values.dtype)  # [N]
    row_means = _row_sums(token_values, mask) / row_counts  # [N]
    return row_means.sum() / _at_least_one(norm.num_sequences)


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(token_values: Tensor, mask: Tensor, norm: AggregationNorm) -> Tensor:
    """True Dr.GRPO: sum_ik L m / (num_sequences * max_response_len)."""
    _check_inputs(token_values, mask)
    total = masked_values(token_values, mask).sum()  # []
    return total / (_at_least_one(norm.num_sequences) * norm.max_response_len)
