"""TextWorld adapter: pure text functions, splits, the env on small generated games, demos, pool."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spear.envs.base import Env, StepResult, Task, TaskSource
from spear.envs.textworld_env import (
    TextWorldEnv,
    TextWorldEpisodeError,
    TextWorldParams,
    TextWorldTasks,
    build_turn_prompt,
    clean_observation,
    extract_objective,
    invalid_action_feedback,
    parse_action,
    resolve_action,
    walkthrough_demonstrations,
)
from spear.envs.textworld_games import (
    HELD_OUT_SEED_START,
    HELD_OUT_SIZE,
    GameCache,
    GameSpec,
    PoolParams,
    ProcessEnvPool,
    TextWorldMissingError,
    game_spec,
    require_textworld,
    split_seeds,
)
from spear.registry import UnknownNameError

PARAMS = TextWorldParams(
    history_length=2, max_steps=20, invalid_action_penalty=0.1, numbered_actions=False
)

# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def test_parse_action_cases() -> None:
    assert parse_action("<think>north looks good</think><action>Go  North</action>") == "go north"
    assert parse_action("<action> 'take coin' </action> <action>look</action>") == "take coin"
    assert parse_action("<ACTION>look</ACTION>") == "look"
    assert parse_action("go north") is None
    assert parse_action("<action>   </action>") is None
    assert parse_action("<action>look") is None


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(st.text(alphabet="abcdefghij", min_size=1, max_size=6), min_size=1, max_size=4),
    think=st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=30),
)
def test_parse_action_property(words: list[str], think: str) -> None:
    # Any spacing/casing of the words round-trips to the lower-cased, single-spaced command.
    raw = "  ".join(w.upper() for w in words)
    assert parse_action(f"<think>{think}</think>\n<action>{raw}</action>") == " ".join(words)


def test_clean_observation_strips_banner_prompt_and_boilerplate() -> None:
    raw = (
        "\n\n   ________  __    __\n  |        \\|  \\  |  \\\n   \\$$$$$$$$| $$  | $$\n\n"
        "Welcome!\n\n\n\n-= Kitchen =-\nA kitchen.\n\n>   -= Kitchen =-0/1\n"
        "Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?\n"
    )
    # Banner rows, the '>' prompt/status line and the RESTART question go; blank runs become one.
    assert clean_observation(raw) == "Welcome!\n\n-= Kitchen =-\nA kitchen."
    assert clean_observation("Recipe #1\n---------\n  dice the onion\n") == (
        "Recipe #1\n---------\ndice the onion"
    )


def test_extract_objective() -> None:
    assert extract_objective("  Find the coin. ", "whatever") == "Find the coin."
    obs = "-= Welcome =-\nYou are in a room.\n\nYour task is to: put a clean mug in coffeemachine."
    assert extract_objective(None, obs) == "put a clean mug in coffeemachine."
    assert extract_objective("", "no task here") == ""


def _first_turn_prompt(numbered: bool) -> str:
    return build_turn_prompt(
        objective="Take the coin.",
        observation="-= Hall =-",
        admissible=["go east", "look"],
        history=[],
        history_length=2,
        numbered=numbered,
    )


def test_build_turn_prompt_first_turn() -> None:
    assert _first_turn_prompt(numbered=False) == (
        "You are playing a text adventure game.\n"
        "Goal: Take the coin.\n"
        "Current observation (step 1):\n"
        "-= Hall =-\n"
        "Admissible actions:\n"
        "- go east\n"
        "- look\n"
        "Reply with exactly one admissible action inside <action></action>. "
        "You may reason briefly inside <think></think> before it."
    )


def test_build_turn_prompt_numbered_lists_numbers_and_asks_for_one() -> None:
    assert _first_turn_prompt(numbered=True).endswith(
        "Admissible actions:\n"
        "1. go east\n"
        "2. look\n"
        "Reply with the number of one admissible action inside <action></action>. "
        "You may reason briefly inside <think></think> before it."
    )


def test_resolve_action_maps_numbers_to_admissible_commands() -> None:
    cmds = ["go east", "look", "take coin"]
    assert resolve_action("1", cmds, numbered=True) == "go east"
    assert resolve_action("3", cmds, numbered=True) == "take coin"
    for out_of_range in ("0", "4", "12"):
        assert resolve_action(out_of_range, cmds, numbered=True) == out_of_range  # refused later
    assert resolve_action("look", cmds, numbered=True) == "look"  # a command's text still works
    assert resolve_action(None, cmds, numbered=True) is None
    assert resolve_action("2", cmds, numbered=False) == "2"  # the text format takes no numbers


def test_build_turn_prompt_keeps_last_k_pairs_numbered_by_step() -> None:
    history = [("o1", "a1"), ("o2", "a2"), ("o3", "a3")]
    text = build_turn_prompt(
        objective="G", observation="o4", admissible=["x"], history=history, history_length=2
    )
    # 3 steps taken; the last 2 pairs are steps 2 and 3; the current step is 4.
    assert "Steps taken so far: 3.\n" in text
    assert "Observation 2: o2\nAction 2: a2\nObservation 3: o3\nAction 3: a3\n" in text
    assert "o1" not in text and "a1" not in text
    assert "Current observation (step 4):\no4\n" in text
    none_shown = build_turn_prompt(
        objective="G", observation="o4", admissible=["x"], history=history, history_length=0
    )
    assert "Observation" not in none_shown.replace("Current observation", "")
    assert "Steps taken so far: 3." in none_shown


def test_invalid_action_feedback() -> None:
    assert invalid_action_feedback("dance", "-= Hall =-") == (
        "No action was executed: 'dance' is not an admissible action.\n-= Hall =-"
    )
    assert invalid_action_feedback(None, "obs").startswith("No action was executed: put one")


def test_format_turn_prompt_uses_the_env_observation_as_the_whole_prompt() -> None:
    # The agent loop's turn-layout hook: turn 0 shows the reset messages, later turns the latest
    # observation (which already holds objective, history and admissible actions).
    env = TextWorldEnv(PARAMS)
    first = ({"role": "user", "content": "prompt 1"},)
    later = ({"role": "user", "content": "prompt 3"},)
    ctx0 = SimpleNamespace(first_messages=first, observation=first, turn_index=0, history=())
    ctx2 = SimpleNamespace(first_messages=first, observation=later, turn_index=2, history=())
    assert env.format_turn_prompt(ctx0) == [{"role": "user", "content": "prompt 1"}]
    assert env.format_turn_prompt(ctx2) == [{"role": "user", "content": "prompt 3"}]


def test_params_validation() -> None:
    with pytest.raises(ValueError, match="max_steps"):
        TextWorldParams(
            history_length=2, max_steps=0, invalid_action_penalty=0.1, numbered_actions=False
        )
    with pytest.raises(ValueError, match="invalid_action_penalty"):
        TextWorldParams(
            history_length=2, max_steps=5, invalid_action_penalty=-1.0, numbered_actions=False
        )
    with pytest.raises(ValueError, match="history_length"):
        TextWorldParams(
            history_length=-1, max_steps=5, invalid_action_penalty=0.0, numbered_actions=False
        )


# ---------------------------------------------------------------------------------------------
# Specs and splits
# ---------------------------------------------------------------------------------------------


def test_game_spec_validation_and_digest() -> None:
    spec = game_spec("tw-coin_collector", 5)
    assert spec.settings == (("level", 5),)
    assert spec.digest() == game_spec("tw-coin_collector", 5).digest()
    assert spec.digest() != game_spec("tw-coin_collector", 6).digest()
    cooking = game_spec("tw-cooking", 2, {"recipe_seed": 3})
    assert cooking.settings_dict()["cut"] is True and cooking.settings_dict()["recipe_seed"] == 3
    with pytest.raises(UnknownNameError, match="tw-coin_collector"):
        game_spec("tw-coin-collector", 1)
    with pytest.raises(ValueError, match=r"\[1, 30\]"):
        game_spec("tw-treasure_hunter", 31)
    with pytest.raises(ValueError, match="has no setting 'speed'"):
        game_spec("tw-simple", 1, {"speed": 2})


def test_split_seeds_basic() -> None:
    assert split_seeds("test", 3, seed=7, num_train_games=10) == [
        HELD_OUT_SEED_START,
        HELD_OUT_SEED_START + 1,
        HELD_OUT_SEED_START + 2,
    ]
    assert split_seeds("test", 3, 0, 10) == split_seeds("test", 3, 99, 10)  # fixed held-out set
    train = split_seeds("train", 10, seed=1, num_train_games=10)
    assert sorted(train) == list(range(10))  # n == pool: a permutation of the pool
    assert split_seeds("train", 4, 1, 10) == split_seeds("train", 4, 1, 10)
    assert len(split_seeds("train", 25, 1, 10)) == 25  # more than the pool: with replacement
    with pytest.raises(ValueError, match="split"):
        split_seeds("valid", 1, 0, 10)
    with pytest.raises(ValueError, match="held-out"):
        split_seeds("test", HELD_OUT_SIZE + 1, 0, 10)
    with pytest.raises(ValueError, match="num_train_games"):
        split_seeds("train", 1, 0, HELD_OUT_SEED_START + 1)


def test_validation_split_follows_the_held_out_seeds() -> None:
    first = HELD_OUT_SEED_START + HELD_OUT_SIZE
    assert split_seeds("validation", 2, seed=5, num_train_games=10) == [first, first + 1]
    assert split_seeds("validation", 2, 0, 10) == split_seeds("validation", 2, 99, 10)
    with pytest.raises(ValueError, match="validation"):
        split_seeds("validation", 1_001, 0, 10)


@settings(max_examples=50, deadline=None)
@given(
    n_train=st.integers(0, 300),
    n_test=st.integers(0, HELD_OUT_SIZE),
    seed=st.integers(0, 2**31),
    pool=st.integers(1, HELD_OUT_SEED_START),
)
def test_splits_never_overlap(n_train: int, n_test: int, seed: int, pool: int) -> None:
    train = split_seeds("train", n_train, seed, pool)
    test = split_seeds("test", n_test, seed, pool)
    val = split_seeds("validation", n_test, seed, pool)
    assert not set(train) & set(test) and not set(train) & set(val) and not set(test) & set(val)
    assert all(0 <= s < pool for s in train)


def test_missing_textworld_gives_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "textworld", None)
    with pytest.raises(TextWorldMissingError) as err:
        require_textworld()
    assert str(err.value) == "TextWorld is not installed: run pip install 'spear[textworld]'"


# ---------------------------------------------------------------------------------------------
# The adapter on small generated games (coin collector level 3: a 3-room chain, 3-step walkthrough)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> TextWorldTasks:
    pytest.importorskip("textworld")
    return TextWorldTasks(
        spec=game_spec("tw-coin_collector", 3),
        cache_dir=tmp_path_factory.getbasetemp() / "textworld-games",  # shared by the session
        env_params=PARAMS,
        num_train_games=20,
        gen_workers=2,
        progress=False,
    )


@pytest.fixture(scope="session")
def train_tasks(source: TextWorldTasks) -> list[Task]:
    # One parallel batch (2 worker processes) for the 3 training games and 1 held-out game the
    # tests use (other TextWorld test modules use the same games from the same session cache);
    # the source's ``tasks`` calls below are then cache hits.
    seeds = [*split_seeds("train", 3, 0, source.num_train_games), HELD_OUT_SEED_START]
    results = source.cache.ensure(seeds, workers=2, progress=False)
    assert all(r.ok for r in results.values())
    return source.tasks("train", 3, seed=0)


def _walkthrough(task: Task) -> list[str]:
    env = TextWorldEnv(PARAMS, expert=True)
    _, info = env.reset(task)
    env.close()
    return list(info["walkthrough"])


def test_source_is_a_task_source_and_tasks_are_cached(
    source: TextWorldTasks, train_tasks: list[Task]
) -> None:
    assert isinstance(source, TaskSource) and isinstance(source.make_env(), Env)
    assert source.name == "textworld" and source.tools() == []
    for t in train_tasks:
        assert os.path.isfile(t.meta["game_file"]) and t.meta["generation_error"] is None
        assert t.meta["challenge"] == "tw-coin_collector" and t.meta["settings"] == {"level": 3}
        assert t.meta["seed"] < 20 and t.prompt  # objective read from the game's json
    again = source.tasks("train", 3, seed=0)  # cache hit: same tasks, nothing regenerated
    assert [t.task_id for t in again] == [t.task_id for t in train_tasks]
    assert source.num_generation_failures == 0


def test_train_and_test_tasks_are_disjoint(source: TextWorldTasks, train_tasks: list[Task]) -> None:
    test = source.tasks("test", 1, seed=0)
    assert test[0].meta["seed"] == HELD_OUT_SEED_START and test[0].meta["split"] == "test"
    assert not {t.task_id for t in test} & {t.task_id for t in train_tasks}


def test_walkthrough_wins_with_sparse_reward(train_tasks: list[Task]) -> None:
    task = train_tasks[0]
    walk = _walkthrough(task)
    assert len(walk) == 3 and walk[-1] == "take coin"  # level 3: 2 moves then take the coin
    env = TextWorldEnv(PARAMS)
    messages, info = env.reset(task)
    assert [m["role"] for m in messages] == ["user"]
    assert info["success"] is False and info["score"] == 0.0 and info["max_score"] == 1.0
    assert walk[0] in info["admissible_actions"] and info["anchor"] in messages[0]["content"]
    rewards = []
    for i, action in enumerate(walk):
        res = env.step(f"<think>step {i}</think><action>{action}</action>")
        rewards.append(res.reward)
        assert res.info["invalid_action"] is False and res.info["penalty"] == 0.0
    # Reward is 1 only on the winning (last) step; the game's score reaches its max.
    assert rewards == [0.0, 0.0, 1.0]
    assert res.terminated and not res.truncated and res.info["success"] is True
    assert res.info["score"] == res.info["max_score"] == 1.0
    with pytest.raises(RuntimeError, match="reset"):
        env.step("<action>look</action>")
    env.close()


def test_invalid_action_is_not_executed_and_costs_the_penalty(train_tasks: list[Task]) -> None:
    env = TextWorldEnv(PARAMS)
    _, info0 = env.reset(train_tasks[1])
    for text, parsed in [("<action>dance wildly</action>", "dance wildly"), ("go east", None)]:
        res = env.step(text)
        assert res.info["invalid_action"] is True and res.info["penalty"] == pytest.approx(0.1)
        # The penalty is reported, not paid out of the env reward; the episode goes on.
        assert res.info["action"] == parsed and res.reward == 0.0
        assert not res.terminated
        # State unchanged: same anchor, same admissible commands, same score.
        assert res.info["anchor"] == info0["anchor"]
        assert res.info["admissible_actions"] == info0["admissible_actions"]
        assert "No action was executed" in res.messages[0]["content"]
    assert res.info["steps"] == 2
    assert "Action 1: dance wildly\n" in res.messages[0]["content"]
    assert "Action 2: (no action)\n" in res.messages[0]["content"]
    env.close()


def test_numbered_actions_play_the_walkthrough_by_number(train_tasks: list[Task]) -> None:
    numbered = dataclasses.replace(PARAMS, numbered_actions=True)
    demos = walkthrough_demonstrations(train_tasks, numbered, random_action_rate=0.0, seed=0)
    for demo, task in zip(demos, train_tasks):
        assert demo.success  # the numbers name the walkthrough's commands
        assert all(re.fullmatch(r"<action>\d+</action>", t.target) for t in demo.turns)
        prompt = demo.turns[0].messages[0]["content"]
        k = int(demo.turns[0].target[len("<action>") : -len("</action>")])
        assert f"\n{k}. {_walkthrough(task)[0]}\n" in prompt
    env = TextWorldEnv(numbered)
    env.reset(train_tasks[0])
    res = env.step("<action>99</action>")  # no such number: refused like an inadmissible command
    assert res.info["invalid_action"] is True and res.info["action"] == "99"
    env.close()


def test_max_steps_truncates(train_tasks: list[Task]) -> None:
    env = TextWorldEnv(
        TextWorldParams(
            history_length=1, max_steps=2, invalid_action_penalty=0.0, numbered_actions=False
        )
    )
    env.reset(train_tasks[0])
    first = env.step("<action>look</action>")
    assert not first.truncated and not first.terminated
    second = env.step("<action>inventory</action>")
    assert second.truncated and not second.terminated and second.info["success"] is False
    env.close()


def test_unavailable_game_fails_the_episode(tmp_path: Any) -> None:
    pytest.importorskip("textworld")
    # Level 0 is outside TextWorld's range: generation fails, is counted, and the task's episode
    # raises at reset (the agent loop ends it as failed).
    bad = GameSpec(challenge="tw-coin_collector", settings=(("level", 0),))
    src = TextWorldTasks(
        spec=game_spec("tw-coin_collector", 1),
        cache_dir=tmp_path,
        env_params=PARAMS,
        num_train_games=5,
        gen_workers=1,
        progress=False,
    )
    src.spec, src.cache = bad, GameCache(tmp_path, bad)
    (task,) = src.tasks("train", 1, seed=0)
    assert task.meta["game_file"] is None and "level" in task.meta["generation_error"]
    assert src.num_generation_failures == 1
    with pytest.raises(TextWorldEpisodeError, match="unavailable"):
        src.make_env().reset(task)


def test_demonstrations_follow_the_walkthrough(train_tasks: list[Task]) -> None:
    demos = walkthrough_demonstrations(train_tasks, PARAMS, random_action_rate=0.0, seed=0)
    assert len(demos) == len(train_tasks)
    for demo, task in zip(demos, train_tasks):
        assert demo.success and all(t.expert for t in demo.turns)
        assert [t.target for t in demo.turns] == [
            f"<action>{a}</action>" for a in _walkthrough(task)
        ]
        assert all(len(t.messages) == 1 and t.messages[0]["role"] == "user" for t in demo.turns)
        assert "Current observation (step 1)" in demo.turns[0].messages[0]["content"]
    noisy = walkthrough_demonstrations(train_tasks, PARAMS, random_action_rate=1.0, seed=3)
    assert all(not t.expert for d in noisy for t in d.turns)
    mixed_a = walkthrough_demonstrations(train_tasks, PARAMS, random_action_rate=0.5, seed=5)
    mixed_b = walkthrough_demonstrations(train_tasks, PARAMS, random_action_rate=0.5, seed=5)
    assert [[t.target for t in d.turns] for d in mixed_a] == [
        [t.target for t in d.turns] for d in mixed_b
    ]
    with pytest.raises(ValueError, match="random_action_rate"):
        walkthrough_demonstrations(train_tasks, PARAMS, random_action_rate=1.5, seed=0)


# ---------------------------------------------------------------------------------------------
# Process pool
# ---------------------------------------------------------------------------------------------


class ScriptedEnv:
    """A fake env for pool failure tests: 'crash' kills the worker, 'hang' hangs, 'raise' raises."""

    def reset(self, task: Task, *, seed: int | None = None) -> tuple[list[Any], dict[str, Any]]:
        self.n = 0
        return [{"role": "user", "content": task.task_id}], {"pid": os.getpid()}

    def step(self, action_text: str) -> StepResult:
        if action_text == "crash":
            os._exit(3)
        if action_text == "hang":
            time.sleep(60)
        if action_text == "raise":
            raise RuntimeError("boom")
        self.n += 1
        return StepResult([], 0.0, self.n >= 3, False, {"n": self.n, "pid": os.getpid()})

    def close(self) -> None:
        pass


def test_pool_survives_crashes_errors_and_timeouts() -> None:
    tasks = [Task(task_id=f"t{i}", prompt="") for i in range(4)]
    # "fork" keeps worker start-up cheap for this pure-Python fake env.
    params = PoolParams(
        num_workers=2, envs_per_worker=2, timeout_s=2.0, startup_timeout_s=60.0, start_method="fork"
    )
    with ProcessEnvPool(ScriptedEnv, params) as pool:
        resets = pool.reset(tasks)
        assert [r.messages[0]["content"] for r in resets] == ["t0", "t1", "t2", "t3"]
        pids = [r.info["pid"] for r in resets]
        assert pids[0] == pids[1] != pids[2] == pids[3]  # slots 0,1 on worker 0; 2,3 on worker 1
        assert [r.info["n"] for r in pool.step(["a"] * 4)] == [1, 1, 1, 1]
        # Slot 0 crashes worker 0: slot 0 fails now, slot 1 (also on worker 0) at its next step.
        out = pool.step(["crash", None, "a", "a"])
        assert (
            out[0].terminated
            and out[0].info["success"] is False
            and "died" in out[0].info["env_error"]
        )
        assert out[1] is None and out[2].info["n"] == 2
        assert (pool.stats.crashes, pool.stats.restarts) == (2, 1)
        out = pool.step([None, "a", "raise", "a"])
        assert "died" in out[1].info["env_error"] and "boom" in out[2].info["env_error"]
        assert out[3].terminated and out[3].info["n"] == 3  # episode over after 3 steps
        assert pool.stats.env_errors == 1
        with pytest.raises(ValueError, match="slot 3 has no running episode"):
            pool.step([None, None, None, "a"])
        # The restarted worker serves new episodes; a hung call is cut at the timeout.
        resets = pool.reset(tasks[:2])
        assert resets[0].info["pid"] != pids[0] and resets[2] is None
        start = time.monotonic()
        out = pool.step(["hang", "a"])
        assert time.monotonic() - start < 60  # cut, not waited for: the hang sleeps 60 s
        assert "timeout" in out[0].info["env_error"] and "timeout" in out[1].info["env_error"]
        assert (pool.stats.timeouts, pool.stats.restarts) == (2, 2)
    with ProcessEnvPool(ScriptedEnv, params) as pool, pytest.raises(ValueError, match="slots"):
        pool.reset(tasks * 2)


def test_pool_plays_textworld_like_the_in_process_env(train_tasks: list[Task]) -> None:
    # Random admissible play in the pool gives exactly the in-process env's transcript.
    from functools import partial

    params = PoolParams(
        num_workers=2,
        envs_per_worker=2,
        timeout_s=30.0,
        startup_timeout_s=120.0,
        start_method="spawn",
    )
    tasks = [train_tasks[0], train_tasks[1], train_tasks[2], train_tasks[0]]
    rng = random.Random(0)
    scripts = [[rng.randrange(100) for _ in range(PARAMS.max_steps)] for _ in tasks]
    with ProcessEnvPool(partial(TextWorldEnv, PARAMS), params) as pool:
        resets = pool.reset(tasks)
        infos = [r.info for r in resets]
        transcripts: list[list[str]] = [[r.messages[0]["content"]] for r in resets]
        running = [True] * 4
        for t in range(PARAMS.max_steps):
            acts = [
                f"<action>{infos[i]['admissible_actions'][scripts[i][t] % len(infos[i]['admissible_actions'])]}</action>"
                if running[i]
                else None
                for i in range(4)
            ]
            for i, res in enumerate(pool.step(acts)):
                if res is not None:
                    transcripts[i].append(res.messages[0]["content"])
                    infos[i], running[i] = res.info, not (res.terminated or res.truncated)
            if not any(running):
                break
    for i, task in enumerate(tasks):
        env = TextWorldEnv(PARAMS)
        messages, info = env.reset(task)
        local = [messages[0]["content"]]
        for t in range(len(transcripts[i]) - 1):
            adm = info["admissible_actions"]
            res = env.step(f"<action>{adm[scripts[i][t] % len(adm)]}</action>")
            local.append(res.messages[0]["content"])
            info = res.info
        env.close()
        assert local == transcripts[i]


# ---------------------------------------------------------------------------------------------
# The packaged run config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", [None, "grpo", "drbot", "gigpo", "spear-gigpo"])
def test_textworld_run_config_loads_with_every_preset(preset: str | None) -> None:
    from pathlib import Path

    from spear.config import load_config

    path = Path(__file__).parents[2] / "spear" / "configs" / "textworld.yaml"
    cfg = load_config(preset=preset, file=path)
    assert cfg.preset == (preset or "spear") and cfg.task.name == "textworld"
    assert cfg.rollout.layout == "turn" and cfg.model.path is None
    # A turn needs room for the longest action reply; no invalid action is charged twice.
    assert cfg.rollout.max_response_tokens >= cfg.rollout.max_turns * cfg.rollout.max_new_tokens
    assert cfg.reward.invalid_call_penalty == 0.0
