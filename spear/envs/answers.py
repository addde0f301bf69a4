"""Answer extraction and normalising comparison (DESIGN.md: no exact string match, B19).

* :func:`extract_boxed` finds the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces.
* :func:`parse_number` reads integers, decimals, thousands separators, signs, ``a/b``,
  ``\\frac{a}{b}`` / ``\\dfrac`` / ``\\tfrac``, a trailing ``%`` is *not* stripped (50% != 50), and
  surrounding ``$``, ``\\(``, ``\\text{}`` and units-free spaces, into an exact
  :class:`~fractions.Fraction`.
* :func:`answers_match` compares numerically when both sides are numbers, otherwise after a
  LaTeX-light string normalisation, and finally (math task) with Hugging Face ``math-verify``
  when it is installed, which handles symbolic equivalence (``\\sqrt{2}/2`` = ``1/\\sqrt{2}``),
  in a child process bounded in time and memory (:mod:`spear.envs.symbolic`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from spear.envs.base import Task
from spear.envs.symbolic import SymbolicChecker, Verdict

log = logging.getLogger(__name__)


_BOX_OPENERS = ("\\boxed{", "\\fbox{", "\\boxed {")
_FRAC = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_NUMBER = re.compile(r"^[+-]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?$")


@dataclass(frozen=True, slots=True)
class Score:
    """The outcome of a final answer: reward, whether it is right, and the extracted answer."""

    reward: float
    success: bool
    answer: str | None
    check_bounded: bool = False  # the symbolic check was stopped by its time or memory bound


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed), or None."""
    start = max(text.rfind(o) for o in _BOX_OPENERS)
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced: the box was never closed


def _strip_wrappers(s: str) -> str:
    s = s.strip()
    for a, b in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(a) and s.endswith(b) and len(s) >= len(a) + len(b):
            s = s[len(a) : len(s) - len(b)].strip()
    s = _TEXT.sub(r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    return s.strip().rstrip(".").strip()


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number, or None when it is not a plain number or fraction."""
    s = _strip_wrappers(text).replace(" ", "")
    if s[:1] in ("-", "+") and _FRAC.match(s[1:]) is not None:  # -\frac{1}{2}
        value = parse_number(s[1:])
        return None if value is None else (-value if s[0] == "-" else value)
    if (m := _FRAC.match(s)) is not None:
        num, den = parse_number(m.group(1)), parse_number(m.group(2))
        return num / den if num is not None and den not in (None, 0) else None
    if s.count("/") == 1:
        a, b = s.split("/")
        num, den = parse_number(a), parse_number(b)
        return num / den if num is not None and den not in (None, 0) else None
    if not s or not _NUMBER.match(s) or s in "+-.":
        return None
    try:
        return Fraction(Decimal(s.replace(",", "")))
    except (InvalidOperation, ValueError):
        return None


def normalize_text(text: str) -> str:
    """LaTeX-light canonical form for non-numeric answers: no wrappers, spaces or case."""
    return re.sub(r"\s+", "", _strip_wrappers(text)).lower()


_checker: SymbolicChecker | None = None


def default_checker() -> SymbolicChecker:
    """The process's shared :class:`SymbolicChecker` with the default limits."""
    global _checker
    if _checker is None:
        _checker = SymbolicChecker()
    return _checker


def compare_answers(pred: str, truth: str, checker: SymbolicChecker | None = None) -> Verdict:
    """Whether ``pred`` and ``truth`` denote the same answer, as a :class:`Verdict`.

    Numbers compare exactly as fractions (``"1,000"`` = ``"1000.0"``, ``"\\frac{1}{2}"`` =
    ``"0.5"``); other answers compare after :func:`normalize_text`; with a ``checker`` a failed
    comparison is retried symbolically (``math-verify``, bounded in time and memory).
    """
    a, b = parse_number(pred), parse_number(truth)
    if a is not None and b is not None:
        return Verdict.EQUAL if a == b else Verdict.DIFFERENT
    if normalize_text(pred) == normalize_text(truth):
        return Verdict.EQUAL
    return checker.check(pred, truth) if checker is not None else Verdict.DIFFERENT


def answers_match(pred: str, truth: str, *, symbolic: bool = False) -> bool:
    """:func:`compare_answers` as a yes/no; ``symbolic`` uses :func:`default_checker`."""
    checker = default_checker() if symbolic else None
    return compare_answers(pred, truth, checker) is Verdict.EQUAL


def _score_boxed(text: str, task: Task, *, checker: SymbolicChecker | None, wrong: float) -> Score:
    answer = extract_boxed(text)
    if answer is None or task.answer is None:
        return Score(wrong, False, answer)
    verdict = compare_answers(answer, str(task.answer), checker)
    ok = verdict is Verdict.EQUAL
    return Score(1.0 if ok else wrong, ok, answer, check_bounded=verdict.bounded)


def score_boxed_number(text: str, task: Task) -> Score:
    """Built-in arithmetic task: 1 for a ``\\boxed{}`` number equal to the answer, else 0."""
    return _score_boxed(text, task, checker=None, wrong=0.0)


def score_boxed_math(text: str, task: Task, checker: SymbolicChecker | None = None) -> Score:
    """Math task (reference §6.2): +1 for a correct last ``\\boxed{}`` answer, -1 otherwise;
    answers are compared numerically, then normalised, then symbolically (math-verify). Unlike
    the reference the whole response is searched, not its last 300 characters. ``checker``:
    the symbolic checker (default: :func:`default_checker`); an answer whose check hit its time
    or memory bound is wrong, with ``check_bounded`` set."""
    return _score_boxed(text, task, checker=checker or default_checker(), wrong=-1.0)
