"""The hard-exploration lookup task: splits, tools, the oracle, the warm-start demos."""

from __future__ import annotations

import dataclasses

import pytest

from spear.config import ConfigError, load_config, run_config_path
from spear.envs.base import Task
from spear.envs.lookup import (
    SPLITS,
    Lookup,
    LookupParams,
    LookupTasks,
    catalogue,
    generate_tasks,
    item_split,
    oracle_actions,
    unit_price,
)
from spear.models.lookup_demos import make_lookup_demos
from spear.models.warmstart import WarmStartParams

PARAMS = LookupParams(tool_timeout_s=5.0, max_observation_chars=512)


def play(source: LookupTasks, task: Task, policy, max_turns: int = 4) -> tuple[bool, int]:
    """Play ``policy(task, observations) -> text`` in the real env; (success, tool calls)."""
    env = source.make_env()
    env.reset(task)
    observations: list[str] = []
    calls = 0
    for _ in range(max_turns):
        result = env.step(policy(task, observations))
        calls += int(result.info.get("tool_calls", 0))
        observations += [str(m["content"]) for m in result.messages]
        if result.terminated:
            return bool(result.info["success"]), calls
    return False, calls


@pytest.mark.parametrize("split", SPLITS)
def test_the_oracle_solves_every_problem_with_two_dependent_calls(split: str) -> None:
    source = LookupTasks(PARAMS)
    tasks = source.tasks(split, 300, seed=3)
    results = [play(source, t, oracle_actions) for t in tasks]
    assert all(ok for ok, _ in results)
    assert all(calls == 2 for _, calls in results)


def test_the_price_is_only_in_the_first_calls_observation() -> None:
    source = LookupTasks(PARAMS)
    for task in source.tasks("train", 2000, seed=0):
        price = str(task.meta["price"])
        assert price not in task.prompt.split()  # the second call's value is not in the prompt
        assert int(task.answer or 0) == int(task.meta["quantity"]) * int(price)

        def skip_lookup(t: Task, obs: list[str]) -> str:
            # calculator(q*1) straight away (no price from a lookup), then box its result
            return oracle_actions(t, ["1", *obs])

        assert play(source, task, skip_lookup) == (False, 1)  # prices are >= 10, so q*1 is wrong


def test_splits_are_by_item_and_never_overlap() -> None:
    items = {s: {i for i in catalogue() if item_split(i) == s} for s in SPLITS}
    assert sum(len(v) for v in items.values()) == len(catalogue()) == 900
    assert all(len(items[s]) >= 40 for s in SPLITS)
    assert not (items["train"] & items["test"]) and not (items["validation"] & items["test"])
    for split in SPLITS:
        named = {t.meta["item"] for t in generate_tasks(split, 500, seed=1)}
        assert named <= items[split]
    assert {t.meta["item"] for t in generate_tasks("test", 128, 0)}.isdisjoint(
        {t.meta["item"] for t in generate_tasks("train", 2000, 0)}
    )


def test_tasks_are_deterministic_distinct_and_checked() -> None:
    a, b = generate_tasks("train", 50, 7), generate_tasks("train", 50, 7)
    assert [t.task_id for t in a] == [t.task_id for t in b]
    assert len({t.task_id for t in a}) == 50
    assert [t.task_id for t in generate_tasks("train", 50, 8)] != [t.task_id for t in a]
    with pytest.raises(ValueError, match="validation"):
        generate_tasks("dev", 1, 0)
    with pytest.raises(ValueError, match="problems"):
        generate_tasks("test", 10**6, 0)


def test_lookup_tool() -> None:
    tool = Lookup()
    assert tool(item="part 418") == str(unit_price("part 418"))
    assert tool(item="  Part   418 ") == str(unit_price("part 418"))
    assert all(10 <= unit_price(i) <= 999 for i in catalogue())
    assert tool(item="part 1000").startswith("error: no item")
    assert tool(item=3).startswith("error")
    assert tool(name="part 418").startswith("error")
    assert tool().startswith("error")


def test_demo_mix_solves_exactly_the_tool_share() -> None:
    cfg = load_config(file=run_config_path("lookup"))
    wp = dataclasses.replace(WarmStartParams.from_config(cfg), num_demos=200)
    demos, report = make_lookup_demos(wp, seed=0)
    assert len(demos) == 200
    assert report["demo_success_rate"] == pytest.approx(round(200 * wp.frac_tool) / 200)
    firsts = [d.messages[2]["content"] for d in demos]  # system, user, first assistant turn
    assert any('"lookup"' in f for f in firsts) and any('"calculator"' in f for f in firsts)
    assert any(f.startswith("\\boxed") for f in firsts)


def test_the_config_has_a_validation_split_and_arithmetic_does_not() -> None:
    from spear.build import check_eval_split
    from spear.tasks import build_task

    cfg = load_config(file=run_config_path("lookup"), overrides=["eval.split=validation"])
    source = build_task(cfg)
    check_eval_split(cfg, source)
    assert source.tasks("validation", 3, 0)[0].meta["split"] == "validation"
    arith = load_config(overrides=["eval.split=validation"])
    with pytest.raises(ConfigError, match=r"eval\.split=validation"):
        check_eval_split(arith, build_task(arith))


def test_rollout_parser_reaches_the_env() -> None:
    from spear.rollout.parsers import PARSERS

    cfg = load_config(file=run_config_path("lookup"), overrides=["rollout.parser=python"])
    source = LookupTasks.from_config(cfg)
    assert source.make_env().parser is PARSERS.get("python")  # type: ignore[attr-defined]
    assert LookupTasks(PARAMS).make_env().parser is PARSERS.get("hermes")  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="tool_timeout_s"):
        LookupParams(tool_timeout_s=0.0, max_observation_chars=10)


def test_no_demo_looks_up_another_catalogue_item() -> None:
    # a demo that chains a lookup of the wrong item taught the warm model to chain wrong items
    import json
    import re

    cfg = load_config(file=run_config_path("lookup"))
    wp = dataclasses.replace(WarmStartParams.from_config(cfg), num_demos=300)
    demos, _ = make_lookup_demos(wp, seed=1)
    items = set(catalogue())
    tasks = {t.prompt: t for t in generate_tasks("train", 300, 1)}
    looked = 0
    for d in demos:
        task = tasks[d.messages[1]["content"]]
        for m in d.messages:
            call = re.search(r"<tool_call>(.*)</tool_call>", str(m.get("content", "")))
            if m["role"] != "assistant" or call is None:
                continue
            try:
                payload = json.loads(call.group(1))
            except json.JSONDecodeError:
                continue
            item = payload.get("arguments", {}).get("item")
            if payload.get("name") == "lookup" and item is not None:
                looked += 1
                assert item == task.meta["item"] or item not in items
    assert looked > 50


def test_the_copy_demo_adds_the_looked_up_price_and_fails() -> None:
    # one guess variant practises copying a tool observation into the next call, with the
    # wrong operation: the chain's remaining piece is choosing "*" (seen only with made-up prices)
    import json
    import re

    cfg = load_config(file=run_config_path("lookup"))
    wp = dataclasses.replace(WarmStartParams.from_config(cfg), num_demos=200)
    demos, _ = make_lookup_demos(wp, seed=2)
    tasks = {t.prompt: t for t in generate_tasks("train", 200, 2)}
    copies = 0
    for d in demos:
        task = tasks[d.messages[1]["content"]]
        for m in d.messages:
            call = re.search(r"<tool_call>(.*)</tool_call>", str(m.get("content", "")))
            if m["role"] != "assistant" or call is None or "+" not in call.group(1):
                continue
            expr = json.loads(call.group(1))["arguments"]["expression"]
            assert expr == f"{task.meta['quantity']}+{task.meta['price']}"
            copies += 1
            assert d.messages[-1]["content"] != f"\\boxed{{{task.answer}}}"
    assert copies >= 200 * wp.frac_guess // 4 - 1
