"""Symbolic answer checks are bounded in time and memory, also through the real agent loop."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest

from spear.envs import symbolic
from spear.envs.base import Task
from spear.envs.math_task import MathParams, MathTasks
from spear.envs.symbolic import CheckLimits, SymbolicChecker, Verdict
from spear.rollout.loop import LoopParams, run_episodes
from spear.stages import episode_metrics
from spear.types import EndReason
from tests.rollout.conftest import ScriptedEngine, build_tokenizer, sampling

pytest.importorskip("math_verify")

# final answers that make sympy compute for seconds to minutes or grow without bound, against 4
# (timed here: 4.6 s, over 30 s and over 10 s). Not (x+1)^{100000}: it takes 1-2 s depending on
# the machine, too close to the 1 s limit to be a stable test.
HANGS = ["2^{2^{40}}", "9^{9^{9^{9}}}", "3^{3^{30}}"]
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def checker() -> SymbolicChecker:
    c = SymbolicChecker(CheckLimits(timeout_s=TIMEOUT_S))
    yield c
    c.close()


@pytest.fixture(scope="module")
def patient() -> SymbolicChecker:
    c = SymbolicChecker(CheckLimits(timeout_s=30.0))  # equivalences, whatever the machine's load
    yield c
    c.close()


def test_equivalence_is_still_found(patient: SymbolicChecker) -> None:
    assert patient.check("\\frac{\\sqrt{2}}{2}", "1/\\sqrt{2}") is Verdict.EQUAL
    assert patient.check("x+1", "1+x") is Verdict.EQUAL
    assert patient.check("x", "y") is Verdict.DIFFERENT


@pytest.mark.parametrize("answer", HANGS)
def test_a_hanging_check_is_stopped_at_its_limit(checker: SymbolicChecker, answer: str) -> None:
    checker.check("x", "x")  # a child is running: the clock below is the check's alone
    t0 = time.monotonic()
    assert checker.check(answer, "4").bounded  # stopped by the clock (or the memory limit)
    assert time.monotonic() - t0 < TIMEOUT_S + 1.0
    assert checker.check("x", "x") is Verdict.EQUAL  # a fresh child takes over


def test_a_memory_error_in_the_child_is_a_memory_verdict(monkeypatch, tmp_path: Path) -> None:
    fake = 'import json, sys\nprint(json.dumps({"ready": True}), flush=True)\nfor _ in sys.stdin:\n    print(json.dumps({"memory": True}), flush=True)\n'
    monkeypatch.setattr(symbolic, "_WORKER", fake)
    c = SymbolicChecker(CheckLimits(timeout_s=TIMEOUT_S))
    try:
        verdict = c.check("x", "y")
    finally:
        c.close()
    assert verdict is Verdict.MEMORY and verdict.bounded


def test_children_run_in_their_own_session(checker: SymbolicChecker) -> None:
    # a Ctrl-C in the terminal goes to the trainer's process group only, not to the checker
    checker.check("x", "x")
    (child,) = checker._idle[-1:]
    assert os.getsid(child.proc.pid) != os.getsid(0)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        CheckLimits(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        CheckLimits(memory_mb=64)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def test_hanging_answers_through_the_agent_loop_are_wrong_and_counted(
    tokenizer, tmp_path: Path
) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text('{"problem": "p", "answer": "4"}\n')
    params = MathParams(
        (str(train),),
        (str(train),),
        5.0,
        1,
        512,
        20,
        "local",
        None,
        1024,
        64,
        answer_check=CheckLimits(timeout_s=1.5),  # the children share the CPUs here
        sandbox_allow_unsafe=False,
    )
    source = MathTasks(params)
    answers = [*HANGS, "\\frac{8}{2}", "2+2"]
    tasks = [Task(task_id=f"t{i}", prompt="What is 2+2?", answer="4") for i in range(len(answers))]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts = [tokenizer.encode(f"So \\boxed{{{a}}}", add_special_tokens=False) for a in answers]

    def script(call: int, i: int, prompt: list[int]) -> list[int]:
        return [*texts[i], end]

    loop = LoopParams(
        max_turns=2,
        max_response_tokens=256,
        max_context_tokens=1024,
        layout="episode",
        history_length=1,
        sampling=sampling(200),
        env_step_timeout_s=30.0,
    )
    rss = _rss_mb()
    t0 = time.monotonic()
    episodes = run_episodes(
        ScriptedEngine(script),
        tokenizer,
        source.make_env,
        tasks,
        group_size=1,
        params=loop,
        step=1,
        first_group_id=0,
        first_episode_id=0,
        tools=source.tools(),
    )
    took = time.monotonic() - t0
    source.checker.close()
    # the checks run in parallel, one child each; starting a child (sympy) takes a few seconds
    assert took < 1.5 + symbolic.STARTUP_TIMEOUT_S / 4, took
    assert _rss_mb() - rss < 100  # nothing of sympy's work lives in this process
    assert [e.end_reason for e in episodes] == [EndReason.ANSWER] * len(answers)
    assert [e.success for e in episodes] == [False, False, False, True, True]
    assert [e.outcome_reward for e in episodes] == [-1.0, -1.0, -1.0, 1.0, 1.0]
    assert episode_metrics(episodes, "train")["train/answer_check_timeouts"] == 3 / 5
