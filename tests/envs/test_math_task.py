"""The math task source: files, layouts, splits and the env it builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spear.envs.base import Env, Task, TaskSource
from spear.envs.math_task import (
    ANSWER_SUFFIX,
    MathDataError,
    MathParams,
    MathTasks,
    held_out,
    load_problems,
)
from spear.envs.symbolic import CheckLimits

BUCKETS = 20


def _params(train: list[Path], test: list[Path] | None = None) -> MathParams:
    return MathParams(
        tuple(map(str, train)),
        tuple(map(str, test or [])),
        5.0,
        1,
        512,
        BUCKETS,
        "local",
        None,
        1024,
        64,
        CheckLimits(),
        False,
    )


def _verl_rows(n: int, start: int = 0) -> list[dict[str, object]]:
    return [
        {
            "data_source": "math_dapo",
            "prompt": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": f"What is {i}+{i}?"},
            ],
            "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
        }
        for i in range(start, start + n)
    ]


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_parquet(path: Path, rows: list[dict[str, object]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_verl_layout_jsonl_and_parquet_read_the_same(tmp_path: Path) -> None:
    rows = _verl_rows(5)
    a = load_problems(str(_write_jsonl(tmp_path / "a.jsonl", rows)))
    b = load_problems(str(_write_parquet(tmp_path / "a.parquet", rows)))
    assert a == b == [(f"What is {i}+{i}?", str(2 * i)) for i in range(5)]


def test_simple_layouts(tmp_path: Path) -> None:
    rows = [{"problem": " 1+1? ", "answer": 2}, {"problem": "x?", "answer": "\\frac{1}{2}"}]
    assert load_problems(str(_write_jsonl(tmp_path / "p.jsonl", rows))) == [
        ("1+1?", "2"),
        ("x?", "\\frac{1}{2}"),
    ]
    rows2 = [{"question": "q?", "answer": "7"}]
    assert load_problems(str(_write_parquet(tmp_path / "q.parquet", rows2))) == [("q?", "7")]


def test_missing_columns_name_the_file_and_columns(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "1+1", "label": "2"}])
    with pytest.raises(MathDataError, match=r"bad\.jsonl.*found columns \['label', 'text'\]"):
        load_problems(str(path))
    empty_answer = _write_jsonl(tmp_path / "e.jsonl", [{"problem": "p", "answer": None}])
    with pytest.raises(MathDataError, match="row 0"):
        load_problems(str(empty_answer))
    with pytest.raises(MathDataError, match="no such file"):
        load_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(MathDataError, match="unsupported file type"):
        load_problems(str(tmp_path / "x.csv"))


def test_tasks_are_deterministic_and_carry_the_suffix(tmp_path: Path) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", _verl_rows(40))
    test = _write_parquet(tmp_path / "test.parquet", _verl_rows(6, start=100))
    source = MathTasks(_params([train], [test]))
    assert isinstance(source, TaskSource)
    a, b = source.tasks("train", 10, seed=3), source.tasks("train", 10, seed=3)
    assert a == b and a != source.tasks("train", 10, seed=4)
    assert len({t.task_id for t in a}) == 10  # without replacement
    assert all(t.prompt.endswith(ANSWER_SUFFIX) for t in a)
    tests = source.tasks("test", 8, seed=0)  # more than the pool: cycles
    assert len(tests) == 8 and {t.answer for t in tests} == {str(2 * i) for i in range(100, 106)}
    with pytest.raises(ValueError, match="split"):
        source.tasks("dev", 1, 0)


def test_held_out_slice_is_hash_based_and_disjoint(tmp_path: Path) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", _verl_rows(400))
    source = MathTasks(_params([train]))
    train_ids = {t.task_id for t in source.pool("train")}
    test_pool = source.pool("test")
    assert test_pool and not train_ids & {t.task_id for t in test_pool}
    assert len(train_ids) + len(test_pool) == 400
    assert all(held_out(t.prompt.removesuffix(ANSWER_SUFFIX), BUCKETS) for t in test_pool)
    assert 400 / BUCKETS / 3 < len(test_pool) < 400 / BUCKETS * 3


def test_env_scores_boxed_answers_and_runs_the_sandbox(tmp_path: Path) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", [{"problem": "What is 12*12?", "answer": "144"}])
    source = MathTasks(_params([train], [train]))
    env = source.make_env()
    assert isinstance(env, Env)
    task: Task = source.tasks("train", 1, 0)[0]
    messages, _ = env.reset(task)
    assert messages[-1]["content"].endswith(ANSWER_SUFFIX)
    call = (
        '<tool_call>{"name": "code_interpreter", "arguments": {"code": "print(12*12)"}}</tool_call>'
    )
    step = env.step(call)
    assert step.messages[0]["content"] == "144" and step.info["tool_calls"] == 1
    final = env.step("So the answer is \\boxed{144}.")
    assert final.terminated and final.reward == 1.0 and final.info["success"]
    env.reset(task)
    assert env.step("\\boxed{145}").reward == -1.0


def test_params_validation() -> None:
    with pytest.raises(ValueError, match="train_files"):
        MathParams((), (), 5.0, 1, 512, BUCKETS, "local", None, 1024, 64, CheckLimits(), False)


def test_rollout_parser_is_the_env_parser(tmp_path: Path) -> None:
    from spear.config import load_config
    from spear.rollout.parsers import PARSERS

    train = _write_jsonl(tmp_path / "train.jsonl", _verl_rows(4))
    base = ["task.name=math", f"task.train_files=[{train}]"]
    for override, name in [([], "hermes"), (["rollout.parser=python"], "python")]:
        env = MathTasks.from_config(load_config(overrides=[*base, *override])).make_env()
        assert env.parser is PARSERS.get(name)  # type: ignore[attr-defined]
        env.close()
