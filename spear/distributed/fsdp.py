"""Data-parallel training ranks: FSDP2 sharding, even batch splitting, and a data-parallel update.

One process per rank (``torchrun``, ``torch.multiprocessing`` or Ray actors), joined by
:func:`init_distributed` (gloo on CPU, NCCL on GPU). :func:`shard_policy` shards a
:class:`~spear.policy.Policy`'s model with ``torch.distributed.fsdp.fully_shard`` (FSDP2): every
decoder layer is one unit, and a root unit holds the embeddings, final norm and LM head (so tied
embeddings stay tied). The root unit's forward computes token log-probs exactly as
:meth:`Policy.forward_logprobs` does, so FSDP gathers the LM head weight for it.

:func:`data_parallel_update` is :func:`spear.update.policy_update` split over ranks. Every rank
holds the SAME whole batch; all ranks use rank 0's mini-batch permutation, and each takes its
even share of every mini-batch (:func:`share_rows`). Shares differ by at most one row; a shorter
share is padded with a fully masked copy of a real row, so every rank runs the same number of
micro-batches (FSDP collectives must match) and no row is ever dropped or rounded away (B12,
B15). The aggregation counts (valid tokens, sequences) are all-reduced over the ranks' shares,
FSDP sums (does not average) gradients, and gradient clipping uses the global norm. The update
therefore equals the single-process update on the whole batch up to float rounding, for any
number of ranks, for losses whose per-token values do not depend on which rows share a
micro-batch (vanilla, GPG). Clip-Cov / KL-Cov pick tokens per micro-batch; their updates depend
on the micro-batch split just as they do in one process.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from spear.algo.aggregation import AggregationNorm
from spear.policy import Policy
from spear.types import TokenBatch
from spear.update import (
    UpdateResult,
    UpdateSettings,
    _micro_loss,
    _mini_batches,
    check_reference,
    finish_metrics,
    grouped_rows,
    metric_weight,
)

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
OptimizerFactory = Callable[
    [list[nn.Parameter]], tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]
]


# ----------------------------------------------------------------------------------------------
# Even splitting


def shard_sizes(num_rows: int, world_size: int) -> list[int]:
    """Rows per rank: ``num_rows`` split as evenly as possible (sizes differ by at most 1; the
    first ``num_rows % world_size`` ranks get one more)."""
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    base, extra = divmod(num_rows, world_size)
    return [base + (r < extra) for r in range(world_size)]


def share_rows(rows: Tensor, world_size: int, rank: int) -> tuple[Tensor, int]:
    """Rank ``rank``'s contiguous share of ``rows [n]``, padded to ``ceil(n / world_size)``.

    Returns ``(indices [ceil(n / world_size)], num_fill)``: the last ``num_fill`` indices repeat
    ``rows[0]`` and must be fully masked by the caller (:func:`mask_last_rows`).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if rows.dim() != 1 or rows.numel() == 0:
        raise ValueError(
            f"rows must be a non-empty 1-D index tensor, got shape {tuple(rows.shape)}"
        )
    sizes = shard_sizes(rows.numel(), world_size)
    start = sum(sizes[:rank])
    mine = rows[start : start + sizes[rank]]  # [sizes[rank]]
    num_fill = max(sizes) - sizes[rank]
    return torch.cat([mine, rows[:1].expand(num_fill)]), num_fill


def mask_last_rows(batch: TokenBatch, num_rows: int) -> TokenBatch:
    """``batch`` with its last ``num_rows`` rows out of the loss (mask and advantages zeroed)."""
    if num_rows == 0:
        return batch
    loss_mask, adv = batch.loss_mask.clone(), batch.advantages.clone()  # [N, T]
    loss_mask[-num_rows:] = 0.0
    adv[-num_rows:] = 0.0
    return dataclasses.replace(batch, loss_mask=loss_mask, advantages=adv)


def split_batch(batch: TokenBatch, world_size: int) -> list[TokenBatch]:
    """Every rank's even share of ``batch`` (in row order), padded to equal row counts."""
    rows = torch.arange(batch.num_rows)
    out = []
    for rank in range(world_size):
        idx, num_fill = share_rows(rows, world_size, rank)
        out.append(mask_last_rows(batch.select(idx), num_fill))
    return out


# ----------------------------------------------------------------------------------------------
# Process group and sharding


def free_port() -> int:
    """A TCP port free on this host right now (for a local ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(
    backend: str, rank: int, world_size: int, init_method: str, timeout_s: float
) -> DeviceMesh:
    """Join the process group (``init_method`` e.g. ``"tcp://host:port"``); return a 1-D mesh.

    With ``nccl`` the caller must have selected this rank's GPU (``torch.cuda.set_device``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return init_device_mesh("cuda" if backend == "nccl" else "cpu", (world_size,))


class LogprobModule(nn.Module):
    """The FSDP root: its forward is :meth:`Policy.forward_logprobs` of the wrapped model."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self._view: Policy | None = None  # set by shard_policy once the optimizer exists

    def forward(
        self, batch: TokenBatch, temperature: float, with_entropy: bool
    ) -> tuple[Tensor, Tensor | None]:
        if self._view is None:
            raise RuntimeError("LogprobModule is used before shard_policy finished")
        return self._view.forward_logprobs(
            batch, temperature=temperature, with_entropy=with_entropy
        )


@dataclasses.dataclass
class ShardedPolicy(Policy):
    """A :class:`Policy` whose ``model`` is an FSDP-sharded :class:`LogprobModule`."""

    def forward_logprobs(
        self, batch: TokenBatch, *, temperature: float, with_entropy: bool
    ) -> tuple[Tensor, Tensor | None]:
        lp, ent = self.model(batch, temperature=temperature, with_entropy=with_entropy)
        return lp, ent


def _layer_class_names(lm: nn.Module) -> set[str]:
    """Decoder-layer classes to shard one by one (Hugging Face's ``_no_split_modules``)."""
    base = getattr(lm, "get_base_model", lambda: lm)()
    names = getattr(base, "_no_split_modules", None) or []
    return set(names)


def shard_policy(
    policy: Policy, mesh: DeviceMesh, make_optimizer: OptimizerFactory
) -> ShardedPolicy:
    """Shard ``policy.model`` in place with FSDP2 over ``mesh``; build a fresh optimizer.

    ``make_optimizer(params)`` returns ``(optimizer, scheduler)`` over the sharded parameters
    (e.g. ``lambda p: build_optimizer(p, cfg.optim, steps)``). ``policy`` itself (and its old
    optimizer) must not be used afterwards. Every rank must call this with the same model.
    """
    lm = policy.model
    layer_names = _layer_class_names(lm)
    layers = [m for m in lm.modules() if type(m).__name__ in layer_names]
    if not layers:
        log.warning("no decoder layers found (_no_split_modules); sharding the model as one unit")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    root = LogprobModule(lm)
    fully_shard(root, mesh=mesh)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            # Sum gradients (losses are already normalised by global counts) with a plain SUM
            # collective: gloo has no PREMUL_SUM, which a custom divide factor alone would use.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    optimizer, scheduler = make_optimizer([p for p in root.parameters() if p.requires_grad])
    root._view = Policy(
        lm, policy.tokenizer, policy.device, optimizer, scheduler, share_prefix=policy.share_prefix
    )
    return ShardedPolicy(
        root,
        policy.tokenizer,
        policy.device,
        optimizer,
        scheduler,
        share_prefix=policy.share_prefix,
    )


def gather_full_state_dict(policy: ShardedPolicy) -> dict[str, Tensor]:
    """The full (unsharded) state dict of the wrapped model, on CPU, keyed like the original
    model (rank 0 gets it, other ranks an empty dict). Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(policy.model, options=options)
    return {k.removeprefix("lm."): v for k, v in state.items() if isinstance(v, Tensor)}


# ----------------------------------------------------------------------------------------------
# Data-parallel update


def global_norm(
    mask: Tensor, max_response_len: int, group: Any, device: torch.device
) -> AggregationNorm:
    """:class:`AggregationNorm` of the union of all ranks' ``mask [n, T]`` (counts all-reduced),
    as 0-dim float64 tensors on ``device``."""
    valid = mask > 0  # [n, T]
    counts = torch.stack([valid.sum(), valid.any(dim=-1).sum()]).to(torch.float64)  # [2]
    counts = counts.to(_comm_device(group))
    dist.all_reduce(counts, group=group)  # tokens, sequences of all ranks
    counts = counts.to(device)
    return AggregationNorm(counts[0], counts[1], max_response_len)


def _comm_device(group: Any) -> torch.device:
    backend = dist.get_backend(group)
    return (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )


def _check_same_batch(batch: TokenBatch, group: Any) -> None:
    """Raise on every rank if the ranks do not hold the same batch (row count and id checksum)."""
    ids = batch.input_ids.to(torch.float64)  # [N, T]
    weights = torch.arange(1, ids.shape[1] + 1, dtype=torch.float64)  # [T] position weights
    mine = torch.stack(
        [torch.tensor(float(batch.num_rows), dtype=torch.float64), (ids * weights).sum()]
    )
    mine = mine.to(_comm_device(group))
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise ValueError("data_parallel_update needs the same whole batch on every rank")


def _agreed_mini_batches(n: int, size: int, generator: torch.Generator, group: Any) -> list[Tensor]:
    """Rank 0's mini-batch permutation on every rank (the same draw as ``policy_update``)."""
    perm = torch.cat(_mini_batches(n, size, generator)).to(_comm_device(group))  # [n]
    dist.broadcast(
        perm, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group
    )
    return list(perm.cpu().split(size))


@dataclasses.dataclass
class _MetricSums:
    """``policy_update``'s metric rule (:func:`~spear.update.metric_weight`), summed locally and
    all-reduced once at the end."""

    sums: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    weight: Tensor = dataclasses.field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    grad_norm: float = 0.0

    def add(self, metrics: dict[str, Tensor], num_tokens: Tensor) -> None:
        w = num_tokens.detach().double().cpu()
        for k, v in metrics.items():
            scaled = v.detach().double().cpu() * metric_weight(k, w)
            self.sums[k] = self.sums.get(k, torch.zeros((), dtype=torch.float64)) + scaled
        self.weight = self.weight + w

    def finish(self, steps: int, skipped: int, group: Any) -> UpdateResult:
        keys = sorted(self.sums)
        packed = torch.stack([self.sums[k] for k in keys] + [self.weight]).to(_comm_device(group))
        dist.all_reduce(packed, group=group)  # [K + 1]
        packed = packed.cpu()
        summed = {k: packed[i] for i, k in enumerate(keys)}
        metrics = {
            k: v.float() for k, v in finish_metrics(summed, packed[-1], steps + skipped).items()
        }
        metrics["grad_norm"] = torch.tensor(self.grad_norm / max(1, steps + skipped))
        return UpdateResult(metrics=metrics, optimizer_steps=steps, skipped_steps=skipped)


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _set_gradient_sync(model: nn.Module, sync: bool) -> None:
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)  # reduce-scatter only after the last micro-batch


def _dp_optimizer_step(
    policy: Policy,
    local: TokenBatch,
    local_ref: Tensor | None,
    settings: UpdateSettings,
    generator: torch.Generator,
    loss_scale: float,
    acc: _MetricSums,
    group: Any,
) -> bool:
    """One optimizer step on this rank's share ``local`` of a mini-batch; True if it stepped."""
    norm = global_norm(local.loss_mask, settings.max_response_len, group, policy.device)
    policy.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=policy.device)
    starts = list(range(0, local.num_rows, settings.micro_batch_size))
    for k, start in enumerate(starts):
        rows = slice(start, start + settings.micro_batch_size)
        micro = local.select(rows).to(policy.device)
        ref = local_ref[rows, : micro.input_ids.shape[1]] if local_ref is not None else None
        _set_gradient_sync(policy.model, k == len(starts) - 1)
        loss, _, metrics = _micro_loss(policy, micro, settings, norm, generator, ref, False)
        (loss * loss_scale).backward()
        total = total + loss.detach()
        acc.add(metrics, (micro.loss_mask > 0).sum())
    grad_norm = _full(
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters, settings.grad_clip)
    )
    finite = (torch.isfinite(grad_norm) & torch.isfinite(total)).to(torch.int32).reshape(1)
    finite = finite.to(_comm_device(group))
    dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=group)  # skip on every rank or none
    acc.grad_norm += float(grad_norm)
    if bool(finite.item()):
        policy.optimizer.step()
        return True
    policy.optimizer.zero_grad(set_to_none=True)
    return False


def data_parallel_update(
    policy: Policy,
    batch: TokenBatch,
    settings: UpdateSettings,
    generator: torch.Generator,
    *,
    loss_scale: float = 1.0,
    ref_logprobs: Tensor | None = None,
    group: Any = None,
) -> UpdateResult:
    """:func:`spear.update.policy_update` over the ranks of ``group`` (module docstring).

    Every rank passes the same whole ``batch`` (and ``ref_logprobs [N, T]``) and an identically
    seeded ``generator``; ``policy`` is a :class:`ShardedPolicy` (a plain policy only with one
    rank). Metrics are the global ones, identical on every rank.
    """
    check_reference(settings, batch, ref_logprobs)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world > 1 and not isinstance(policy.model, FSDPModule):
        raise ValueError("with more than one rank, policy must come from shard_policy")
    _check_same_batch(batch, group)
    policy.model.train()
    acc, steps, skipped = _MetricSums(), 0, 0
    for _ in range(settings.epochs):
        for rows in _agreed_mini_batches(
            batch.num_rows, settings.mini_batch_size, generator, group
        ):
            rows = grouped_rows(batch, rows, policy.share_prefix)  # the same on every rank
            idx, num_fill = share_rows(rows, world, rank)
            local = mask_last_rows(batch.select(idx), num_fill)
            local_ref = ref_logprobs[idx] if ref_logprobs is not None else None
            if _dp_optimizer_step(
                policy, local, local_ref, settings, generator, loss_scale, acc, group
            ):
                steps += 1
            else:
                skipped += 1
    _set_gradient_sync(policy.model, True)
    return acc.finish(steps, skipped, group)
