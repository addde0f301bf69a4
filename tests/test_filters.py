from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear.filters import (
    RESPONSE_FILTERS,
    ResponseFilterParams,
    apply_group_filter,
    apply_response_filters,
    has_repeated_ngram,
    is_unreadable,
    num_groups_kept,
    select_groups,
)
from spear.registry import UnknownNameError
from spear.types import EndReason, Episode, Sample

PROMPT = [1, 2, 3]


class CharDecoder:
    """Token id = Unicode code point."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        self.calls.append(list(token_ids))
        return "".join(chr(i) for i in token_ids)


def mk(
    group: int, episode: int, response: Sequence[int] | str = (7, 8, 9), *, score: float = 0.0
) -> Sample:
    resp = [ord(c) for c in response] if isinstance(response, str) else list(response)
    ids = torch.tensor(PROMPT + resp, dtype=torch.long)
    mask = torch.arange(len(ids)) >= len(PROMPT)
    return Sample(ids, mask, torch.zeros(len(ids)), group_id=group, episode_id=episode, score=score)


def ep(
    group: int,
    episode: int,
    samples: list[Sample] | None = None,
    *,
    end: EndReason = EndReason.ANSWER,
    answer: str | None = "42",
    score: float = 0.0,
) -> Episode:
    return Episode(
        task_id=f"task{group}",
        group_id=group,
        episode_id=episode,
        samples=samples if samples is not None else [mk(group, episode, score=score)],
        end_reason=end,
        outcome_reward=score,
        success=False,
        num_turns=1,
        num_tool_calls=0,
        num_invalid_tool_calls=0,
        final_answer=answer,
    )


def fp(*enabled: str, ngram: int = 20, repeats: int = 10) -> ResponseFilterParams:
    return ResponseFilterParams(enabled=enabled, ngram=ngram, ngram_repeats=repeats)


def flags(
    e: Episode, params: ResponseFilterParams, decoder: CharDecoder | None = None
) -> tuple[str, ...]:
    apply_response_filters([e], params, decoder)
    return e.samples[0].filtered_by


# ---------------------------------------------------------------- individual filters


@pytest.mark.parametrize(
    ("end", "expected"),
    [
        (EndReason.MAX_TOKENS, ("overlong",)),
        (EndReason.CONTEXT, ("overlong",)),
        (EndReason.ANSWER, ()),
        (EndReason.MAX_TURNS, ()),
        (EndReason.TERMINATED, ()),
    ],
)
def test_overlong(end: EndReason, expected: tuple[str, ...]) -> None:
    assert flags(ep(0, 0, end=end), fp("overlong")) == expected


@pytest.mark.parametrize(
    ("end", "answer", "response", "expected"),
    [
        (EndReason.ANSWER, "42", [7], ()),
        (EndReason.ANSWER, None, [7], ("incomplete",)),  # answered, but no extractable answer
        (EndReason.MAX_TURNS, None, [7], ("incomplete",)),  # still calling tools at the cap
        (EndReason.ENV_ERROR, None, [7], ("incomplete",)),
        (EndReason.TERMINATED, None, [7], ()),  # the environment ended it (text games)
        (EndReason.ANSWER, "42", [], ("incomplete",)),  # empty response
    ],
)
def test_incomplete(
    end: EndReason, answer: str | None, response: list[int], expected: tuple[str, ...]
) -> None:
    e = ep(0, 0, [mk(0, 0, response)], end=end, answer=answer)
    assert flags(e, fp("incomplete")) == expected


def test_repetitive_counts_overlapping_ngrams_of_response_only() -> None:
    block = list(range(100, 120))  # 20 distinct tokens
    # block x 10 = 200 tokens: the 20-gram starting at 0 occurs at 0, 20, ..., 180 -> 10 times
    assert flags(ep(0, 0, [mk(0, 0, block * 10)]), fp("repetitive")) == ("repetitive",)
    # block x 9: every 20-gram occurs at most 9 times
    assert flags(ep(0, 0, [mk(0, 0, block * 9)]), fp("repetitive")) == ()
    # a run of one token: length 29 has 29 - 20 + 1 = 10 identical windows; 28 has 9
    assert has_repeated_ngram(torch.full((29,), 5), 20, 10)
    assert not has_repeated_ngram(torch.full((28,), 5), 20, 10)
    # repetition in the prompt (loss mask 0) does not count
    s = mk(0, 0, [7, 8])
    s.input_ids = torch.cat([torch.full((300,), 5), s.input_ids])
    s.loss_mask = torch.cat([torch.zeros(300, dtype=torch.bool), s.loss_mask])
    s.behavior_logprobs = torch.zeros(len(s.input_ids))
    assert flags(ep(0, 0, [s]), fp("repetitive")) == ()


def test_repetitive_small_n_and_edge_cases() -> None:
    # n=2, k=3: [1,2,1,2,1,2] has (1,2) at 0, 2, 4 -> 3 times
    assert has_repeated_ngram(torch.tensor([1, 2, 1, 2, 1, 2]), 2, 3)
    assert not has_repeated_ngram(torch.tensor([1, 2, 1, 2, 1]), 2, 3)  # (1,2) twice, (2,1) twice
    assert not has_repeated_ngram(torch.zeros(0, dtype=torch.long), 2, 2)  # empty response
    assert flags(ep(0, 0, [mk(0, 0, [])]), fp("repetitive", ngram=1, repeats=2)) == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the answer is 42", False),
        ("", False),
        ("broken \ufffd byte", True),
        ("mojibake \u00ef\u00bf\u00bd here", True),  # "ï¿½": UTF-8 of U+FFFD read as Latin-1
        ("what\u00ef\u00bc\u0178", True),  # "ï¼Ÿ": fullwidth question mark read as cp1252
        ("plain ï and ¿ apart", False),
    ],
)
def test_unreadable_text(text: str, expected: bool) -> None:
    assert is_unreadable(text) is expected
    decoder = CharDecoder()
    e = ep(0, 0, [mk(0, 0, text)])
    assert flags(e, fp("unreadable"), decoder) == (("unreadable",) if expected else ())
    assert decoder.calls == [[ord(c) for c in text]]  # only the response tokens are decoded


def test_unreadable_needs_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        apply_response_filters([ep(0, 0)], fp("unreadable"), None)


def test_registry_and_params_validation() -> None:
    assert RESPONSE_FILTERS.names() == ["incomplete", "overlong", "repetitive", "unreadable"]
    with pytest.raises(UnknownNameError, match="overlong"):
        fp("overlength")
    with pytest.raises(ValueError, match="ngram_repeats"):
        fp("repetitive", repeats=1)
    with pytest.raises(ValueError, match="ngram"):
        fp("repetitive", ngram=0)
    with pytest.raises(ValueError, match="enabled"):
        bad: object = "overlong"  # a string, not a tuple of names
        ResponseFilterParams(enabled=bad, ngram=20, ngram_repeats=10)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the stage


def test_apply_response_filters_marks_and_counts() -> None:
    decoder = CharDecoder()
    block = list(range(100, 120))
    long_ep = ep(0, 0, [mk(0, 0, "a\ufffd"), mk(0, 0, "ok")], end=EndReason.MAX_TOKENS, answer=None)
    rep_ep = ep(0, 1, [mk(0, 1, block * 10)])
    fine_ep = ep(1, 2, [mk(1, 2, "fine")])
    params = fp("overlong", "incomplete", "repetitive", "unreadable")
    m = apply_response_filters([long_ep, rep_ep, fine_ep], params, decoder)
    # episode-level filters mark every sample (turn layout): both turns of long_ep
    assert long_ep.samples[0].filtered_by == ("overlong", "incomplete", "unreadable")
    assert long_ep.samples[1].filtered_by == ("overlong", "incomplete")
    assert rep_ep.samples[0].filtered_by == ("repetitive",)
    assert fine_ep.samples[0].filtered_by == ()
    assert m == {
        "filter/overlong": 2.0,
        "filter/incomplete": 2.0,
        "filter/repetitive": 1.0,
        "filter/unreadable": 1.0,
        "filter/response_filtered": 3.0,
        "filter/response_filtered_frac": 0.75,  # 3 of 4 samples
    }
    # applying again does not duplicate names
    apply_response_filters([long_ep], params, decoder)
    assert long_ep.samples[1].filtered_by == ("overlong", "incomplete")


def test_disabled_filters_do_nothing() -> None:
    e = ep(0, 0, [mk(0, 0, "\ufffd")], end=EndReason.MAX_TOKENS, answer=None)
    m = apply_response_filters([e], fp(), None)
    assert e.samples[0].filtered_by == ()
    assert m == {"filter/response_filtered": 0.0, "filter/response_filtered_frac": 0.0}
    assert apply_response_filters([], fp("overlong"), None)["filter/response_filtered_frac"] == 0.0


# ---------------------------------------------------------------- group filter


def groups_with_stds(n_groups: int, size: int = 2) -> list[Episode]:
    """Group g has episode scores (0, g+1, 0, g+1, ...) so its std grows with g."""
    return [
        ep(g, g * size + j, score=float((g + 1) * (j % 2)))
        for g in range(n_groups)
        for j in range(size)
    ]


@pytest.mark.parametrize(
    ("n_groups", "expected"), [(32, 24), (128, 96), (10, 7), (4, 3), (2, 1), (1, 1)]
)
def test_group_filter_counts(n_groups: int, expected: int) -> None:
    # §11: floor(0.75 * 32) = 24, floor(0.75 * 128) = 96; 10 -> floor(7.5) = 7 (no power of two);
    # 1 -> floor(0.75) = 0 would drop the whole step: at least one group is kept
    eps = groups_with_stds(n_groups)
    kept, m = apply_group_filter(eps, keep_ratio=0.75, kind="std")
    assert len({e.group_id for e in kept}) == expected and len(kept) == 2 * expected
    assert m["filter/groups_removed"] == n_groups - expected
    assert m["filter/samples_removed"] == 2 * (n_groups - expected)


def test_group_filter_keeps_largest_or_smallest_std_whole_groups() -> None:
    eps = groups_with_stds(8, size=3)  # std increases with g
    kept, _ = apply_group_filter(eps, keep_ratio=0.5, kind="std")
    assert sorted({e.group_id for e in kept}) == [4, 5, 6, 7]
    assert len(kept) == 12  # whole groups
    assert kept == [e for e in eps if e.group_id >= 4]  # input order preserved
    kept, _ = apply_group_filter(eps, keep_ratio=0.5, kind="std_rev")
    assert sorted({e.group_id for e in kept}) == [0, 1, 2, 3]


def test_group_filter_by_id_not_row_position() -> None:
    # interleaved episodes of non-contiguous group ids; group 50 has std 0, 9 and 31 do not
    eps = [
        ep(31, 0, score=0.0),
        ep(50, 1, score=1.0),
        ep(9, 2, score=4.0),
        ep(31, 3, score=2.0),
        ep(50, 4, score=1.0),
        ep(9, 5, score=0.0),
    ]
    # stds: 31 -> sqrt(2) (scores 0, 2); 50 -> 0; 9 -> 2 sqrt(2) (scores 4, 0). floor(0.67*3) = 2
    kept, m = apply_group_filter(eps, keep_ratio=0.67, kind="std")
    assert [e.episode_id for e in kept] == [0, 2, 3, 5]
    assert m["filter/zero_std_groups"] == 1.0 and m["filter/episodes_removed"] == 2.0


def test_group_filter_ties_and_single_member_groups() -> None:
    # all groups equal (single member -> std 0): ties keep the first appearances
    eps = [ep(g, g, score=float(g)) for g in (5, 3, 9, 1)]
    kept, m = apply_group_filter(eps, keep_ratio=0.5, kind="std")
    assert [e.group_id for e in kept] == [5, 3]
    kept, _ = apply_group_filter(eps, keep_ratio=0.5, kind="std_rev")
    assert [e.group_id for e in kept] == [5, 3]
    assert m["filter/zero_std_groups"] == 4.0


def test_group_filter_episode_score_is_mean_of_its_samples() -> None:
    # group 0: episode 0 turns scored (0, 2) -> 1; episode 1 scored 1 -> std 0
    # group 1: episodes scored 0 and 0.5 -> std > 0; keep 1 of 2 -> group 1
    e0 = ep(0, 0, [mk(0, 0, score=0.0), mk(0, 0, score=2.0)])
    eps = [e0, ep(0, 1, score=1.0), ep(1, 2, score=0.0), ep(1, 3, score=0.5)]
    kept, _ = apply_group_filter(eps, keep_ratio=0.5, kind="std")
    assert {e.group_id for e in kept} == {1}


def test_group_filter_ratio_one_and_empty() -> None:
    eps = groups_with_stds(3)
    kept, m = apply_group_filter(eps, keep_ratio=1.0, kind="std")
    assert kept == eps and m["filter/groups_removed"] == 0.0
    kept, m = apply_group_filter([], keep_ratio=0.75, kind="std")
    assert kept == [] and m["filter/groups_before"] == 0.0


@pytest.mark.parametrize(
    ("ratio", "kind"), [(0.0, "std"), (1.5, "std"), (True, "std"), (0.5, "var")]
)
def test_group_filter_validation(ratio: object, kind: str) -> None:
    with pytest.raises(ValueError, match=r"keep_ratio|kind"):
        eps = groups_with_stds(2)
        apply_group_filter(eps, keep_ratio=ratio, kind=kind)  # type: ignore[arg-type]


def test_num_groups_kept_float_guard() -> None:
    assert num_groups_kept(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    assert num_groups_kept(32, 0.75) == 24
    assert num_groups_kept(0, 0.75) == 0 and num_groups_kept(3, 0.1) == 1


@settings(max_examples=100, deadline=None)
@given(
    stds=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=0, max_size=30),
    ratio=st.floats(0.01, 1.0),
)
def test_select_groups_property(stds: list[float], ratio: float) -> None:
    t = torch.tensor(stds, dtype=torch.float64)
    k = num_groups_kept(len(stds), ratio)
    assert k == (max(1, int(ratio * len(stds) + 1e-9)) if stds else 0)
    picked = select_groups(t, k, largest=True).tolist()
    assert len(picked) == k and picked == sorted(set(picked))
    rest = [i for i in range(len(stds)) if i not in picked]
    # every kept std >= every dropped std, and among equal stds earlier groups win
    for i in picked:
        for j in rest:
            assert stds[i] > stds[j] or (stds[i] == stds[j] and i < j)
