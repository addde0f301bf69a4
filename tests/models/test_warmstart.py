"""Warm start: demo kinds and scripts, loss mask, NLL, LR schedule, params and the on-disk cache.

Every expected number below is derived by hand in a comment next to it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spear.models.warmstart as ws
from spear.config import load_config
from spear.envs.arithmetic import (
    CALCULATOR_LIMITS,
    ArithmeticTasks,
    evaluate_expression,
    generate_problem,
    generate_tasks,
)
from spear.envs.base import StepResult, Task, tool_schema
from spear.models.arithmetic_demos import (
    DemoKind,
    boxed,
    corrupt_expression,
    demo_kinds,
    make_demos,
    malformed_call_text,
    naive_guess,
    play_demo,
    tool_call_text,
)
from spear.models.tokenizer import IM_END, Conversation, train_tokenizer
from spear.models.warmstart import (
    REPORT_FILE,
    WarmStartParams,
    encode_with_mask,
    ensure_warm_model,
    lr_factor,
    masked_nll,
)
from spear.rollout.parsers import PARSERS, ToolCall

T, G, B = DemoKind.TOOL, DemoKind.GUESS, DemoKind.BAD_CALL

SMALL = [
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.warm_start.num_demos=40",
    "model.warm_start.steps=3",
    "model.warm_start.batch_size=8",
]


@pytest.fixture(scope="module")
def params() -> WarmStartParams:
    return WarmStartParams.from_config(load_config(overrides=SMALL))


@pytest.fixture(scope="module")
def source(params: WarmStartParams) -> ArithmeticTasks:
    return ArithmeticTasks(params.task)


def _value(expression: str) -> str:
    return str(evaluate_expression(expression, CALCULATOR_LIMITS))


# ----------------------------------------------------------------------------------------------
# demo_kinds


@pytest.mark.parametrize(
    ("n", "fracs", "counts"),
    [
        # raw 3.5, 5.5, 1.0 -> floors 3, 5, 1 (sum 9) -> 1 left over; remainders 0.5, 0.5, 0.0
        # tie: the sort is stable (reverse=True keeps equal keys in order), so tool gets it.
        (10, (0.35, 0.55, 0.10), (4, 5, 1)),
        # raw 3.4, 5.6, 1.0 -> floors 3, 5, 1 -> 1 left over -> largest remainder 0.6 (guess)
        (10, (0.34, 0.56, 0.10), (3, 6, 1)),
        # raw 1.5, 1.5, 7.0 -> floors 1, 1, 7 -> 1 left over -> tie 0.5/0.5 -> tool (first)
        (10, (0.15, 0.15, 0.70), (2, 1, 7)),
        # raw 7/3 each -> floors 2, 2, 2 -> 1 left over -> equal remainders -> tool
        (7, (1 / 3, 1 / 3, 1 / 3), (3, 2, 2)),
        # raw 1.5, 1.5, 0 -> floors 1, 1, 0 -> 1 left over -> tool; bad_call stays 0
        (3, (0.5, 0.5, 0.0), (2, 1, 0)),
        # exact: raw 35, 55, 10 -> nothing left over
        (100, (0.35, 0.55, 0.10), (35, 55, 10)),
        # one kind only
        (5, (0.0, 1.0, 0.0), (0, 5, 0)),
        # n=1, raw 0.35, 0.55, 0.10 -> floors 0, 0, 0 -> the one goes to guess (0.55)
        (1, (0.35, 0.55, 0.10), (0, 1, 0)),
    ],
)
def test_demo_kinds_exact_counts(n: int, fracs: tuple[float, ...], counts: tuple[int, ...]) -> None:
    got = Counter(demo_kinds(n, fracs, random.Random(0)))
    assert (got[T], got[G], got[B]) == counts


def test_demo_kinds_is_the_grouped_list_shuffled_by_the_rng() -> None:
    # counts (4, 5, 1) as derived above; the order is exactly rng.shuffle of the grouped list.
    expected = [T] * 4 + [G] * 5 + [B]
    random.Random(123).shuffle(expected)
    assert demo_kinds(10, (0.35, 0.55, 0.10), random.Random(123)) == expected
    a = demo_kinds(60, (0.35, 0.55, 0.10), random.Random(1))
    assert a == demo_kinds(60, (0.35, 0.55, 0.10), random.Random(1))
    assert a != demo_kinds(60, (0.35, 0.55, 0.10), random.Random(2))  # 60!/(21!33!6!) orders
    assert a != sorted(a, key=list(DemoKind).index)  # actually shuffled, not grouped


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 5000),
    w=st.lists(st.integers(0, 1000), min_size=3, max_size=3).filter(lambda w: sum(w) > 0),
)
def test_demo_kinds_counts_sum_to_n_and_are_within_one(n: int, w: list[int]) -> None:
    fracs = [x / sum(w) for x in w]
    got = Counter(demo_kinds(n, fracs, random.Random(0)))
    counts = [got[k] for k in DemoKind]
    assert sum(counts) == n
    for c, f in zip(counts, fracs):
        assert n * f - 1 < c < n * f + 1  # floor(n f) or floor(n f) + 1
        if f == 0:
            assert c == 0


# ----------------------------------------------------------------------------------------------
# naive_guess, corrupt_expression, malformed_call_text


def test_naive_guess_is_the_first_number() -> None:
    assert naive_guess("37*482-915") == "37"
    assert naive_guess("4000+12-7") == "4000"
    assert naive_guess("5") == "5"


def test_naive_guess_is_the_first_number_of_the_problem_text() -> None:
    for d in range(1, 6):
        for task in generate_tasks("train", 50, 0, d):
            first_in_text = re.findall(r"\d+", task.prompt)[0]
            assert naive_guess(str(task.meta["expression"])) == first_in_text


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_naive_guess_is_never_the_answer(difficulty: int) -> None:
    # The module docstring promises guess demos are always wrong. 20,000 draws per difficulty.
    rng = random.Random(f"naive:{difficulty}")
    right = []
    for _ in range(20_000):
        p = generate_problem(rng, difficulty)
        if naive_guess(p.expression) == str(p.answer):
            right.append(p.expression)
    assert right == [], f"{len(right)} problems whose first number is the answer, e.g. {right[:3]}"


def test_corrupt_expression_changes_one_non_leading_digit_and_the_result() -> None:
    rng = random.Random(0)
    n_checked = 0
    for d in range(1, 6):
        for task in generate_tasks("train", 100, 0, d):
            expr = str(task.meta["expression"])
            bad = corrupt_expression(expr, rng)
            assert len(bad) == len(expr)
            diff = [i for i, (a, b) in enumerate(zip(expr, bad)) if a != b]
            assert len(diff) == 1
            (i,) = diff
            assert expr[i].isdigit() and bad[i].isdigit()
            assert i > 0 and expr[i - 1].isdigit()  # never the leading digit of a number
            assert _value(bad) != _value(expr)
            n_checked += 1
    assert n_checked == 500


def test_corrupt_expression_is_deterministic_and_hits_every_inner_digit() -> None:
    # "12*345": inner (non-leading) digits are at positions 1 ('2'), 4 ('4') and 5 ('5').
    outs = {corrupt_expression("12*345", random.Random(s)) for s in range(200)}
    spots = {next(i for i, (a, b) in enumerate(zip("12*345", o)) if a != b) for o in outs}
    assert spots == {1, 4, 5}
    assert corrupt_expression("12*345", random.Random(9)) == corrupt_expression(
        "12*345", random.Random(9)
    )


def test_corrupt_expression_without_inner_digits_appends_plus_one() -> None:
    # no multi-digit number: nothing to corrupt in place, so "+1" is appended (7+5=12 -> 13)
    assert corrupt_expression("7+5", random.Random(0)) == "7+5+1"
    assert _value("7+5+1") == "13"


def test_malformed_call_text_is_invalid_or_names_an_unknown_tool() -> None:
    parse = PARSERS.get("hermes")
    rng = random.Random(0)
    variants = Counter()
    for task in generate_tasks("train", 60, 0, 3):
        parsed = parse(malformed_call_text(str(task.meta["expression"]), rng))
        assert not parsed.is_final  # a call was attempted
        if parsed.invalid:
            assert not parsed.calls
            variants["invalid"] += 1
        else:
            assert [c.name for c in parsed.calls] == ["calc"]  # not "calculator"
            variants["unknown"] += 1
    assert variants["invalid"] > 10 and variants["unknown"] > 10  # both variants, about half each


def test_tool_call_text_parses_back() -> None:
    parsed = PARSERS.get("hermes")(tool_call_text("calculator", {"expression": "1+2"}))
    assert parsed.calls == (ToolCall("calculator", {"expression": "1+2"}),)
    assert boxed("42") == "\\boxed{42}"


# ----------------------------------------------------------------------------------------------
# play_demo


class RecordingEnv:
    """The real env, keeping every StepResult so the test can read rewards and success."""

    def __init__(self, env: Any) -> None:
        self.env, self.results = env, []

    def reset(self, task: Task, *, seed: int | None = None) -> Any:
        self.results = []
        return self.env.reset(task, seed=seed)

    def step(self, text: str) -> StepResult:
        result = self.env.step(text)
        self.results.append(result)
        return result

    def close(self) -> None:
        self.env.close()


def _roles(messages: list[Any]) -> list[str]:
    return [m["role"] for m in messages]


@pytest.fixture(scope="module")
def demo_tasks() -> list[Task]:
    return generate_tasks("train", 10, 0, 2) + generate_tasks("train", 10, 0, 4)


def test_play_demo_tool(source: ArithmeticTasks, demo_tasks: list[Task]) -> None:
    env = RecordingEnv(source.make_env())
    for task in demo_tasks:
        msgs = play_demo(env, task, DemoKind.TOOL, random.Random(0), alt=False)
        assert _roles(msgs) == ["system", "user", "assistant", "tool", "assistant"]
        assert msgs[1]["content"] == task.prompt
        call = PARSERS.get("hermes")(msgs[2]["content"]).calls
        assert call == (ToolCall("calculator", {"expression": task.meta["expression"]}),)
        assert msgs[3]["content"] == task.answer  # the calculator's result
        assert msgs[4]["content"] == f"\\boxed{{{task.answer}}}"
        first, last = env.results
        assert not first.terminated and first.info["tool_calls"] == 1
        assert last.terminated and last.info["success"] is True and last.reward == 1.0


def test_play_demo_guess(source: ArithmeticTasks, demo_tasks: list[Task]) -> None:
    env = RecordingEnv(source.make_env())
    for task in demo_tasks:
        msgs = play_demo(env, task, DemoKind.GUESS, random.Random(0), alt=False)
        assert _roles(msgs) == ["system", "user", "assistant"]
        guess = naive_guess(str(task.meta["expression"]))
        assert msgs[2]["content"] == f"\\boxed{{{guess}}}"
        (only,) = env.results
        assert only.terminated and only.info["success"] is False and only.reward == 0.0


def test_play_demo_bad_call_malformed(source: ArithmeticTasks, demo_tasks: list[Task]) -> None:
    env = RecordingEnv(source.make_env())
    for task in demo_tasks:
        msgs = play_demo(env, task, DemoKind.BAD_CALL, random.Random(0), alt=True)
        assert _roles(msgs) == ["system", "user", "assistant", "tool", "assistant"]
        assert msgs[3]["content"].startswith("error:")
        guess = naive_guess(str(task.meta["expression"]))
        assert msgs[4]["content"] == f"\\boxed{{{guess}}}"
        first, last = env.results
        assert first.info["invalid_tool_calls"] == 1 and first.info["tool_calls"] == 0
        assert last.terminated and last.info["success"] is False


def test_play_demo_bad_call_corrupted(source: ArithmeticTasks, demo_tasks: list[Task]) -> None:
    env = RecordingEnv(source.make_env())
    for task in demo_tasks:
        msgs = play_demo(env, task, DemoKind.BAD_CALL, random.Random(0), alt=False)
        assert _roles(msgs) == ["system", "user", "assistant", "tool", "assistant"]
        (call,) = PARSERS.get("hermes")(msgs[2]["content"]).calls
        bad_expr = call.arguments["expression"]
        assert call.name == "calculator" and bad_expr != task.meta["expression"]
        assert msgs[3]["content"] == _value(bad_expr) != task.answer  # the tool really ran it
        assert msgs[4]["content"] == f"\\boxed{{{_value(bad_expr)}}}"
        first, last = env.results
        assert first.info["tool_calls"] == 1
        assert last.terminated and last.info["success"] is False


def test_make_demos_proportions_alternation_and_determinism(
    source: ArithmeticTasks, params: WarmStartParams
) -> None:
    demos = make_demos(source, params, seed=0)
    tasks = source.tasks("train", params.num_demos, 0)
    assert len(demos) == 40
    kinds = []
    for conv, task in zip(demos, tasks):
        assert conv.tools == [tool_schema(t) for t in source.tools()]
        assert conv.messages[1]["content"] == task.prompt
        if len(conv.messages) == 3:
            kinds.append("guess")
        elif conv.messages[3]["content"].startswith("error:"):
            kinds.append("malformed")
        elif conv.messages[4]["content"] == boxed(task.answer):
            kinds.append("tool")
        else:
            kinds.append("corrupted")
    # 40 x (0.35, 0.55, 0.10) = 14, 22, 4 exactly; bad calls alternate malformed (first) and
    # corrupted, so 2 of each.
    assert Counter(kinds) == {"tool": 14, "guess": 22, "malformed": 2, "corrupted": 2}
    bad = [k for k in kinds if k in ("malformed", "corrupted")]
    assert bad == ["malformed", "corrupted", "malformed", "corrupted"]
    assert [c.messages for c in make_demos(source, params, seed=0)] == [c.messages for c in demos]
    assert [c.messages for c in make_demos(source, params, seed=1)] != [c.messages for c in demos]


# ----------------------------------------------------------------------------------------------
# encode_with_mask


@pytest.fixture(scope="module")
def demos_and_tok(source: ArithmeticTasks, params: WarmStartParams) -> tuple[list[Any], Any]:
    demos = make_demos(source, params, seed=0)
    return demos, train_tokenizer(demos, params.tokenizer)


def _spans(mask: torch.Tensor) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate([*mask.tolist(), False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_encode_with_mask_covers_exactly_the_assistant_turns(demos_and_tok: Any) -> None:
    demos, tok = demos_and_tok
    for conv in demos:
        ids, mask = encode_with_mask(tok, conv)
        assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
        assert not mask[0]
        spans = _spans(mask)
        expected = [m["content"] + IM_END for m in conv.messages if m["role"] == "assistant"]
        assert [tok.decode(ids[a:b]) for a, b in spans] == expected
        # each span ends on the end-of-turn token, and the "\n" after it is not masked
        assert all(int(ids[b - 1]) == tok.eos_token_id for _, b in spans)
        # everything outside the spans decodes to the non-assistant rest of the rendering
        assert int(mask.sum()) == sum(b - a for a, b in spans)
        full = tok.decode(ids)
        rest = tok.decode(ids[~mask])
        assert len(rest) == len(full) - sum(len(e) for e in expected)


def test_encode_with_mask_hand_made_conversation(demos_and_tok: Any) -> None:
    _, tok = demos_and_tok
    conv = Conversation(
        [
            {"role": "user", "content": "A box holds 12 pens."},
            {"role": "assistant", "content": "\\boxed{12}"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "\\boxed{13}"},
        ],
        None,
    )
    ids, mask = encode_with_mask(tok, conv)
    # rendering: user block, "<|im_start|>assistant\n" (unmasked) + "\boxed{12}<|im_end|>"
    # (masked) + "\n" (unmasked), and the same again for the second exchange.
    masked = [tok.decode(ids[a:b]) for a, b in _spans(mask)]
    assert masked == ["\\boxed{12}<|im_end|>", "\\boxed{13}<|im_end|>"]
    unmasked = tok.decode(ids[~mask])
    assert unmasked == (
        "<|im_start|>user\nA box holds 12 pens.<|im_end|>\n<|im_start|>assistant\n\n"
        "<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n\n"
    )


def test_encode_with_mask_no_assistant_turn_masks_nothing(demos_and_tok: Any) -> None:
    _, tok = demos_and_tok
    ids, mask = encode_with_mask(tok, Conversation([{"role": "user", "content": "hi"}], None))
    assert ids.numel() > 0 and not mask.any()


# ----------------------------------------------------------------------------------------------
# masked_nll


def test_masked_nll_uniform_logits_is_log_v() -> None:
    # uniform logits over V=4: every token has p = 1/4, so the NLL is ln 4 per masked token.
    logits = torch.zeros(2, 5, 4)
    ids = torch.tensor([[0, 1, 2, 3, 0], [3, 3, 3, 3, 3]])
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert masked_nll(logits, ids, mask).item() == pytest.approx(math.log(4))


def test_masked_nll_hand_value_is_a_token_mean() -> None:
    # V=4. Sequence 0: uniform logits, both targets masked: ln 4 each.
    # Sequence 1: logits [0, 0, ln 2, 0] -> softmax = (1, 1, 2, 1) / 5; target token 2 -> p=2/5,
    # NLL ln(5/2), one masked target. Its last position predicts nothing and is ignored (+100).
    # Token mean: (2 ln 4 + ln 2.5) / 3 (a sequence mean would be (ln 4 + ln 2.5) / 2).
    logits = torch.zeros(2, 3, 4)
    logits[1, 0] = torch.tensor([0.0, 0.0, math.log(2), 0.0])
    logits[1, 2] = 100.0
    ids = torch.tensor([[1, 2, 3], [0, 2, 1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)  # position 0 never counts
    expected = (2 * math.log(4) + math.log(2.5)) / 3
    assert masked_nll(logits, ids, mask).item() == pytest.approx(expected, rel=1e-6)
    # target 0 at the same position: p = 1/5 -> ln 5
    one = masked_nll(logits[1:], torch.tensor([[0, 0, 1]]), torch.tensor([[0, 1, 0]]).bool())
    assert one.item() == pytest.approx(math.log(5), rel=1e-6)


def test_masked_nll_without_masked_tokens_is_zero_with_zero_grad() -> None:
    logits = torch.randn(2, 4, 5, requires_grad=True)
    ids = torch.randint(0, 5, (2, 4))
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[:, 0] = True  # position 0 is never a target, so still nothing counts
    loss = masked_nll(logits, ids, mask)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


# ----------------------------------------------------------------------------------------------
# lr_factor


@pytest.mark.parametrize(
    ("step", "total", "value"),
    [
        # total 40: warm = round(0.05 * 40) = 2 -> steps 0, 1 give 1/2, 2/2
        (0, 40, 0.5),
        (1, 40, 1.0),
        # then frac = (step - 2) / 38: step 2 -> cos 0 -> 1; step 21 -> frac 1/2 -> 0.5
        (2, 40, 1.0),
        (21, 40, 0.5),
        # step 40 (and beyond) -> frac 1 (clamped) -> 0.5 * (1 + cos pi) = 0
        (40, 40, 0.0),
        (55, 40, 0.0),
        # total 200: warm = 10; step 4 -> 5/10
        (4, 200, 0.5),
        # total 10: round(0.5) = 0 -> warm = max(1, 0) = 1 -> step 0 is already 1/1
        (0, 10, 1.0),
        # total 0 (no steps): warm 1, step 0 -> 1
        (0, 0, 1.0),
    ],
)
def test_lr_factor_hand_values(step: int, total: int, value: float) -> None:
    assert lr_factor(step, total) == pytest.approx(value, abs=1e-12)


def test_lr_factor_cosine_third_and_shape() -> None:
    # total 320: warm 16, decay over 304; frac 1/4 at step 16 + 76 = 92 -> 0.5*(1+cos(pi/4))
    assert lr_factor(92, 320) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))
    vals = [lr_factor(s, 320) for s in range(320)]
    assert vals[:16] == pytest.approx([(s + 1) / 16 for s in range(16)])  # linear warm-up
    assert all(a >= b for a, b in itertools.pairwise(vals[15:]))  # then non-increasing
    assert 0 < vals[-1] < 1e-3  # ends near 0


# ----------------------------------------------------------------------------------------------
# WarmStartParams


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"frac_tool": 0.5}, "sum to 1"),  # 0.5 + 0.55 + 0.1 = 1.15
        ({"frac_tool": 0.3}, "sum to 1"),  # 0.3 + 0.55 + 0.1 = 0.95
        ({"frac_tool": 0.55, "frac_bad_call": -0.1}, ">= 0"),  # sums to 1, but one is < 0
        ({"steps": -1}, "steps must be >= 0"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -1e-3}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be > 0"),
        ({"num_demos": 0}, "num_demos must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_params_validation(params: WarmStartParams, change: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(params, **change)


def test_params_accepts_zero_steps_and_float_noise(params: WarmStartParams) -> None:
    assert dataclasses.replace(params, steps=0).steps == 0
    p = dataclasses.replace(params, frac_tool=0.6, frac_guess=0.3, frac_bad_call=0.1)
    assert (
        p.frac_tool + p.frac_guess + p.frac_bad_call != 1.0
    )  # 0.6 + 0.3 + 0.1 = 0.9999999999999999
    assert abs(p.frac_tool + p.frac_guess + p.frac_bad_call - 1.0) < 1e-6


def test_params_from_config(params: WarmStartParams) -> None:
    assert params.model.hidden_size == 32 and params.model.num_layers == 1
    assert params.model.num_heads == 2 and params.model.intermediate_size == 64
    assert (params.num_demos, params.steps, params.batch_size) == (40, 3, 8)
    assert params.tokenizer.vocab_size == 1024 and params.task.difficulty == 2  # defaults


def test_cache_key_stable_and_sensitive_to_every_param(params: WarmStartParams) -> None:
    key = params.cache_key(0)
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert key == params.cache_key(0)
    assert key == WarmStartParams.from_config(load_config(overrides=SMALL)).cache_key(0)
    variants = [
        params.cache_key(1),
        dataclasses.replace(
            params, tokenizer=dataclasses.replace(params.tokenizer, vocab_size=999)
        ),
        dataclasses.replace(params, model=dataclasses.replace(params.model, hidden_size=48)),
        dataclasses.replace(params, model=dataclasses.replace(params.model, num_layers=2)),
        dataclasses.replace(params, model=dataclasses.replace(params.model, num_heads=4)),
        dataclasses.replace(params, model=dataclasses.replace(params.model, intermediate_size=96)),
        dataclasses.replace(
            params, model=dataclasses.replace(params.model, max_position_embeddings=256)
        ),
        dataclasses.replace(params, task=dataclasses.replace(params.task, difficulty=3)),
        dataclasses.replace(params, task=dataclasses.replace(params.task, tool_timeout_s=1.0)),
        dataclasses.replace(params, task=dataclasses.replace(params.task, max_calls_per_turn=2)),
        dataclasses.replace(
            params, task=dataclasses.replace(params.task, max_observation_chars=100)
        ),
        dataclasses.replace(params, num_demos=41),
        dataclasses.replace(params, steps=4),
        dataclasses.replace(params, batch_size=9),
        dataclasses.replace(params, lr=1e-3),
        dataclasses.replace(params, frac_tool=0.45, frac_guess=0.45),
        dataclasses.replace(params, frac_guess=0.45, frac_bad_call=0.2),
        dataclasses.replace(params, frac_tool=0.25, frac_bad_call=0.2),
    ]
    keys = [v if isinstance(v, str) else v.cache_key(0) for v in variants]
    assert len({key, *keys}) == 1 + len(variants)


def test_cache_key_includes_the_cache_version(
    params: WarmStartParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = params.cache_key(0)
    monkeypatch.setattr(ws, "CACHE_VERSION", ws.CACHE_VERSION + 1)
    assert params.cache_key(0) != key


# ----------------------------------------------------------------------------------------------
# ensure_warm_model (one real build, then fakes)


def cache_listing(cache: Path) -> list[str]:
    """The cache's entries, less the (empty, harmless) per-key lock files."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, params: WarmStartParams) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("warm") / "cache"  # does not exist yet: created on demand
    return cache, ensure_warm_model(cache, params, seed=0)


def test_ensure_builds_into_the_keyed_directory(built: Any, params: WarmStartParams) -> None:
    cache, path = built
    assert path == cache / f"warm-{params.cache_key(0)}"
    assert cache_listing(cache) == [path.name]  # no .building-* left over
    report = json.loads((path / REPORT_FILE).read_text())
    assert report["params"] == json.loads(json.dumps(dataclasses.asdict(params)))
    assert report["seed"] == 0 and report["version"] == ws.CACHE_VERSION
    assert report["first_loss"] > 0 and report["final_loss"] > 0


def test_ensure_output_loads_with_auto_classes(built: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path = built
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert tok.eos_token == IM_END and tok.pad_token_id is not None and tok.chat_template
    assert model.get_input_embeddings().num_embeddings >= len(tok)
    ids = tok.apply_chat_template([{"role": "user", "content": "1+1"}], add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape[-1] == model.get_input_embeddings().num_embeddings
    assert torch.isfinite(logits).all()


def test_ensure_reuses_the_cache(
    built: Any, params: WarmStartParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, path = built

    def no_rebuild(*_: Any) -> dict[str, Any]:
        raise AssertionError("build_warm_model called although the model is cached")

    monkeypatch.setattr(ws, "build_warm_model", no_rebuild)
    before = cache_listing(cache)
    assert ensure_warm_model(cache, params, seed=0) == path
    assert ensure_warm_model(str(cache), params, seed=0) == path  # a str works too
    assert cache_listing(cache) == before
    # a different seed is a different model: it would build
    with pytest.raises(AssertionError, match="build_warm_model called"):
        ensure_warm_model(cache, params, seed=1)
    assert cache_listing(cache) == before  # and leaves nothing behind


def test_ensure_failed_build_leaves_no_directory(
    tmp_path: Path, params: WarmStartParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_build(out_dir: Path, *_: Any) -> dict[str, Any]:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("crashed mid-build")

    monkeypatch.setattr(ws, "build_warm_model", half_build)
    with pytest.raises(RuntimeError, match="crashed mid-build"):
        ensure_warm_model(tmp_path, params, seed=0)
    assert cache_listing(tmp_path) == []  # neither the final dir nor a .building-* dir


def test_ensure_rename_writes_the_final_dir_atomically(
    tmp_path: Path, params: WarmStartParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []

    def fake_build(out_dir: Path, *_: Any) -> dict[str, Any]:
        seen.append(out_dir)
        assert out_dir.parent == tmp_path and out_dir.name.startswith(".building-")
        assert not (tmp_path / f"warm-{params.cache_key(5)}").exists()  # not there during build
        (out_dir / REPORT_FILE).write_text("{}")
        return {}

    monkeypatch.setattr(ws, "build_warm_model", fake_build)
    path = ensure_warm_model(tmp_path, params, seed=5)
    assert len(seen) == 1 and (path / REPORT_FILE).read_text() == "{}"
    assert cache_listing(tmp_path) == [path.name]


def test_a_killed_builds_leftover_is_removed_by_the_next_build_of_its_key(
    tmp_path: Path, params: WarmStartParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = params.cache_key(0)
    killed = tmp_path / f".building-{key}-dead1"  # what a SIGKILLed build leaves
    (killed / "model.safetensors").parent.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    other = tmp_path / f".building-{params.cache_key(1)}-live"  # another key's build: kept
    other.mkdir()

    def fake_build(out_dir: Path, *_: Any) -> dict[str, Any]:
        assert out_dir.name.startswith(f".building-{key}-") and not killed.exists()
        (out_dir / REPORT_FILE).write_text("{}")
        return {}

    monkeypatch.setattr(ws, "build_warm_model", fake_build)
    path = ensure_warm_model(tmp_path, params, seed=0)
    assert cache_listing(tmp_path) == sorted([other.name, path.name])


def test_ensure_concurrent_builder_keeps_the_first_finished(
    tmp_path: Path, params: WarmStartParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / f"warm-{params.cache_key(0)}"

    def racing_build(out_dir: Path, *_: Any) -> dict[str, Any]:
        # another process finishes first while this one is still building
        final.mkdir()
        (final / REPORT_FILE).write_text('"first"')
        (out_dir / REPORT_FILE).write_text('"second"')
        return {}

    monkeypatch.setattr(ws, "build_warm_model", racing_build)
    assert ensure_warm_model(tmp_path, params, seed=0) == final
    assert (final / REPORT_FILE).read_text() == '"first"'
    assert cache_listing(tmp_path) == [final.name]


def test_concurrent_callers_build_once_and_share_the_model(
    tmp_path: Path, params: WarmStartParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = threading.Event()
    builds: list[Path] = []

    def slow_build(out_dir: Path, *_: Any) -> dict[str, Any]:
        builds.append(out_dir)
        started.set()
        time.sleep(0.5)  # the second caller arrives while this build runs
        (out_dir / REPORT_FILE).write_text("{}")
        return {}

    monkeypatch.setattr(ws, "build_warm_model", slow_build)
    got: list[Path] = []
    first = threading.Thread(target=lambda: got.append(ensure_warm_model(tmp_path, params, 0)))
    first.start()
    assert started.wait(10)
    got.append(ensure_warm_model(tmp_path, params, seed=0))  # waits on the lock, then loads
    first.join()
    assert len(builds) == 1 and got[0] == got[1] == tmp_path / f"warm-{params.cache_key(0)}"
    assert cache_listing(tmp_path) == [got[0].name]


def test_a_task_without_a_demo_source_names_model_path() -> None:
    from spear.config import ConfigError, load_config
    from spear.models.warmstart import WarmStartParams

    cfg = load_config(overrides=["task.name=math", "task.train_files=[x.jsonl]"])
    with pytest.raises(ConfigError, match=r"task.name=math .*model.path"):
        WarmStartParams.from_config(cfg)
