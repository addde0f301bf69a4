"""FunctionTask: tasks from data files plus functions, splits, weighted logged rewards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from spear.envs.base import Task
from spear.envs.function_task import (
    EpisodeTrace,
    FunctionTask,
    RewardFunctionError,
    TaskDataError,
    correct_answer,
    held_out,
    load_rows,
)
from spear.rollout.parsers import hermes_call
from spear.stages import reward_term_metrics
from spear.types import EndReason, Episode

ROWS = [{"q": f"What is {i} plus 100?", "a": i + 100, "level": i % 3} for i in range(60)]


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: First.
        b: Second.
    """
    return a + b


def _task(**kw: Any) -> FunctionTask:
    base: dict[str, Any] = {
        "name": "adder",
        "data": ROWS,
        "tools": [add],
        "prompt_column": "q",
        "answer_column": "a",
        "held_out_fraction": 0.25,
    }
    return FunctionTask(**{**base, **kw})


def test_every_file_format_and_a_dataset_give_the_same_tasks(tmp_path: Path) -> None:
    import datasets
    import pandas as pd

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pd.DataFrame(ROWS).to_csv(tmp_path / "rows.csv", index=False)
    pd.DataFrame(ROWS).to_parquet(tmp_path / "rows.parquet")
    reference = _task().pool("train")
    for data in (
        str(jsonl),
        tmp_path / "rows.csv",
        [tmp_path / "rows.parquet"],
        datasets.Dataset.from_list(ROWS),
    ):
        assert _task(data=data).pool("train") == reference, data
    assert load_rows(jsonl)[3] == ROWS[3]


def test_bad_data_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"rows.txt: unsupported file type"):
        load_rows(tmp_path / "rows.txt")
    with pytest.raises(TaskDataError, match=r"nope.jsonl: no such file"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(
        TaskDataError, match=r"adder row 0: no column 'prompt' \(columns: q, a, level\)"
    ):
        _task(prompt_column="prompt")
    with pytest.raises(TaskDataError, match=r"has no test rows"):
        _task(data=ROWS[:2], held_out_fraction=0.01)
    with pytest.raises(TaskDataError, match="2 reward_weights for 1 reward functions"):
        _task(reward_weights=[1.0, 2.0])
    with pytest.raises(TaskDataError, match=r"reward_weights names \['nope'\]"):
        _task(reward_weights={"nope": 1.0})
    with pytest.raises(KeyError, match="unknown tool-call parser 'hermez'"):
        _task(parser="hermez")


def test_hash_split_is_fixed_disjoint_and_seed_independent() -> None:
    t = _task()
    train, test = t.pool("train"), t.pool("test")
    assert len(train) + len(test) == 60
    assert {x.task_id for x in train}.isdisjoint({x.task_id for x in test})
    assert all(held_out(x.task_id, 0.25) for x in test)
    assert not any(held_out(x.task_id, 0.25) for x in train)
    assert 5 <= len(test) <= 25  # about a quarter of 60
    # the test split gives each task at most once; train cycles and is seed-deterministic
    assert sorted(x.task_id for x in t.tasks("test", 500, seed=1)) == sorted(
        x.task_id for x in test
    )
    assert t.tasks("train", 100, seed=3) == t.tasks("train", 100, seed=3)
    assert len(t.tasks("train", 100, seed=3)) == 100
    assert t.tasks("train", 5, seed=3) != t.tasks("train", 5, seed=4)


def test_held_out_is_the_hash_fraction() -> None:
    # sha256("adder-x") starts with bytes whose 64-bit value / 2**64 is this fraction
    import hashlib

    digest = hashlib.sha256(b"adder-x").digest()
    frac = int.from_bytes(digest[:8], "big") / 2**64
    assert held_out("adder-x", frac + 1e-9) and not held_out("adder-x", frac)


def test_split_by_column_and_by_test_data() -> None:
    t = _task(split_column="level", test_values=("0",))
    assert {x.meta["level"] for x in t.pool("test")} == {0} and len(t.pool("test")) == 20
    assert {x.meta["level"] for x in t.pool("train")} == {1, 2}
    t2 = _task(data=ROWS[:40], test_data=ROWS[40:])
    assert [x.prompt for x in t2.pool("test")] == [r["q"] for r in ROWS[40:]]
    assert len(t2.pool("train")) == 40


def test_prompt_template_ids_and_meta() -> None:
    rows = [{"x": 3, "y": 4, "id": "r1", "answer": 7}]
    t = FunctionTask(
        name="t", data=rows, tools=[add], prompt_template="Add {x} and {y}.", id_column="id",
        test_data=rows,
    )  # fmt: skip
    (task,) = t.pool("test")
    assert task == Task("r1", "Add 3 and 4.", "7", {"x": 3, "y": 4})
    with pytest.raises(TaskDataError, match="prompt_template cannot be filled: KeyError"):
        FunctionTask(name="t", data=rows, tools=[add], prompt_template="{z}", test_data=rows)


def _play(t: FunctionTask, task: Task, actions: list[str]) -> Any:
    env = t.make_env()
    env.reset(task)
    for text in actions:
        result = env.step(text)
    return result


def test_weighted_rewards_are_summed_and_each_is_reported() -> None:
    seen: list[EpisodeTrace] = []

    def used_add(task: Task, episode: EpisodeTrace) -> float:
        seen.append(episode)
        return 1.0 if "add" in episode.tools_used else 0.0

    def short(task: Task, episode: EpisodeTrace) -> float:
        return -0.5 * episode.turns

    t = _task(
        rewards={"correct": correct_answer, "used_add": used_add, "short": short},
        reward_weights={"used_add": 0.2, "short": 0.1},
        system_prompt="Use add.",
    )
    task = t.pool("train")[0]
    n = int(task.answer) - 100  # type: ignore[arg-type]
    result = _play(t, task, [hermes_call("add", {"a": n, "b": 100}), f"\\boxed{{{n + 100}}}"])
    # 1.0 * 1 + 0.2 * 1 + 0.1 * (-0.5 * 2 turns) = 1.1
    assert result.terminated and result.reward == pytest.approx(1.1)
    assert result.info["reward_terms"] == {"correct": 1.0, "used_add": 1.0, "short": -1.0}
    assert result.info["success"] is True and result.info["final_answer"] == str(n + 100)
    trace = seen[0]
    assert [m["role"] for m in trace.messages] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert trace.calls[0].name == "add" and trace.calls[0].output == str(n + 100)
    wrong = _play(t, task, ["\\boxed{1}"])
    assert wrong.reward == pytest.approx(-0.05) and wrong.info["success"] is False


def test_a_list_of_rewards_is_named_by_function_and_success_can_be_custom() -> None:
    def one(task: Task, episode: EpisodeTrace) -> float:
        return 1.0

    t = _task(rewards=[one, correct_answer], success=lambda task, ep: ep.final_answer == "x")
    result = _play(t, t.pool("train")[0], ["\\boxed{x}"])
    assert result.info["reward_terms"] == {"one": 1.0, "correct_answer": 0.0}
    assert result.info["success"] is True and result.reward == 1.0


def test_without_an_answer_success_is_a_positive_reward() -> None:
    def long_answer(task: Task, episode: EpisodeTrace) -> float:
        return float(len(episode.final_response) > 5)

    rows = [{"prompt": f"Say something {i}"} for i in range(30)]
    t = FunctionTask(name="t", data=rows, tools=[add], rewards=long_answer, answer_column=None,
                     held_out_fraction=0.3)  # fmt: skip
    task = t.pool("train")[0]
    assert task.answer is None
    assert _play(t, task, ["hello world"]).info["success"] is True
    assert _play(t, task, ["hi"]).info["success"] is False


def test_a_broken_reward_function_fails_the_episode_loudly() -> None:
    def bad(task: Task, episode: EpisodeTrace) -> float:
        raise ZeroDivisionError("oops")

    def text(task: Task, episode: EpisodeTrace) -> Any:
        return "1"

    with pytest.raises(
        RewardFunctionError, match="reward function 'bad' raised ZeroDivisionError: oops"
    ):
        _play(_task(rewards=bad), _task().pool("train")[0], ["\\boxed{1}"])
    with pytest.raises(
        RewardFunctionError, match="reward function 'text' returned str, not a float"
    ):
        _play(_task(rewards=text), _task().pool("train")[0], ["\\boxed{1}"])


def test_the_other_parsers_work_multi_turn() -> None:
    def python(code: str) -> str:
        """Run code (here: echo it).

        Args:
            code: Python source.
        """
        return f"ran {code.strip()}"

    t = _task(tools=[python], parser="python")
    task = t.pool("train")[0]
    env = t.make_env()
    env.reset(task)
    step = env.step("```python\nprint(1)\n```")
    assert step.messages == [{"role": "tool", "name": "python", "content": "ran print(1)"}]
    assert env.step("\\boxed{2}").terminated


def test_reward_term_metrics_average_over_all_episodes() -> None:
    def ep(terms: dict[str, float] | None) -> Episode:
        info = {} if terms is None else {"reward_terms": terms}
        return Episode("t", 0, 0, [], EndReason.ANSWER, 0.0, False, 1, 0, 0, info=info)

    got = reward_term_metrics([ep({"a": 1.0, "b": 0.5}), ep({"a": 0.0, "b": 1.0}), ep(None)], "x")
    assert got == {"x/reward_a": pytest.approx(1 / 3), "x/reward_b": pytest.approx(0.5)}
