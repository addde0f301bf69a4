"""benchmarks/textworld_failures.py reads a greedy TextWorld game's first move and its end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from spear.envs.textworld_env import build_turn_prompt

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "textworld_failures.py"
sys.path.insert(0, str(_PATH.parent))  # the script imports its sibling failures_common
_spec = importlib.util.spec_from_file_location("textworld_failures", _PATH)
assert _spec is not None and _spec.loader is not None
tf = importlib.util.module_from_spec(_spec)
sys.modules["textworld_failures"] = tf  # its dataclass looks its module up
_spec.loader.exec_module(tf)

GOAL = "Welcome! First stop, head west. Then, take the coin from the floor of the studio."


def _prompt(commands: list[str], numbered: bool = True) -> str:
    return build_turn_prompt(
        objective=GOAL, observation="-= Cellar =-", admissible=commands, history=[],
        history_length=2, numbered=numbered,
    )  # fmt: skip


START = ["go east", "go west", "inventory", "look"]
ROOM = ["examine coin", "go east", "inventory", "look", "take coin"]


def test_admissible_maps_numbers_and_texts_to_commands() -> None:
    assert tf.admissible(_prompt(START))["2"] == "go west"
    assert tf.admissible(_prompt(START))["look"] == "look"
    assert "2" not in tf.admissible(_prompt(START, numbered=False))


@pytest.mark.parametrize(
    ("replies", "won", "first", "end"),
    [
        (["<action>2</action>", "<action>5</action>"], True, "right", "won"),
        (["<action>go west</action>", "<action>1</action>"], False, "right", "lost"),
        (["<action>1</action>"] * 4, False, "wrong", "timed out"),
        (["<action>4</action>", "<action>9</action>"], False, "no move", "lost"),
        (["no tag"], False, "no move", "lost"),
    ],
)
def test_record_game(replies: list[str], won: bool, first: str, end: str) -> None:
    prompts = [_prompt(START)] + [_prompt(ROOM)] * (len(replies) - 1)
    rec = tf.record_game(GOAL, prompts, replies, won, max_turns=4)
    assert (rec.first_move, rec.end) == (first, end)
    assert rec.chance == 0.5  # two go commands on turn 1


def test_record_game_names_inadmissible_answers_and_summarises() -> None:
    prompts = [_prompt(START), _prompt(ROOM)]
    rec = tf.record_game(GOAL, prompts, ["<action>2</action>", "<action>9</action>"], False, 8)
    assert rec.commands == ("go west", "?9")
    summary = tf.summarise(
        [rec, tf.record_game(GOAL, prompts[:1], ["<action>1</action>"], False, 1)]
    )
    assert summary["games"] == 2 and summary["won"] == 0
    assert summary["first_move_right"] == 1 and summary["first_move_right_by_chance"] == 1.0
    assert summary["outcomes"] == {"right first move, lost": 1, "wrong first move, timed out": 1}
    assert summary["commands"] == {"go": 2, "?9": 1}
