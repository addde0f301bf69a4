"""Self-imitation (SIL) replay buffer with advantage recalibration (reference §2, §1 steps 8-10).

Lifecycle within training step ``t`` (the trainer's order):

1. ``ready(t)`` / ``consume(t)`` -- on the buffer as step ``t - 1`` left it: if more than
   ``trigger_ratio * capacity`` stored samples would survive recalibration, recalibrate their
   advantages against the running median baseline and draw ``sample_size`` of them for the SIL
   update. "Reaches the trigger" is strict, as in the reference and its worked values (§11):
   with ``capacity=2048`` and ``trigger_ratio=1.5``, 3,072 eligible samples wait and 3,073
   trigger. Draws are without replacement; ``sampling="prioritized"`` weighs them by their
   recalibrated advantage. ``consume="clear"`` (the reference) then drops every stored sample;
   ``"sliding"`` removes only the drawn ones. Dropped samples never make it fail: an empty
   result is an empty :class:`ReplayBatch` (B1).
2. ``add(samples, t)`` -- after the update, with the step's post-group-filter samples: record the
   per-group baseline statistics of ALL given samples (response-filtered ones included, as in the
   reference), then store the samples with ``advantage > 0``, no response filter and at least one
   response token. So data of step ``t`` can be replayed at step ``t + 1`` at the earliest.

Baseline statistics (one std convention, B14): within a group (``group_id``) each episode
(``episode_id``) scores the mean ``score`` of its samples; the group's mean is the mean of its
episode scores and its std the unbiased (ddof=1) std of them, 0 for a single-episode group.
At most ``history_size`` group statistics are kept, oldest first out (never more, B18).

Recalibration (``recalibration="median"``): ``A = R - p50`` where ``R`` is the stored score
(collection-time, tool bonus of that step included) and ``p50`` the 50th percentile (linear
interpolation) of all kept group means; with ``normalize_by_std``, ``A = (R - p50) / (s50 +
std_eps)`` with ``s50`` the median of the kept group stds. ``keep="positive"`` keeps ``A > 0``,
``"non_negative"`` keeps ``A >= 0`` (B4). ``recalibration="decay"``: ``A = decay_weight *
A_collected``, no re-filtering.

GiGPO: the median recalibration is a scalar, episode-level baseline whatever estimator produced
the collected advantage, so replayed samples get the episode-level term only (GiGPO's
step-level term is dropped, as in the reference). ``"decay"`` scales the advantage as it was
collected, which for GiGPO still contains the step-level term; use ``"median"`` (the SPEAR
setting) for episode-level-only replay.

Staleness (``staleness="current_step"``, the default) is measured against the current training
step: a sample collected at step ``s`` is evicted once ``t - s > tolerate_steps`` (no silent cap),
so a success stops counting toward the trigger after ``tolerate_steps`` steps however few others
arrive. ``staleness="newest_entry"`` is the reference's clock (§2.3): samples age only when a step
adds new ones, relative to the newest stored sample before that add, so during a drought of
successes old ones stay and keep counting (and can be replayed more than ``tolerate_steps`` steps
after collection). ``capacity`` is not a storage limit: it is the trigger unit (the SIL update runs
once more than ``trigger_ratio * capacity`` stored samples would survive recalibration, logged as
``replay/eligible`` against ``replay/trigger_at``) and the default draw size; the buffer may hold
more samples than ``capacity`` (``replay/size``). Stored samples keep their
collection-time behaviour log-probs (the PPO ratio of the SIL update is a true importance
ratio). Every stored tensor is a CPU copy with its own storage, whatever device the caller's
tensors were on (meta tensors, which hold no data, are rejected), in compact dtypes: token ids
int32, masks bool, log-probs float32 (9 bytes a token: 2,048 x 4,096 tokens take 72 MiB, see
``benchmarks/replay_memory.md``). float32 keeps float32 / bfloat16 log-probs exactly; replayed
samples come back with int64 ids. All randomness comes from one seeded ``torch.Generator`` that is
part of ``state_dict()``, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor

from spear.algo.sil import (
    Keep,
    Sampling,
    draw_indices,
    group_baseline_stats,
    keep_mask,
    median,
    recalibrate_median,
)
from spear.types import Sample

log = logging.getLogger(__name__)

Recalibration = Literal["median", "decay"]
Consume = Literal["clear", "sliding"]
Staleness = Literal["current_step", "newest_entry"]

_STATE_FORMAT = 1
_TENSOR_FIELDS = ("input_ids", "loss_mask", "behavior_logprobs")
# Storage dtypes: 4 + 1 + 4 = 9 bytes per token (2,048 x 4,096 tokens = 72 MiB).
_STORED_DTYPES = {
    "input_ids": torch.int32,
    "loss_mask": torch.bool,
    "behavior_logprobs": torch.float32,
}
_SCALAR_FIELDS = tuple(f.name for f in fields(Sample) if f.name not in _TENSOR_FIELDS)
_STATE_KEYS: tuple[str, ...] = ("lengths", *_TENSOR_FIELDS, "scalars", "hist_means", "hist_stds")
_STATE_KEYS += ("last_step", "generator", "totals")


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"ReplayParams.{name} must be an integer >= {minimum}, got {value!r}")


def _require_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ReplayParams.{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True, slots=True)
class ReplayParams:
    """Replay-buffer settings (defaults live in spear/config_sections.py, section ``replay``)."""

    capacity: int  # B: trigger threshold unit
    history_size: int  # H: max number of stored group statistics
    tolerate_steps: int  # max age (current step - collection step) of a stored sample
    trigger_ratio: float  # ready iff eligible > trigger_ratio * capacity (strict)
    sample_size: int  # samples drawn per consumption (no power-of-two rounding)
    sampling: Sampling
    recalibration: Recalibration
    normalize_by_std: bool  # median mode: divide by (s50 + std_eps)
    std_eps: float
    keep: Keep
    decay_weight: float  # decay mode: A = decay_weight * A_collected
    consume: Consume
    staleness: Staleness  # the clock tolerate_steps is measured on

    def __post_init__(self) -> None:
        _require_int("capacity", self.capacity, 1)
        _require_int("history_size", self.history_size, 1)
        _require_int("tolerate_steps", self.tolerate_steps, 0)
        _require_int("sample_size", self.sample_size, 1)
        ratio = self.trigger_ratio
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float))
            or not 0 < ratio < math.inf
        ):
            raise ValueError(
                f"ReplayParams.trigger_ratio must be a finite number > 0, got {ratio!r}"
            )
        _require_choice("sampling", self.sampling, ("uniform", "prioritized"))
        _require_choice("recalibration", self.recalibration, ("median", "decay"))
        _require_choice("keep", self.keep, ("positive", "non_negative"))
        _require_choice("consume", self.consume, ("clear", "sliding"))
        _require_choice("staleness", self.staleness, ("current_step", "newest_entry"))
        if not isinstance(self.normalize_by_std, bool):
            raise ValueError(
                f"ReplayParams.normalize_by_std must be a bool, got {self.normalize_by_std!r}"
            )
        eps = self.std_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"ReplayParams.std_eps must be a finite number > 0, got {eps!r}")
        w = self.decay_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
            raise ValueError(f"ReplayParams.decay_weight must be in (0, 1], got {w!r}")


# ------------------------------------------------------------------------------ records


@dataclass(frozen=True, slots=True)
class AddReport:
    """What one ``add`` did."""

    offered: int  # samples passed in
    stored: int  # samples stored (positive advantage, unfiltered, non-empty response)
    groups_recorded: int  # group statistics appended to the baseline history
    history_evicted: int  # group statistics dropped to stay within history_size
    evicted_stale: int  # stored samples dropped for staleness
    size: int  # stored samples afterwards
    history_groups: int  # group statistics kept afterwards

    def as_metrics(self) -> dict[str, float]:
        return {
            f"add_{k}" if k in ("offered", "stored") else k: float(v)
            for k, v in asdict(self).items()
        }


@dataclass(frozen=True, slots=True)
class ReplayBatch:
    """Samples drawn for one SIL update (advantages recalibrated) and how they were chosen.

    ``p50`` / ``s50`` are NaN when no baseline history exists; ``mean_staleness`` (current step
    minus collection step, averaged over the drawn samples) is NaN when nothing was drawn.
    """

    samples: list[Sample]
    p50: float
    s50: float
    n_before: int  # stored samples after staleness eviction, before recalibration
    n_after_recalibration: int
    n_sampled: int
    mean_staleness: float
    evicted_stale: int

    def stats_metrics(self) -> dict[str, float]:
        adv = [s.advantage for s in self.samples]
        return {
            "p50": self.p50,
            "s50": self.s50,
            "n_before": float(self.n_before),
            "n_after_recalibration": float(self.n_after_recalibration),
            "n_sampled": float(self.n_sampled),
            "mean_staleness": self.mean_staleness,
            "consume_evicted_stale": float(self.evicted_stale),
            "replay_adv_mean": sum(adv) / len(adv) if adv else math.nan,
        }


def _to_host(sample: Sample, name: str) -> Tensor:
    """Tensor field ``name`` of ``sample``, detached, on the CPU (a view if it already is there).

    A meta tensor has no data to copy and is rejected.
    """
    value = getattr(sample, name)
    if not isinstance(value, Tensor):
        raise ValueError(f"Sample.{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise ValueError(
            f"Sample.{name} is on the 'meta' device (no data); the replay buffer stores host "
            "copies of real tensors"
        )
    return value.detach().to("cpu")


def _owned(value: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous copy of the 1-D CPU tensor ``value`` in ``dtype`` with its own storage.

    Never a view of a larger (batch) tensor, so the buffer keeps nothing else alive.
    """
    return value.to(dtype=dtype, copy=True).contiguous()


def _compact(sample: Sample, step: int) -> Sample:
    """A CPU copy of ``sample`` with int32 ids, bool mask, float32 log-probs and ``step``.

    Every tensor is moved to the host first and validated there. Precision: ids are exact in
    int32 (range checked), the 0/1 mask is exact in bool, and float32 holds float32, bfloat16
    and float16 log-probs exactly (float64 ones are rounded to float32, the dtype in which the
    update computes the PPO ratio).
    """
    ids, mask, logprobs = (_to_host(sample, name) for name in _TENSOR_FIELDS)  # [T] each
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"Sample.input_ids must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}"
        )
    for name, value in (("loss_mask", mask), ("behavior_logprobs", logprobs)):
        if value.shape != ids.shape:
            raise ValueError(
                f"Sample.{name} has shape {tuple(value.shape)}, expected {tuple(ids.shape)} "
                "like input_ids"
            )
    if ids.numel() and (int(ids.max()) >= 2**31 or int(ids.min()) < 0):
        raise ValueError("Sample.input_ids must lie in [0, 2**31) to be stored as int32")
    return replace(
        sample,
        input_ids=_owned(ids, _STORED_DTYPES["input_ids"]),
        loss_mask=_owned(mask, _STORED_DTYPES["loss_mask"]),
        behavior_logprobs=_owned(logprobs, _STORED_DTYPES["behavior_logprobs"]),
        step=step,
    )


# ------------------------------------------------------------------------------ the buffer


class ReplayBuffer:
    """The SIL buffer; see the module docstring for the semantics."""

    def __init__(self, params: ReplayParams, seed: int) -> None:
        if not isinstance(params, ReplayParams):
            raise TypeError(f"params must be ReplayParams, got {type(params).__name__}")
        self.params = params
        self._items: list[Sample] = []
        self._hist_means = torch.zeros(0, dtype=torch.float64)
        self._hist_stds = torch.zeros(0, dtype=torch.float64)
        self._last_step: int | None = None
        self._gen = torch.Generator().manual_seed(int(seed))
        self._totals = {
            "added": 0,
            "consumed": 0,
            "consumes": 0,
            "evicted_stale": 0,
            "discarded": 0,
        }

    def __len__(self) -> int:
        return len(self._items)

    # ---- steps and staleness
    def _check_step(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        if self._last_step is not None and step < self._last_step:
            raise ValueError(
                f"step {step} is older than the last step the buffer saw ({self._last_step})"
            )

    def _fresh(self, step: int, *, adding: bool) -> list[Sample]:
        """The stored samples that count as fresh at ``step`` (see ``staleness`` in the module
        docstring): ``current_step`` keeps ``step - s <= tolerate_steps``; ``newest_entry`` (the
        reference's clock) only ages samples when a step adds, against the newest stored one."""
        tol = self.params.tolerate_steps
        if self.params.staleness == "current_step":
            return [s for s in self._items if step - s.step <= tol]
        if not adding or not self._items:
            return list(self._items)
        newest = max(s.step for s in self._items)
        return [s for s in self._items if newest - s.step <= tol]

    def _evict_stale(self, step: int, *, adding: bool = False) -> int:
        fresh = self._fresh(step, adding=adding)
        evicted = len(self._items) - len(fresh)
        self._items = fresh
        self._totals["evicted_stale"] += evicted
        return evicted

    # ---- add
    def add(self, samples: Sequence[Sample], step: int) -> AddReport:
        """Record baseline statistics of ``samples`` (all of them) and store the promising ones.

        Call once per training step, after the update. A sample is stored iff its
        ``advantage > 0``, it carries no response filter and it has a response token. The buffer
        is left unchanged when the input is rejected.
        """
        self._check_step(step)
        scores = torch.tensor([s.score for s in samples], dtype=torch.float64)
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(f"add(step={step}): every Sample.score must be finite")
        _, means, stds = group_baseline_stats(
            scores,
            torch.tensor([s.group_id for s in samples], dtype=torch.long),
            torch.tensor([s.episode_id for s in samples], dtype=torch.long),
        )
        copies = [_compact(s, step) for s in samples if s.advantage > 0 and not s.is_filtered]
        keep = [s for s in copies if s.num_response_tokens > 0]  # counted on the host copy
        history_evicted = max(
            0, self.history_groups + int(means.numel()) - self.params.history_size
        )
        self._hist_means = torch.cat([self._hist_means, means])[history_evicted:]
        self._hist_stds = torch.cat([self._hist_stds, stds])[history_evicted:]
        evicted = self._evict_stale(step, adding=True)
        self._items.extend(keep)
        self._totals["added"] += len(keep)
        self._last_step = step
        return AddReport(
            offered=len(samples),
            stored=len(keep),
            groups_recorded=int(means.numel()),
            history_evicted=history_evicted,
            evicted_stale=evicted,
            size=len(self._items),
            history_groups=self.history_groups,
        )

    @property
    def history_groups(self) -> int:
        return int(self._hist_means.numel())

    # ---- recalibration, trigger
    def baseline(self) -> tuple[float, float]:
        """``(p50, s50)``: medians of the kept group means and stds (NaN without history)."""
        return median(self._hist_means), median(self._hist_stds)

    def _recalibrate(self, items: list[Sample], p50: float, s50: float) -> tuple[Tensor, Tensor]:
        """Recalibrated advantages [n] float64 and the keep mask [n] bool of ``items``."""
        p = self.params
        if p.recalibration == "median":
            scores = torch.tensor([s.score for s in items], dtype=torch.float64)
            adv = recalibrate_median(
                scores, p50, s50, normalize_by_std=p.normalize_by_std, std_eps=p.std_eps
            )
        else:
            adv = p.decay_weight * torch.tensor([s.advantage for s in items], dtype=torch.float64)
        return adv, keep_mask(adv, p.keep)

    def eligible_count(self, step: int) -> int:
        """Stored samples, fresh at ``step``, that would survive recalibration (no mutation)."""
        self._check_step(step)
        fresh = self._fresh(step, adding=False)
        if not fresh:
            return 0
        _, kept = self._recalibrate(fresh, *self.baseline())
        return int(kept.sum())

    def ready(self, step: int) -> bool:
        """Strictly more than ``trigger_ratio * capacity`` eligible samples (B=2048: 3073 do)."""
        return self.eligible_count(step) > self.params.trigger_ratio * self.params.capacity

    # ---- consumption
    def consume(self, step: int) -> ReplayBatch:
        """Evict stale samples, recalibrate, draw up to ``sample_size``; clear or slide.

        Never fails because recalibration dropped samples; an empty buffer gives an empty batch.
        """
        self._check_step(step)
        evicted = self._evict_stale(step)
        items = self._items
        p50, s50 = self.baseline()
        adv, kept = (
            self._recalibrate(items, p50, s50)
            if items
            else (torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        )
        candidates = kept.nonzero().squeeze(1)  # [M] positions into items
        picked = candidates[
            draw_indices(adv[candidates], self.params.sample_size, self.params.sampling, self._gen)
        ]
        out = [
            replace(items[i], input_ids=items[i].input_ids.to(torch.long), advantage=float(adv[i]))
            for i in picked.tolist()
        ]
        if self.params.consume == "clear":
            self._items = []
            self._totals["discarded"] += len(items) - len(out)
        else:
            taken = set(picked.tolist())
            self._items = [s for i, s in enumerate(items) if i not in taken]
        self._totals["consumed"] += len(out)
        self._totals["consumes"] += 1
        self._last_step = step
        staleness = [step - s.step for s in out]
        return ReplayBatch(
            samples=out,
            p50=p50,
            s50=s50,
            n_before=len(items),
            n_after_recalibration=int(candidates.numel()),
            n_sampled=len(out),
            mean_staleness=sum(staleness) / len(staleness) if staleness else math.nan,
            evicted_stale=evicted,
        )

    # ---- introspection
    def nbytes(self) -> int:
        """Bytes of the storages held by the stored samples' tensors (each sample owns its own)."""
        return sum(
            getattr(s, name).untyped_storage().nbytes()
            for s in self._items
            for name in _TENSOR_FIELDS
        )

    def metrics(self, step: int) -> dict[str, float]:
        """Flat buffer metrics: size, eligible count at ``step``, history, running totals."""
        out = {
            "size": float(len(self._items)),
            "eligible": float(self.eligible_count(step)),
            "trigger_at": float(self.params.trigger_ratio * self.params.capacity),
            "history_groups": float(self.history_groups),
            "bytes": float(self.nbytes()),
        }
        out.update({f"total_{k}": float(v) for k, v in self._totals.items()})
        return out

    # ---- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors and plain Python; ``torch.save``-able)."""
        items = self._items
        return {
            "format": _STATE_FORMAT,
            "params": asdict(self.params),
            "lengths": torch.tensor([s.num_tokens for s in items], dtype=torch.long),
            **{
                name: torch.cat([getattr(s, name) for s in items]) if items else _empty_field(name)
                for name in _TENSOR_FIELDS
            },
            "scalars": {name: [getattr(s, name) for s in items] for name in _SCALAR_FIELDS},
            "hist_means": self._hist_means.clone(),
            "hist_stds": self._hist_stds.clone(),
            "last_step": self._last_step,
            "generator": self._gen.get_state(),
            "totals": dict(self._totals),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises ``ValueError`` on a malformed state."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"replay state has format {state.get('format')!r}; expected {_STATE_FORMAT}"
            )
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"replay state lacks {', '.join(missing)}")
        if state.get("params") != asdict(self.params):
            log.warning(
                "restoring a replay buffer saved with different parameters: %s", state.get("params")
            )
        lengths = state["lengths"].tolist()
        state = {**state, "scalars": _with_new_fields(state["scalars"], len(lengths))}
        _check_state_sizes(state, lengths)
        split = {
            name: torch.split(state[name], lengths) if lengths else () for name in _TENSOR_FIELDS
        }
        scalars = state["scalars"]
        self._items = [
            _sample_from_state(
                {name: split[name][i] for name in _TENSOR_FIELDS},
                {name: scalars[name][i] for name in _SCALAR_FIELDS},
            )
            for i in range(len(lengths))
        ]
        self._hist_means = state["hist_means"].to(torch.float64).clone()
        self._hist_stds = state["hist_stds"].to(torch.float64).clone()
        self._last_step = state["last_step"]
        self._gen.set_state(state["generator"])
        self._totals = {k: int(state["totals"].get(k, 0)) for k in self._totals}


def _check_state_sizes(state: dict[str, Any], lengths: list[int]) -> None:
    """Raise ``ValueError`` unless the flat tensors and scalar lists match ``lengths``."""
    total = sum(lengths)
    for name in _TENSOR_FIELDS:
        if int(state[name].numel()) != total:
            raise ValueError(
                f"replay state field {name!r} has {state[name].numel()} entries; the sample "
                f"lengths add up to {total}"
            )
    scalars = state["scalars"]
    for name in _SCALAR_FIELDS:
        if len(scalars.get(name, ())) != len(lengths):
            raise ValueError(
                f"replay state scalar {name!r} has {len(scalars.get(name, ()))} entries; "
                f"expected {len(lengths)} (one per stored sample)"
            )


def _with_new_fields(scalars: dict[str, list[Any]], n: int) -> dict[str, list[Any]]:
    """``scalars`` with every :class:`Sample` field that has a default and is missing (a state
    saved before that field existed, e.g. ``turn_penalty``) filled with that default, n times."""
    out = dict(scalars)
    for f in fields(Sample):
        if f.name in _SCALAR_FIELDS and f.name not in out and f.default is not MISSING:
            log.info("replay state predates Sample.%s: using its default %r", f.name, f.default)
            out[f.name] = [f.default] * n
    return out


def _empty_field(name: str) -> Tensor:
    return torch.zeros(0, dtype=_STORED_DTYPES[name])


def _sample_from_state(tensors: dict[str, Tensor], scalars: dict[str, Any]) -> Sample:
    return Sample(
        input_ids=tensors["input_ids"].to(torch.int32).clone(),
        loss_mask=tensors["loss_mask"].to(torch.bool).clone(),
        behavior_logprobs=tensors["behavior_logprobs"].to(torch.float32).clone(),
        **{**scalars, "filtered_by": tuple(scalars["filtered_by"])},
    )
