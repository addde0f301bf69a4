"""Dr.BoT filters: response filters that drop samples from the loss, and the low-variance group
filter that drops whole groups (reference §7.1, §7.2).

Response filters only *mark* samples (``Sample.filtered_by`` gets the filter names); a marked
sample leaves the loss entirely (``TokenBatch.collate`` zeroes its mask) but still counts in its
group's reward statistics, as in the reference. Each filter is a small predicate in
``RESPONSE_FILTERS`` with one signature ``(FilterInput, ResponseFilterParams) -> bool``:

- ``overlong``: the episode hit a length limit: ``end_reason`` is ``MAX_TOKENS`` (the episode's
  response-token budget) or ``CONTEXT`` (the next prompt would not fit).
- ``incomplete``: the sample has no response token, or the episode has no final answer
  (``final_answer is None``) and the environment did not end it (``end_reason`` is not
  ``TERMINATED``): e.g. it stopped at the turn cap while still calling tools, ended ``ANSWER``
  without an extractable answer text, or a tool/env crashed. Text games end through the env
  (``TERMINATED``) and are complete; keep ``rollout.max_turns`` at or above the game's step
  limit or their failures at the loop's cap count as incomplete. The filter sees only the
  Episode record: an env that ends an episode ``TERMINATED`` after an answer attempt with no
  extractable answer is judged complete.
- ``repetitive``: some ``ngram``-gram of the sample's response token ids (``loss_mask == 1``,
  turns concatenated) occurs at least ``ngram_repeats`` times (overlapping occurrences count).
- ``unreadable``: the decoded response contains U+FFFD or a mojibake marker (§7.1).

Episode-level conditions (overlong, incomplete) mark every sample of the episode (turn layout).

Group filter: keep the ``floor(keep_ratio * #groups)`` groups (at least one; by ``group_id``)
with the largest (``"std"``) or smallest (``"std_rev"``) reward std, ties broken by first
appearance; whole groups are kept and nothing is truncated to a power of two (B12). The reward
std uses the buffer's convention: episode score = mean of its samples' ``score``; unbiased
(ddof=1) std over the group's episodes, 0 for a single-episode group.

Metrics say what each filter removed and why: ``filter/<name>`` (samples caught by that
response filter), ``filter/response_filtered`` (samples caught by any), and for the group
filter ``filter/groups_removed`` (for a low reward std), ``filter/zero_std_groups``,
``filter/episodes_removed`` and ``filter/samples_removed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

from spear.registry import Registry
from spear.replay import group_baseline_stats
from spear.types import EndReason, Episode, Sample

GroupFilterKind = Literal["std", "std_rev"]

OVERLONG_END_REASONS = frozenset({EndReason.MAX_TOKENS, EndReason.CONTEXT})
# U+FFFD itself; its UTF-8 bytes read as Latin-1 ("ï¿½"); a fullwidth "？" read as cp1252
# ("ï¼Ÿ").
# The reference's "ï¼" + U+FFFD contains U+FFFD and is covered by the first marker.
UNREADABLE_MARKERS = ("\ufffd", "\u00ef\u00bf\u00bd", "\u00ef\u00bc\u0178")


class TextDecoder(Protocol):
    """What the unreadable filter needs of a tokenizer."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str | list[str]: ...


# ------------------------------------------------------------------------------ pure predicates


def has_repeated_ngram(ids: Tensor, n: int, k: int) -> bool:
    """True iff some ``n``-gram of ``ids`` [L] occurs at least ``k`` times (overlapping)."""
    if ids.numel() < n:
        return False
    windows = ids.reshape(-1).unfold(0, n, 1)  # [L - n + 1, n]
    if windows.shape[0] < k:
        return False
    _, counts = torch.unique(windows, dim=0, return_counts=True)
    return bool(counts.max() >= k)


def is_unreadable(text: str) -> bool:
    """True iff ``text`` contains U+FFFD or a known mojibake marker."""
    return any(marker in text for marker in UNREADABLE_MARKERS)


def is_length_limited(end_reason: EndReason) -> bool:
    return end_reason in OVERLONG_END_REASONS


def lacks_final_answer(episode: Episode) -> bool:
    """No final answer and not ended by the environment."""
    return episode.final_answer is None and episode.end_reason is not EndReason.TERMINATED


def num_groups_kept(n_groups: int, keep_ratio: float) -> int:
    """``floor(keep_ratio * n_groups)``, at least 1 when there is a group.

    A 1e-9 guard absorbs float error (0.29 * 100 -> 29, not 28). The floor at one group keeps a
    step with fewer than ``1 / keep_ratio`` groups from losing all its data (the reference keeps
    none); it never changes the result for ``n_groups >= 1 / keep_ratio``.
    """
    if n_groups <= 0:
        return 0
    return min(n_groups, max(1, math.floor(keep_ratio * n_groups + 1e-9)))


def select_groups(stds: Tensor, n_keep: int, largest: bool) -> Tensor:
    """Positions [n_keep] of the groups to keep, ``stds`` [G] in first-appearance order.

    Stable sort: equal stds keep their first-appearance order. Returned positions are sorted.
    """
    order = torch.sort(stds, descending=largest, stable=True).indices  # [G]
    return order[:n_keep].sort().values


# ------------------------------------------------------------------------------ response filters


@dataclass(frozen=True, slots=True)
class ResponseFilterParams:
    """Enabled response filters and the repetition test (defaults: spear/config_sections.py ``filters``)."""

    enabled: tuple[str, ...]  # names in RESPONSE_FILTERS
    ngram: int  # n of the repetition test
    ngram_repeats: int  # k: occurrences that make a response repetitive

    def __post_init__(self) -> None:
        if isinstance(self.enabled, str) or not isinstance(self.enabled, tuple):
            raise ValueError(
                f"ResponseFilterParams.enabled must be a tuple of names, got {self.enabled!r}"
            )
        for name in self.enabled:
            RESPONSE_FILTERS.get(name)  # UnknownNameError names the filter
        if isinstance(self.ngram, bool) or not isinstance(self.ngram, int) or self.ngram < 1:
            raise ValueError(
                f"ResponseFilterParams.ngram must be an integer >= 1, got {self.ngram!r}"
            )
        k = self.ngram_repeats
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(
                f"ResponseFilterParams.ngram_repeats must be an integer >= 2, got {k!r}"
            )


@dataclass(slots=True)
class FilterInput:
    """One sample with its episode; the decoded response text is computed once, on demand."""

    sample: Sample
    episode: Episode
    decoder: TextDecoder | None
    _text: str | None = field(default=None, repr=False)

    @property
    def response_ids(self) -> Tensor:
        """[R] the sample's response token ids (``loss_mask == 1``)."""
        return self.sample.input_ids[self.sample.loss_mask.bool()]

    @property
    def text(self) -> str:
        if self._text is None:
            if self.decoder is None:
                raise ValueError("the 'unreadable' filter needs a tokenizer to decode responses")
            decoded = self.decoder.decode(self.response_ids.tolist(), skip_special_tokens=False)
            self._text = decoded if isinstance(decoded, str) else "".join(decoded)
        return self._text


ResponseFilter = Callable[[FilterInput, ResponseFilterParams], bool]
RESPONSE_FILTERS: Registry[ResponseFilter] = Registry("response filter")


@RESPONSE_FILTERS.register("overlong")
def _overlong(x: FilterInput, params: ResponseFilterParams) -> bool:
    return is_length_limited(x.episode.end_reason)


@RESPONSE_FILTERS.register("incomplete")
def _incomplete(x: FilterInput, params: ResponseFilterParams) -> bool:
    return x.sample.num_response_tokens == 0 or lacks_final_answer(x.episode)


@RESPONSE_FILTERS.register("repetitive")
def _repetitive(x: FilterInput, params: ResponseFilterParams) -> bool:
    return has_repeated_ngram(x.response_ids, params.ngram, params.ngram_repeats)


@RESPONSE_FILTERS.register("unreadable")
def _unreadable(x: FilterInput, params: ResponseFilterParams) -> bool:
    return is_unreadable(x.text)


def apply_response_filters(
    episodes: Sequence[Episode], params: ResponseFilterParams, tokenizer: TextDecoder | None
) -> dict[str, float]:
    """Mark samples caught by the enabled filters; return counts per filter.

    Metrics: ``filter/<name>`` = samples that filter caught (a sample may be caught by several),
    ``filter/response_filtered`` = samples marked by at least one, and its fraction.
    ``tokenizer`` is only needed (and required) when ``unreadable`` is enabled.
    """
    if "unreadable" in params.enabled and tokenizer is None:
        raise ValueError("the 'unreadable' filter is enabled but no tokenizer was given")
    filters = [(name, RESPONSE_FILTERS.get(name)) for name in params.enabled]
    caught = dict.fromkeys(params.enabled, 0)
    marked = total = 0
    for episode in episodes:
        for sample in episode.samples:
            total += 1
            x = FilterInput(sample, episode, tokenizer)
            hits = [name for name, predicate in filters if predicate(x, params)]
            for name in hits:
                caught[name] += 1
            if hits:
                marked += 1
                sample.filtered_by = sample.filtered_by + tuple(
                    h for h in hits if h not in sample.filtered_by
                )
    out = {f"filter/{name}": float(n) for name, n in caught.items()}
    out["filter/response_filtered"] = float(marked)
    out["filter/response_filtered_frac"] = marked / total if total else 0.0
    return out


# ------------------------------------------------------------------------------ group filter


def group_reward_stds(episodes: Sequence[Episode]) -> tuple[list[int], Tensor]:
    """Group ids in first-appearance order and their reward std [G] float64 (see module doc).

    A group none of whose episodes has a sample gets std 0.
    """
    order = list(dict.fromkeys(e.group_id for e in episodes))
    samples = [s for e in episodes for s in e.samples]
    scores = torch.tensor([s.score for s in samples], dtype=torch.float64)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("every Sample.score must be finite before group filtering")
    gids, _, stds = group_baseline_stats(
        scores,
        torch.tensor([s.group_id for s in samples], dtype=torch.long),
        torch.tensor([s.episode_id for s in samples], dtype=torch.long),
    )
    by_gid = dict(zip(gids.tolist(), stds.tolist()))
    return order, torch.tensor([by_gid.get(g, 0.0) for g in order], dtype=torch.float64)


def apply_group_filter(
    episodes: Sequence[Episode], *, keep_ratio: float, kind: GroupFilterKind
) -> tuple[list[Episode], dict[str, float]]:
    """Keep whole groups by reward std; returns kept episodes (input order) and metrics."""
    if (
        isinstance(keep_ratio, bool)
        or not isinstance(keep_ratio, (int, float))
        or not 0 < keep_ratio <= 1
    ):
        raise ValueError(f"group filter keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if kind not in ("std", "std_rev"):
        raise ValueError(f"group filter kind must be 'std' or 'std_rev', got {kind!r}")
    group_order, stds = group_reward_stds(episodes)
    n_keep = num_groups_kept(len(group_order), keep_ratio)
    kept_groups = {group_order[i] for i in select_groups(stds, n_keep, kind == "std").tolist()}
    kept = [e for e in episodes if e.group_id in kept_groups]
    n_samples = sum(len(e.samples) for e in episodes)
    return kept, {
        "filter/groups_before": float(len(group_order)),
        "filter/groups_removed": float(len(group_order) - len(kept_groups)),
        "filter/zero_std_groups": float(int((stds == 0).sum())),
        "filter/episodes_removed": float(len(episodes) - len(kept)),
        "filter/samples_removed": float(n_samples - sum(len(e.samples) for e in kept)),
    }
