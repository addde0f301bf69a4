"""Token log-probs and entropies, computed in chunks so ``N * T * V`` float32 never exists at once.

Token convention: ``logprobs[:, t] = log softmax(logits[:, t] / temperature)[targets[:, t]]``,
i.e. position ``t``'s logits score ``targets[:, t]``. The CALLER shifts: for a causal LM whose
logits at position ``t`` predict token ``t + 1``, pass ``logits[:, :-1]`` (or
``hidden[:, :-1]``) with ``targets = input_ids[:, 1:]`` (see ``spear.types`` for the batch-wide
convention that puts that log-prob at column ``t + 1``).

Chunks are over flattened token positions (``chunk_size`` positions each). Each chunk is
upcast to float32 before the softmax (float64 inputs stay float64). When gradients are
needed and the call's float32 logits would exceed :data:`CHECKPOINT_MIN_BYTES`, each chunk runs
under ``torch.utils.checkpoint`` (non-reentrant), so the backward pass recomputes one chunk's
float32 logits at a time instead of keeping all of them alive; with
:func:`logprobs_from_hidden` not even the model-dtype logits of the whole batch are ever
materialised. Below that size (small vocabularies, short micro-batches) the chunks keep their
activations: the recompute would cost a second LM-head pass for no memory worth saving. Values
and gradients equal the naive full-softmax computation either way (the same operations run).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

CHECKPOINT_MIN_BYTES = (
    64 * 2**20
)  # checkpoint the chunks only when a call's float32 logits exceed this


def _check(temperature: float, chunk_size: int) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check_targets(targets: Tensor, lead_shape: torch.Size, what: str) -> None:
    if targets.dim() != 2 or targets.shape != lead_shape:
        raise ValueError(
            f"targets must be [N, T] = {tuple(lead_shape)} like {what}, got {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")


def logprobs_entropy_of_logits(
    logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor]:
    """Log-prob of ``targets [C]`` and entropy under ``logits [C, V] / temperature``, computed in
    float32 (float64 if ``logits`` is float64).

    Returns ``(logprobs [C], entropy [C])``; entropy is an empty tensor if not requested.
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # [C, V]
    lse = torch.logsumexp(x, dim=-1)  # [C]
    lp = x.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse  # [C]
    if not with_entropy:
        return lp, lp.new_empty(0)
    probs = torch.softmax(x, dim=-1)  # [C, V]
    ent = lse - (probs * x).sum(dim=-1)  # [C]  H = logsumexp(x) - E_p[x]
    return lp, ent


def _run_chunks(
    fn: Callable[..., tuple[Tensor, Tensor]],
    per_position: list[Tensor],
    shared: list[Tensor | None],
    num_positions: int,
    chunk_size: int,
    vocab_size: int,
) -> tuple[Tensor, Tensor]:
    """Apply ``fn(*chunk_of_each(per_position), *shared)`` chunk by chunk and concatenate.

    With gradients, the chunks are checkpointed when ``num_positions * vocab_size`` float32
    logits would exceed :data:`CHECKPOINT_MIN_BYTES`.
    """
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in [*per_position, *shared]
    )
    needs_grad = needs_grad and num_positions * vocab_size * 4 > CHECKPOINT_MIN_BYTES
    if num_positions == 0:
        empty = per_position[0].new_empty(0, dtype=torch.float32)
        return empty, empty
    lps, ents = [], []
    for start in range(0, num_positions, chunk_size):
        args = [t[start : start + chunk_size] for t in per_position] + list(shared)
        if needs_grad:
            # fn draws no random numbers: skip stashing / restoring the RNG state per chunk
            lp, ent = checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            lp, ent = fn(*args)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), torch.cat(ents)


def token_logprobs_and_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    chunk_size: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[N, T]`` of ``targets [N, T]`` under ``logits [N, T, V]``, and the entropy
    ``[N, T]`` of each position's distribution if ``with_entropy`` (else None). Both float32
    (float64 for float64 logits).

    ``chunk_size`` = token positions per chunk. See the module docstring for the convention.
    """
    _check(temperature, chunk_size)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, T, V], got shape {tuple(logits.shape)}")
    _check_targets(targets, logits.shape[:2], "logits")
    n, t, v = logits.shape

    def fn(lg: Tensor, tg: Tensor) -> tuple[Tensor, Tensor]:
        return logprobs_entropy_of_logits(lg, tg, temperature, with_entropy)

    lp, ent = _run_chunks(
        fn, [logits.reshape(n * t, v), targets.reshape(n * t)], [], n * t, chunk_size, v
    )
    return lp.view(n, t), (ent.view(n, t) if with_entropy else None)


def logprobs_from_hidden(
    hidden: Tensor,
    lm_head: nn.Linear | Tensor,
    targets: Tensor,
    *,
    temperature: float,
    chunk_size: int,
    with_entropy: bool,
    logit_fn: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Like :func:`token_logprobs_and_entropy`, from final hidden states ``hidden [N, T, H]``.

    ``lm_head`` is the output projection: an ``nn.Linear`` (weight ``[V, H]``, optional bias) or
    its weight tensor ``[V, H]``. Each chunk is projected to logits (in the model's dtype, like
    the model's own head), passed through ``logit_fn`` if given (what a model's forward does to
    its head's logits: soft-capping, scaling), upcast to float32 and reduced; gradients flow to
    ``hidden`` and to the head's parameters.
    """
    _check(temperature, chunk_size)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, T, H], got shape {tuple(hidden.shape)}")
    weight, bias = (
        (lm_head.weight, lm_head.bias) if isinstance(lm_head, nn.Linear) else (lm_head, None)
    )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head weight must be [V, H={hidden.shape[-1]}], got shape {tuple(weight.shape)}"
        )
    _check_targets(targets, hidden.shape[:2], "hidden")
    n, t, h = hidden.shape

    def fn(hc: Tensor, tg: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = F.linear(hc, w, b)  # [C, V]
        logits = logits if logit_fn is None else logit_fn(logits)
        return logprobs_entropy_of_logits(logits, tg, temperature, with_entropy)

    lp, ent = _run_chunks(
        fn,
        [hidden.reshape(n * t, h), targets.reshape(n * t)],
        [weight, bias],
        n * t,
        chunk_size,
        int(weight.shape[0]),
    )
    return lp.view(n, t), (ent.view(n, t) if with_entropy else None)
