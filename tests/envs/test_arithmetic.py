import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spear.envs.arithmetic import (
    CALCULATOR_LIMITS,
    ArithmeticParams,
    ArithmeticTasks,
    Calculator,
    CalculatorError,
    CalculatorLimits,
    evaluate_expression,
    format_number,
    generate_problem,
    generate_tasks,
    problem_split,
)
from spear.envs.base import TaskSource

LIMITS = CalculatorLimits(max_chars=60, max_digits=12, max_exponent=16)


def params(difficulty: int = 2) -> ArithmeticParams:
    return ArithmeticParams(
        difficulty=difficulty, tool_timeout_s=1.0, max_calls_per_turn=1, max_observation_chars=64
    )


# ---------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("37*482-915", "16919"),  # 37*482 = 17834; 17834-915 = 16919
        ("(2+3)*4", "20"),
        ("2+3*4", "14"),  # precedence: 3*4 first
        ("-7+2", "-5"),
        ("12/4", "3"),  # exact division stays an integer
        ("1/3", "0.333333"),  # otherwise 6 decimals
        ("10/4", "2.5"),  # trailing zeros stripped
        ("2**10", "1024"),
        ("2**-2", "0.25"),
        (" 4821 * 37 ", "178377"),  # 4821*37 = 144630+33747 = 178377
    ],
)
def test_calculator_values(expr: str, expected: str) -> None:
    assert Calculator(LIMITS)(expression=expr) == expected


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("__import__('os').system('echo hi')", "only integers"),
        ("open('/etc/passwd')", "only integers"),
        ("(1).__class__", "only integers"),
        ("[1, 2]", "only integers"),
        ("1.5*2", "only integers"),
        ("True+1", "only integers"),
        ("2**100000000", "exponent"),
        ("9**9**9", "exponent"),
        ("10**8*10**8", "exceeds 12 digits"),  # 10**16 has 17 digits > 12
        ("1/0", "division by zero"),
        ("0**-1", "division by zero"),
        ("2**(1/2)", "integers"),
        ("1+", "invalid syntax"),
        ("", "empty"),
        ("1+" * 40 + "1", "longer than 60"),
    ],
)
def test_calculator_rejects(expr: str, fragment: str) -> None:
    out = Calculator(LIMITS)(expression=expr)
    assert out.startswith("error:")
    assert fragment in out
    with pytest.raises(CalculatorError):
        evaluate_expression(expr, LIMITS)


def test_calculator_argument_errors_are_text() -> None:
    calc = Calculator(LIMITS)
    assert calc().startswith("error:")
    assert calc(expression="1", extra=2).startswith("error:")
    assert calc(expression=5).startswith("error:")  # not a string


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**6), 10**6), st.integers(-(10**6), 10**6), st.sampled_from("+-*"))
def test_calculator_matches_python_on_integers(a: int, b: int, op: str) -> None:
    expected = {"+": a + b, "-": a - b, "*": a * b}[op]
    assert Calculator(CALCULATOR_LIMITS)(expression=f"({a}){op}({b})") == str(expected)


def test_format_number() -> None:
    assert format_number(Fraction(-3, 1)) == "-3"
    assert format_number(Fraction(-1, 10**9)) == "0"  # rounds to -0.000000 -> "0"
    assert format_number(Fraction(7, 8)) == "0.875"


# ---------------------------------------------------------------- generator and splits


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_problem_expression_solves_problem(difficulty: int) -> None:
    rng = random.Random(difficulty)
    for _ in range(200):
        p = generate_problem(rng, difficulty)
        assert evaluate_expression(p.expression, CALCULATOR_LIMITS) == p.answer
        assert p.answer > 0
        assert (
            p.expression.count("+") + p.expression.count("-") + p.expression.count("*")
            == difficulty
        )
        numbers = [
            int(x)
            for x in p.expression.replace("*", " ").replace("+", " ").replace("-", " ").split()
        ]
        text_numbers = [int(w.strip(".")) for w in p.text.split() if w.strip(".").isdigit()]
        assert numbers == text_numbers  # operands appear in the text in expression order


def test_tasks_deterministic_and_seeded() -> None:
    a = generate_tasks("train", 50, seed=3, difficulty=2)
    b = generate_tasks("train", 50, seed=3, difficulty=2)
    c = generate_tasks("train", 50, seed=4, difficulty=2)
    assert a == b
    assert [t.task_id for t in a] != [t.task_id for t in c]
    assert len({t.task_id for t in a}) == 50  # distinct within a call


def test_splits_never_overlap() -> None:
    train = {t.meta["expression"] for s in range(3) for t in generate_tasks("train", 400, s, 1)}
    test = {t.meta["expression"] for s in range(3) for t in generate_tasks("test", 400, s, 1)}
    assert train and test
    assert not train & test
    assert all(problem_split(e) == "test" for e in test)
    assert all(problem_split(e) == "train" for e in train)


def test_split_and_difficulty_validation() -> None:
    with pytest.raises(ValueError, match="split"):
        generate_tasks("valid", 1, 0, 2)
    with pytest.raises(ValueError, match="difficulty"):
        generate_tasks("train", 1, 0, 6)
    with pytest.raises(ValueError, match="difficulty"):
        params(difficulty=0)
    with pytest.raises(ValueError, match="max_calls_per_turn"):
        ArithmeticParams(
            difficulty=1, tool_timeout_s=1.0, max_calls_per_turn=0, max_observation_chars=5
        )


def test_difficulty_grows_answer_size() -> None:
    small = generate_tasks("train", 200, 0, 1)
    large = generate_tasks("train", 200, 0, 5)
    mean = lambda ts: sum(len(t.answer or "") for t in ts) / len(ts)  # noqa: E731
    assert mean(large) > mean(small)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_generation_is_cheap(monkeypatch: pytest.MonkeyPatch, difficulty: int) -> None:
    # counted, not timed: problems drawn per task kept (redraws for the small-number rule, the
    # first-number rule, duplicates and the other split). Deterministic in the seed; today
    # 1.1-1.8 per train task and 7-11 per test task (1 in HELD_OUT_BUCKETS problems is test)
    import spear.envs.arithmetic as arithmetic

    draws = 0
    real = arithmetic._draw_problem

    def counted(*args: object) -> object:
        nonlocal draws
        draws += 1
        return real(*args)

    monkeypatch.setattr(arithmetic, "_draw_problem", counted)
    assert len(generate_tasks("train", 3000, 0, difficulty)) == 3000
    assert draws <= 2.5 * 3000
    draws = 0
    assert len(generate_tasks("test", 300, 0, difficulty)) == 300
    assert draws <= 2 * arithmetic.HELD_OUT_BUCKETS * 300


def test_source_protocol_and_tools() -> None:
    src = ArithmeticTasks(params())
    assert isinstance(src, TaskSource)
    assert src.name == "arithmetic"
    assert [t.name for t in src.tools()] == ["calculator"]
    assert src.tasks("test", 5, 1) == generate_tasks("test", 5, 1, 2)


def test_rollout_parser_is_the_env_parser() -> None:
    # rollout.parser was never read (the env hard-coded hermes); None keeps the task's own format
    from spear.config import load_config
    from spear.rollout.parsers import PARSERS

    for override, name in [([], "hermes"), (["rollout.parser=python"], "python")]:
        env = ArithmeticTasks.from_config(load_config(overrides=override)).make_env()
        assert env.parser is PARSERS.get(name)  # type: ignore[attr-defined]
    env = ArithmeticTasks.from_config(load_config(overrides=["rollout.parser=python"])).make_env()
    env.reset(generate_tasks("train", 1, 0, 2)[0])
    step = env.step("```python\nprint(1)\n```")  # a call of tool 'python', which is not offered
    assert step.info["invalid_tool_calls"] + step.info["tool_errors"] >= 1
    assert not step.terminated  # read as a call, not as a final answer (hermes would end here)
