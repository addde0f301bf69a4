"""Bad input on TextWorld through the real agent loop: a game that failed to generate and an
interpreter that crashes mid-episode each end their own episode as failed (counted as
``env_error``) while the other episodes of the batch play on; an invalid action's penalty lands on
its own turn; games start safely from many threads at once (the loop's thread pool). Games: coin
collector level 3 (3-step walkthrough), from the session's game cache.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from spear.envs.base import Task
from spear.envs.textworld_env import TextWorldEnv, TextWorldParams, TextWorldTasks
from spear.envs.textworld_games import game_spec
from spear.models.tokenizer import Conversation, TokenizerParams, train_tokenizer
from spear.rollout.engine import Generation, SamplingParams
from spear.rollout.loop import LoopParams, run_episodes
from spear.stages import episode_metrics
from spear.types import EndReason

PARAMS = TextWorldParams(
    history_length=2, max_steps=4, invalid_action_penalty=0.1, numbered_actions=False
)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> list[Task]:
    pytest.importorskip("textworld")
    src = TextWorldTasks(
        spec=game_spec("tw-coin_collector", 3),
        cache_dir=tmp_path_factory.getbasetemp() / "textworld-games",  # shared by the session
        env_params=PARAMS,
        num_train_games=20,  # the pool and seeds of test_textworld.py: the same cached games
        gen_workers=2,
        progress=False,
    )
    return src.tasks("train", 2, seed=0)


class CrashingEnv(TextWorldEnv):
    """A TextWorld env whose interpreter dies on the first command of a ``crash`` task."""

    def reset(self, task: Task, *, seed: int | None = None) -> tuple[list[Any], dict[str, Any]]:
        out = super().reset(task, seed=seed)
        if task.meta.get("crash"):

            def dead(command: str) -> Any:
                raise OSError("the Z-machine interpreter exited")

            self._game.step = dead
        return out


@dataclasses.dataclass
class FixedEngine:
    """Answers every prompt with the same token ids (log-prob -0.1 each)."""

    ids: list[int]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        generator: torch.Generator | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        return [Generation(list(self.ids), [-0.1] * len(self.ids), "stop") for _ in prompts]

    def update_weights(self, model: Any = None) -> None:
        return None


def _play(tasks: list[Task], reply: str) -> list[Any]:
    tok = train_tokenizer(
        [
            Conversation(
                [{"role": "user", "content": "go"}, {"role": "assistant", "content": reply}], None
            )
        ],
        TokenizerParams(vocab_size=300),
    )
    ids = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    params = LoopParams(
        max_turns=PARAMS.max_steps,
        max_response_tokens=200,
        max_context_tokens=100_000,
        layout="turn",
        history_length=PARAMS.history_length,
        sampling=SamplingParams(
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            max_new_tokens=40,
            stop_token_ids=None,
            stop_strings=None,
        ),
        env_step_timeout_s=30.0,
    )
    return run_episodes(
        FixedEngine(ids), tok, lambda: CrashingEnv(PARAMS), tasks, group_size=1, params=params,
        step=1, first_group_id=0, first_episode_id=0,
    )  # fmt: skip


def test_failed_generation_and_crash_fail_only_their_episodes(tasks: list[Task]) -> None:
    ok, crash_base = tasks
    missing = Task("never-generated", "", meta={"game_file": None, "generation_error": "boom"})
    crash = dataclasses.replace(crash_base, meta={**crash_base.meta, "crash": True})
    episodes = _play([ok, missing, crash], "<action>look</action>")
    assert [e.end_reason for e in episodes] == [
        EndReason.TERMINATED,  # 4 x "look": truncated by the game's step limit, not a win
        EndReason.ENV_ERROR,  # failed at reset: the game was never generated
        EndReason.ENV_ERROR,  # failed at its first step: the interpreter died
    ]
    assert episodes[0].num_turns == 4 and not episodes[0].success
    assert "unavailable: boom" in episodes[1].info["env_error"]
    assert "interpreter exited" in episodes[2].info["env_error"] and episodes[2].num_turns == 1
    assert not any(e.success for e in episodes)
    m = episode_metrics(episodes, "train")
    assert m["train/end_env_error"] == pytest.approx(2 / 3)
    assert m["train/end_terminated"] == pytest.approx(1 / 3)


def test_invalid_action_penalty_lands_on_its_turn(tasks: list[Task]) -> None:
    (episode,) = _play(tasks[:1], "<action>dance wildly</action>")
    # Never executed: 4 turns, each costing 0.1 on its own sample; no env reward, outcome 0.
    assert [s.turn_penalty for s in episode.samples] == pytest.approx([0.1] * 4)
    assert [s.turn_reward for s in episode.samples] == [0.0] * 4
    assert episode.outcome_reward == 0.0
    assert episode.end_reason is EndReason.TERMINATED
    # counted as the game's inadmissible actions, not as invalid tool calls
    assert episode.num_invalid_actions == 4 and episode.num_invalid_tool_calls == 0
    m = episode_metrics([episode], "train")
    assert m["train/invalid_actions"] == 4.0 and m["train/invalid_tool_calls"] == 0.0


_THREADED_STARTS = """
import sys
from concurrent.futures import ThreadPoolExecutor
from spear.envs.textworld_env import TextWorldEnv, TextWorldParams
from spear.envs.base import Task

files = sys.argv[1:]
def start(path):
    env = TextWorldEnv(TextWorldParams(history_length=2, max_steps=4, invalid_action_penalty=0.1, numbered_actions=False))
    try:
        env.reset(Task("t", "", meta={"game_file": path}))
        return "ok"
    except Exception as e:
        return repr(e)[:200]
    finally:
        env.close()
with ThreadPoolExecutor(8) as pool:
    print("|".join(pool.map(start, files * 4)))
"""


def test_games_start_concurrently_in_threads_of_a_fresh_process(tasks: list[Task]) -> None:
    # TextWorld's logic parser is not thread-safe: without TextWorldEnv's start lock, 8 games
    # started at once by threads of a fresh process all fail with parse errors.
    files = [str(t.meta["game_file"]) for t in tasks]
    out = subprocess.run(
        [sys.executable, "-c", _THREADED_STARTS, *files],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert out.stdout.strip().split("|") == ["ok"] * 8
