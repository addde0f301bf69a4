"""TextWorld warm start: the demo source registry, demos from training games only, the random-action
mix, prompts identical to the env's, the cache key, and one tiny end-to-end build.

Games: coin collector level 3 (a chain of 3 rooms, 3-step walkthrough "go ..., go ..., take
coin"), the 3 training games tests/envs/test_textworld.py uses, from the session's game cache.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest

import spear.models.textworld_demos as twd
import spear.models.warmstart as ws
from spear.config import load_config
from spear.envs.base import Task
from spear.envs.textworld_env import Demonstration, DemoTurn, TextWorldEnv, TextWorldParams
from spear.envs.textworld_games import HELD_OUT_SEED_START, TextWorldMissingError, split_seeds
from spear.models.textworld_demos import TextWorldDemoParams, demo_conversations, demo_stats
from spear.models.warmstart import DEMO_SOURCES, WarmStartParams, key_fields
from spear.registry import UnknownNameError

POOL = 20  # training pool (seeds 0..19), as in tests/envs/test_textworld.py
TINY = [
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
    "model.tiny.vocab_size=400",
    "model.tiny.max_position_embeddings=768",
    "model.warm_start.steps=2",
    "model.warm_start.batch_size=4",
]


def _tw_overrides(cache: Path, n_demos: int, rate: float, layout: str = "turn") -> list[str]:
    return [
        "task.name=textworld",
        "task.challenge=tw-coin_collector",
        "task.textworld_level=3",
        f"task.game_cache_dir={cache}",
        f"task.textworld_train_games={POOL}",
        "task.textworld_gen_workers=2",
        f"rollout.layout={layout}",
        "rollout.max_turns=12",
        "rollout.history_length=2",
        f"model.warm_start.num_demos={n_demos}",
        f"model.warm_start.random_action_rate={rate}",
        *TINY,
    ]


def _turn(prompt: str, action: str, expert: bool = True) -> DemoTurn:
    return DemoTurn([{"role": "user", "content": prompt}], f"<action>{action}</action>", expert)


# ---------------------------------------------------------------------------------------------
# Pure parts (no TextWorld needed)
# ---------------------------------------------------------------------------------------------


def test_demo_conversations_turn_and_episode_layouts() -> None:
    demo = Demonstration("t", (_turn("p1", "go east"), _turn("p2", "take coin", False)), True)
    turn = demo_conversations(demo, "turn")
    assert [c.messages for c in turn] == [
        [
            {"role": "user", "content": "p1"},
            {"role": "assistant", "content": "<action>go east</action>"},
        ],
        [
            {"role": "user", "content": "p2"},
            {"role": "assistant", "content": "<action>take coin</action>"},
        ],
    ]
    assert all(c.tools is None for c in turn)  # TextWorld offers no tools
    (episode,) = demo_conversations(demo, "episode")
    assert [m["content"] for m in episode.messages] == [
        "p1", "<action>go east</action>", "p2", "<action>take coin</action>",
    ]  # fmt: skip
    assert demo_conversations(Demonstration("t", (), False), "episode") == []
    with pytest.raises(ValueError, match="layout"):
        demo_conversations(demo, "steps")


def test_demo_stats_counts() -> None:
    # 2 games (1 won), 5 turns of which 2 random: 0.5 won, 2/5 = 0.4 random.
    a = Demonstration("a", (_turn("x", "a"), _turn("x", "b", False), _turn("x", "c")), True)
    b = Demonstration("b", (_turn("x", "d", False), _turn("x", "e")), False)
    assert demo_stats([a, b]) == {
        "demo_games": 2.0,
        "demo_turns": 5.0,
        "demo_won_fraction": 0.5,
        "demo_random_turn_fraction": 0.4,
    }


def test_demo_source_registry_is_loud() -> None:
    assert DEMO_SOURCES.names() == ["arithmetic", "lookup", "scripted", "textworld"]
    with pytest.raises(UnknownNameError, match="warm-start demonstration source 'webshop'"):
        DEMO_SOURCES.get("webshop")


def test_arithmetic_cache_key_is_unchanged_by_the_registry() -> None:
    # The default run's warm model was cached as warm-42ef02306c951096 before sources existed;
    # "source" is left out of arithmetic keys so that cache stays valid.
    params = WarmStartParams.from_config(load_config(file="spear/configs/default.yaml"))
    assert params.source == "arithmetic" and "source" not in key_fields(params)
    assert params.cache_key(0) == "42ef02306c951096"


def _demo_params(**change: Any) -> TextWorldDemoParams:
    base = TextWorldDemoParams(
        challenge="tw-coin_collector",
        settings=(("level", 3),),
        level=3,
        textworld_version="1.7.0",
        env=TextWorldParams(
            history_length=2, max_steps=12, invalid_action_penalty=0.1, numbered_actions=False
        ),
        num_train_games=POOL,
        layout="turn",
        random_action_rate=0.3,
        game_cache_dir="/a",
        gen_workers=2,
    )
    return dataclasses.replace(base, **change)


def test_textworld_cache_key_follows_the_settings_not_the_paths() -> None:
    arith = WarmStartParams.from_config(load_config(overrides=TINY))
    params = dataclasses.replace(arith, source="textworld", task=_demo_params())
    key = params.cache_key(0)
    assert key != arith.cache_key(0)

    def with_task(**change: Any) -> str:
        return dataclasses.replace(params, task=_demo_params(**change)).cache_key(0)

    # Where games are cached and how many processes generate them do not change the model.
    assert with_task(game_cache_dir="/elsewhere", gen_workers=7) == key
    env = TextWorldParams(
        history_length=2, max_steps=12, invalid_action_penalty=0.1, numbered_actions=False
    )
    variants = [
        with_task(challenge="tw-treasure_hunter"),
        with_task(level=4, settings=(("level", 4),)),
        with_task(textworld_version="1.6.2"),
        with_task(env=dataclasses.replace(env, history_length=1)),
        with_task(env=dataclasses.replace(env, max_steps=20)),
        with_task(num_train_games=POOL + 1),
        with_task(layout="episode"),
        with_task(random_action_rate=0.5),
        dataclasses.replace(params, num_demos=params.num_demos + 1).cache_key(0),
        params.cache_key(1),
    ]
    assert len({key, *variants}) == 1 + len(variants)
    assert "game_cache_dir" not in key_fields(params)["task"]


def test_demo_params_validation() -> None:
    with pytest.raises(ValueError, match="random_action_rate"):
        _demo_params(random_action_rate=1.2)
    with pytest.raises(ValueError, match="layout"):
        _demo_params(layout="steps")
    with pytest.raises(Exception, match="random_action_rate"):
        load_config(overrides=["model.warm_start.random_action_rate=-0.1"])


def test_missing_textworld_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "textworld", None)
    cfg = load_config(overrides=_tw_overrides(Path("/nonexistent"), 4, 0.3))
    with pytest.raises(TextWorldMissingError) as err:
        WarmStartParams.from_config(cfg)
    assert str(err.value) == "TextWorld is not installed: run pip install 'spear[textworld]'"
    assert isinstance(err.value, RuntimeError)  # the CLI prints RuntimeErrors as one line


# ---------------------------------------------------------------------------------------------
# On generated games
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("textworld")
    return tmp_path_factory.getbasetemp() / "textworld-games"  # shared by the session


def _params(cache: Path, n_demos: int, rate: float, layout: str = "turn") -> WarmStartParams:
    return WarmStartParams.from_config(
        load_config(overrides=_tw_overrides(cache, n_demos, rate, layout))
    )


@pytest.fixture(scope="module")
def played(cache: Path) -> tuple[list[Task], list[Demonstration]]:
    """The tasks and demos of ``make_textworld_demos`` with 3 games at random-action rate 0.3."""
    real = twd.walkthrough_demonstrations
    seen: list[Any] = []

    def spy(tasks: list[Task], *args: Any, **kw: Any) -> list[Demonstration]:
        demos = real(tasks, *args, **kw)
        seen.append((list(tasks), demos))
        return demos

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(twd, "walkthrough_demonstrations", spy)
        convs, stats = twd.make_textworld_demos(_params(cache, 3, 0.3), seed=0)
    ((tasks, demos),) = seen
    assert len(convs) == sum(len(d.turns) for d in demos) == stats["demo_turns"]
    return tasks, demos


def test_demos_come_from_training_seeds_only(played: Any) -> None:
    tasks, _ = played
    seeds = [t.meta["seed"] for t in tasks]
    # Exactly the training split's first draw, every seed below the pool size (20) and so far
    # below the first held-out seed (1,000,000).
    assert seeds == split_seeds("train", 3, 0, POOL)
    assert all(t.meta["split"] == "train" and 0 <= s < POOL for t, s in zip(tasks, seeds))
    assert max(seeds) < HELD_OUT_SEED_START


def test_random_action_rate_is_honoured(played: Any) -> None:
    tasks, _ = played
    params = TextWorldParams(
        history_length=2, max_steps=12, invalid_action_penalty=0.1, numbered_actions=False
    )
    expert = twd.walkthrough_demonstrations(tasks, params, random_action_rate=0.0, seed=0)
    assert all(d.success and all(t.expert for t in d.turns) for d in expert)
    assert [len(d.turns) for d in expert] == [3, 3, 3]  # the 3-step walkthrough, nothing else
    noisy = twd.walkthrough_demonstrations(tasks, params, random_action_rate=1.0, seed=0)
    assert all(not t.expert for d in noisy for t in d.turns)
    mixed = [
        d
        for seed in range(6)
        for d in twd.walkthrough_demonstrations(tasks, params, random_action_rate=0.3, seed=seed)
    ]
    flags = [t.expert for d in mixed for t in d.turns]
    frac = flags.count(False) / len(flags)
    # Each turn is random with probability 0.3, independently; with >= 54 turns (18 games of at
    # least 3) a fraction outside [0.12, 0.48] would be a > 3-sigma event.
    assert len(flags) >= 54 and 0.12 <= frac <= 0.48
    assert any(not d.success or len(d.turns) > 3 for d in mixed)  # the noise costs something


def test_demo_prompts_are_exactly_the_env_prompts(played: Any) -> None:
    # Replaying a demo's actions in a fresh env reproduces every prompt the demo trains on.
    tasks, demos = played
    params = TextWorldParams(
        history_length=2, max_steps=12, invalid_action_penalty=0.1, numbered_actions=False
    )
    env = TextWorldEnv(params)
    for task, demo in zip(tasks, demos):
        messages, _ = env.reset(task)
        for turn in demo.turns:
            assert turn.messages == messages
            messages = env.step(turn.target).messages
    env.close()


def test_tiny_textworld_warm_model_builds_and_reports(cache: Path) -> None:
    params = _params(cache, 3, 0.3)
    assert params.source == "textworld" and isinstance(params.task, TextWorldDemoParams)
    path = ws.ensure_warm_model(cache / "models", params, seed=0)
    report = json.loads((path / ws.REPORT_FILE).read_text())
    assert report["demo_games"] == 3.0 and report["demo_generation_failures"] == 0.0
    assert report["demo_conversations"] == report["demo_turns"]  # turn layout: one per turn
    assert report["params"]["task"]["challenge"] == "tw-coin_collector"
    assert 0 < report["demo_tokens_max"] <= 768
