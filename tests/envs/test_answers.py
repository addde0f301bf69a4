"""Answer extraction and normalising comparison."""

from __future__ import annotations

import threading
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spear.envs.answers import (
    answers_match,
    extract_boxed,
    normalize_text,
    parse_number,
    score_boxed_math,
    score_boxed_number,
)
from spear.envs.base import Task


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{ 2 }", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\fbox{7}", "7"),
        ("\\boxed {x+1}", "x+1"),
        ("\\boxed{{a}{b}}", "{a}{b}"),
        ("no box here", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_extract_boxed(text: str, want: str | None) -> None:
    assert extract_boxed(text) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("42", Fraction(42)),
        ("-7", Fraction(-7)),
        ("1,000", Fraction(1000)),
        ("1000.50", Fraction(2001, 2)),
        (".5", Fraction(1, 2)),
        ("3/4", Fraction(3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("\\dfrac{6}{8}", Fraction(3, 4)),
        ("-\\frac{1}{2}", Fraction(-1, 2)),
        ("$12$", Fraction(12)),
        ("\\(5\\)", Fraction(5)),
        ("\\text{12}", Fraction(12)),
        ("12.", Fraction(12)),
        ("1/0", None),
        ("50%", None),
        ("1,00", None),
        ("abc", None),
        ("", None),
        ("+", None),
        ("1e5", None),
    ],
)
def test_parse_number(text: str, want: Fraction | None) -> None:
    assert parse_number(text) == want


def test_answers_match_numbers_text_and_symbols() -> None:
    assert answers_match("1,000", "1000.0")
    assert answers_match("\\frac{1}{2}", "0.5")
    assert not answers_match("0.5", "0.51")
    assert answers_match("\\text{Yes}", "yes")
    assert normalize_text(" $ A B $ ") == "ab"
    assert not answers_match("\\frac{\\sqrt{2}}{2}", "1/\\sqrt{2}")
    assert answers_match("\\frac{\\sqrt{2}}{2}", "1/\\sqrt{2}", symbolic=True)


def test_symbolic_match_works_in_worker_threads() -> None:
    # Envs are stepped in a thread pool; math-verify's signal-based timeout fails there.
    got: list[bool] = []
    t = threading.Thread(
        target=lambda: got.append(
            answers_match("\\frac{\\sqrt{2}}{2}", "1/\\sqrt{2}", symbolic=True)
        )
    )
    t.start()
    t.join(10)
    assert got == [True]


def test_scores() -> None:
    task = Task("t", "q", answer="144")
    assert score_boxed_number("\\boxed{144}", task).reward == 1.0
    wrong = score_boxed_number("\\boxed{145}", task)
    assert (wrong.reward, wrong.success, wrong.answer) == (0.0, False, "145")
    assert score_boxed_math("\\boxed{144}", task).success
    assert score_boxed_math("\\boxed{145}", task).reward == -1.0
    missing = score_boxed_math("no box", task)
    assert (missing.reward, missing.answer) == (-1.0, None)
    assert score_boxed_math("\\boxed{1}", Task("t", "q", answer=None)).reward == -1.0


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("\\boxed{}frac0123456789.,/-$ ab"), max_size=60))
def test_never_raises_on_arbitrary_text(text: str) -> None:
    extract_boxed(text)
    parse_number(text)
    answers_match(text, "12")


@given(st.integers(-(10**12), 10**12), st.integers(1, 10**6))
def test_fractions_round_trip(num: int, den: int) -> None:
    assert parse_number(f"{num}/{den}") == Fraction(num, den)
    assert answers_match(f"\\frac{{{num}}}{{{den}}}", f"{num}/{den}")
