"""The built-in tool task: multi-step arithmetic word problems with large operands.

A problem is a short templated story over one quantity, e.g.

    "37 crates hold 482 bolts each. 915 bolts are sold. How many bolts are left?"

whose answer (``37*482-915 = 16919``) a tiny model cannot compute unaided but gets with one call
to the :class:`Calculator` tool. The expression is always the operands in the order they appear
in the text, joined left to right (a leading product, then sums and differences), so correct tool
use is a matter of copying numbers and picking operators.

Splits: each problem has a canonical key (its expression); a problem belongs to the held-out
split exactly when the SHA-256 of its key falls in the held-out bucket, so train and test never
share a problem whatever seeds are used. The two splits also draw from disjoint seed streams.

``difficulty`` (1-5) is the number of operations; operand sizes grow with it: up to
difficulty 2 every number in a problem (operands, intermediate values, answer) is below 1,000,
which the built-in tokenizer writes as one token, so copying numbers into a tool call is within
reach of the tiny model.
"""

from __future__ import annotations

import ast
import hashlib
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from spear.envs.base import Env, Task, Tool
from spear.envs.tool_env import NATIVE_PARSER, boxed_number_env, check_tool_limits

if TYPE_CHECKING:
    from spear.config import Config

SPLITS = ("train", "test")
MAX_DIFFICULTY = 5
HELD_OUT_BUCKETS = 8  # 1 in 8 possible problems belongs to the held-out split

SYSTEM_PROMPT = "Use the calculator. Answer as \\boxed{n}."

# (singular container, plural container, items)
_STORIES = (
    ("crate", "crates", "bolts"),
    ("box", "boxes", "pens"),
    ("bag", "bags", "coins"),
    ("truck", "trucks", "bricks"),
    ("shelf", "shelves", "books"),
    ("jar", "jars", "beads"),
    ("tray", "trays", "cups"),
    ("sack", "sacks", "apples"),
)
_ADD = ("{n} more {items} arrive.", "{n} {items} are added.")
_SUB = ("{n} {items} are sold.", "{n} {items} are lost.")
_QUESTION_LEFT = "How many {items} are left?"  # after something was sold or lost
_QUESTION_NOW = "How many {items} are there now?"


# ----------------------------------------------------------------------------------------------
# Calculator tool


class CalculatorError(ValueError):
    """The expression is not allowed or cannot be evaluated; the message is shown to the model."""


@dataclass(frozen=True, slots=True)
class CalculatorLimits:
    """Safety limits of :class:`Calculator`.

    ``max_chars``: longest accepted expression; ``max_digits``: largest magnitude of any
    intermediate value, in decimal digits; ``max_exponent``: largest accepted ``**`` exponent.
    """

    max_chars: int
    max_digits: int
    max_exponent: int


_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)


def _too_big(x: Fraction, max_digits: int) -> bool:
    bound = 10**max_digits
    return abs(x.numerator) >= bound * x.denominator or x.denominator >= bound


def _power(base: Fraction, exp: Fraction, limits: CalculatorLimits) -> Fraction:
    if exp.denominator != 1:
        raise CalculatorError("exponents must be integers")
    e = exp.numerator
    if abs(e) > limits.max_exponent:
        raise CalculatorError(f"exponent {e} is too large (limit {limits.max_exponent})")
    if base == 0 and e < 0:
        raise CalculatorError("division by zero")
    return base**e


def _eval_node(node: ast.AST, limits: CalculatorLimits) -> Fraction:
    """Evaluate one node of an arithmetic expression tree exactly."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        value = Fraction(node.value)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = _eval_node(node.operand, limits)
        value = -inner if isinstance(node.op, ast.USub) else inner
    elif isinstance(node, ast.BinOp) and isinstance(node.op, _BINOPS):
        a, b = _eval_node(node.left, limits), _eval_node(node.right, limits)
        if isinstance(node.op, ast.Add):
            value = a + b
        elif isinstance(node.op, ast.Sub):
            value = a - b
        elif isinstance(node.op, ast.Mult):
            value = a * b
        elif isinstance(node.op, ast.Div):
            if b == 0:
                raise CalculatorError("division by zero")
            value = a / b
        else:
            value = _power(a, b, limits)
    else:
        raise CalculatorError("only integers, + - * / ** and parentheses are allowed")
    if _too_big(value, limits.max_digits):
        raise CalculatorError(f"a value exceeds {limits.max_digits} digits")
    return value


def format_number(x: Fraction) -> str:
    """An exact integer as digits; any other value as a decimal with at most 6 places."""
    if x.denominator == 1:
        return str(x.numerator)
    text = f"{float(x):.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def evaluate_expression(expression: str, limits: CalculatorLimits) -> Fraction:
    """Safely evaluate ``expression`` (integers, ``+ - * / **``, parentheses) exactly.

    Raises :class:`CalculatorError` naming the problem; never executes anything but arithmetic.
    """
    if not isinstance(expression, str):
        raise CalculatorError("expression must be a string")
    text = expression.strip()
    if not text:
        raise CalculatorError("expression is empty")
    if len(text) > limits.max_chars:
        raise CalculatorError(f"expression is longer than {limits.max_chars} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        raise CalculatorError("invalid syntax") from None
    try:
        return _eval_node(tree.body, limits)
    except RecursionError:
        raise CalculatorError("expression is nested too deeply") from None


class Calculator:
    """The ``calculator`` tool: evaluates an arithmetic expression; errors come back as text."""

    name = "calculator"
    description = "Evaluate an arithmetic expression."
    parameters: dict[str, Any] = {  # noqa: RUF012 (the Tool protocol declares an attribute)
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
    }

    def __init__(self, limits: CalculatorLimits) -> None:
        self.limits = limits

    def __call__(self, **arguments: Any) -> str:
        extra = sorted(set(arguments) - {"expression"})
        if extra or "expression" not in arguments:
            return "error: calculator takes exactly one argument, 'expression'"
        try:
            return format_number(evaluate_expression(arguments["expression"], self.limits))
        except CalculatorError as e:
            return f"error: {e}"


# ----------------------------------------------------------------------------------------------
# Problem generator


@dataclass(frozen=True, slots=True)
class Problem:
    """One generated problem: its text, the expression that solves it, and the answer."""

    text: str
    expression: str
    answer: int


def problem_split(expression: str) -> str:
    """The split a problem belongs to, from the SHA-256 of its canonical key."""
    digest = hashlib.sha256(expression.encode()).digest()
    return "test" if digest[0] % HELD_OUT_BUCKETS == 0 else "train"


def _digits(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    n = rng.randint(lo_digits, hi_digits)
    return rng.randint(10 ** (n - 1), 10**n - 1)


SMALL_DIFFICULTY = 2  # up to this difficulty every number of a problem is below SMALL_LIMIT
SMALL_LIMIT = 1000  # ... so each is one token of the built-in tokenizer (3-digit chunks)


def _draw_problem(rng: random.Random, difficulty: int, small: bool) -> tuple[Problem, int]:
    """One problem and the largest value (operand, intermediate or answer) it involves."""
    one, many, items = rng.choice(_STORIES)
    big = 3 if small else 4  # additive operand digits grow with difficulty
    sentences: list[str] = []
    ops = difficulty
    if rng.random() < 0.5:  # leading product
        a = _digits(rng, 1, 2) if small else _digits(rng, 2, 3)
        b = _digits(rng, 2, 2) if small else _digits(rng, 2, 3)
        sentences.append(f"{a} {many} hold {b} {items} each.")
        expression, value, ops = f"{a}*{b}", a * b, ops - 1
    else:
        a = _digits(rng, big, big) if small else _digits(rng, big, big + 1)
        sentences.append(f"A {one} holds {a} {items}.")
        expression, value = str(a), a
    largest = max(a, value)
    for _ in range(ops):
        n = _digits(rng, 2, 2 if small else big)
        if value > n and rng.random() < 0.5:
            sentences.append(rng.choice(_SUB).format(n=n, items=items))
            expression, value = f"{expression}-{n}", value - n
        else:
            sentences.append(rng.choice(_ADD).format(n=n, items=items))
            expression, value = f"{expression}+{n}", value + n
        largest = max(largest, n, value)
    question = _QUESTION_LEFT if "-" in expression else _QUESTION_NOW
    sentences.append(question.format(items=items))
    return Problem(text=" ".join(sentences), expression=expression, answer=value), largest


def generate_problem(rng: random.Random, difficulty: int) -> Problem:
    """A random problem with ``difficulty`` operations; the answer is always a positive integer.

    Up to ``SMALL_DIFFICULTY`` every number involved is below ``SMALL_LIMIT`` (drawn again until
    it is); above it, operands have up to four digits. The answer never equals the problem's first
    number (e.g. ``302+15-15`` is drawn again), so copying that number is always wrong.
    """
    if not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be in 1..{MAX_DIFFICULTY}, got {difficulty}")
    small = difficulty <= SMALL_DIFFICULTY
    while True:
        problem, largest = _draw_problem(rng, difficulty, small)
        first = int(problem.expression.split("*")[0].split("+")[0].split("-")[0])
        if (not small or largest < SMALL_LIMIT) and problem.answer != first:
            return problem


def generate_tasks(split: str, n: int, seed: int, difficulty: int) -> list[Task]:
    """``n`` distinct tasks of ``split``, deterministic in (split, seed, difficulty)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"arithmetic:{split}:{seed}:{difficulty}")
    tasks: list[Task] = []
    seen: set[str] = set()
    attempts = 0
    while len(tasks) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not generate {n} distinct {split} tasks")
        p = generate_problem(rng, difficulty)
        if p.expression in seen or problem_split(p.expression) != split:
            continue
        seen.add(p.expression)
        key = hashlib.sha256(p.expression.encode()).hexdigest()[:12]
        meta = {"expression": p.expression, "difficulty": difficulty, "split": split}
        tasks.append(Task(task_id=f"arith-{key}", prompt=p.text, answer=str(p.answer), meta=meta))
    return tasks


# ----------------------------------------------------------------------------------------------
# Task source

CALCULATOR_LIMITS = CalculatorLimits(max_chars=200, max_digits=40, max_exponent=64)
MAX_CALLS_PER_TURN = 1  # one tool call per assistant turn, as in the reference (§8.4)


@dataclass(frozen=True, slots=True)
class ArithmeticParams:
    """``difficulty``: number of operations (1-5); the rest configures the env's tool handling."""

    difficulty: int
    tool_timeout_s: float
    max_calls_per_turn: int
    max_observation_chars: int

    def __post_init__(self) -> None:
        if not 1 <= self.difficulty <= MAX_DIFFICULTY:
            raise ValueError(f"difficulty must be in 1..{MAX_DIFFICULTY}, got {self.difficulty}")
        check_tool_limits(self.tool_timeout_s, self.max_observation_chars)
        if self.max_calls_per_turn < 1:
            raise ValueError(f"max_calls_per_turn must be >= 1, got {self.max_calls_per_turn}")


class ArithmeticTasks:
    """The ``arithmetic`` :class:`~spear.envs.base.TaskSource`."""

    name = "arithmetic"

    def __init__(self, params: ArithmeticParams, parser: str = NATIVE_PARSER) -> None:
        self.params = params
        self.parser = parser  # a spear.rollout.parsers name: how make_env's env reads calls
        self._calculator = Calculator(CALCULATOR_LIMITS)

    @staticmethod
    def params_from_config(cfg: Config) -> ArithmeticParams:
        return ArithmeticParams(
            difficulty=cfg.task.difficulty,
            tool_timeout_s=cfg.rollout.tool_timeout_s,
            max_calls_per_turn=MAX_CALLS_PER_TURN,
            max_observation_chars=cfg.rollout.max_observation_chars,
        )

    @classmethod
    def from_config(cls, cfg: Config) -> ArithmeticTasks:
        return cls(cls.params_from_config(cfg), cfg.rollout.parser or NATIVE_PARSER)

    def tasks(self, split: str, n: int, seed: int) -> list[Task]:
        return generate_tasks(split, n, seed, self.params.difficulty)

    def tools(self) -> list[Tool]:
        return [self._calculator]

    def make_env(self) -> Env:
        return boxed_number_env(
            self.tools(),
            self.parser,
            system_prompt=SYSTEM_PROMPT,
            tool_timeout_s=self.params.tool_timeout_s,
            max_calls_per_turn=self.params.max_calls_per_turn,
            max_observation_chars=self.params.max_observation_chars,
        )
