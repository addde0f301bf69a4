"""Where a TextWorld policy fails: greedy games sorted by their first move and how they ended.

Plays ``--games`` greedy episodes of a split (default: ``validation``) with the warm model of the
TextWorld run config (plus overrides), or with a trained checkpoint, through the trainer's own
rollout path. For each game it reads, from the turn prompts, the direction the goal names first
("First stop, head west ...") and the move the policy made on turn 1, and records how the game
ended:

- ``first move``: ``right`` (the goal's first direction), ``wrong`` (another move) or ``no move``
  (an action that is not a ``go``: look, inventory, an inadmissible number, ...);
- ``end``: ``won``, ``lost`` (the game ended without a win, e.g. by taking a wrong object) or
  ``timed out`` (``rollout.max_turns`` moves without an end).

It also reports the number of first moves a policy that ignores the goal would get right by
chance (the sum over games of 1 / the number of ``go`` commands on turn 1), so one can see
whether the policy reads the goal at all, and how often each kind of command was played.

    python benchmarks/textworld_failures.py task.textworld_numbered_actions=true \\
        task.textworld_train_games=600 --out benchmarks/results/textworld_failures/warm.json
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from failures_common import emit, greedy_episodes, parser, policy_config

from spear.envs.textworld_env import parse_action

_DIRECTION = re.compile(r"\b(north|south|east|west)\b")
_ADMISSIBLE = re.compile(r"^(?:(\d+)\.|-) (.+)$", re.MULTILINE)


@dataclass(frozen=True)
class GameRecord:
    first_move: str  # "right", "wrong" or "no move"
    end: str  # "won", "lost" or "timed out"
    chance: float  # 1 / number of go commands on turn 1 (0 when there is none)
    commands: tuple[str, ...]  # the command played each turn ("?" + answer when not admissible)


def admissible(prompt: str) -> dict[str, str]:
    """Answer -> command of a turn prompt's admissible list (numbered ``1. go east`` entries are
    reachable by their number and their text, ``- go east`` entries by their text)."""
    listed = prompt.split("Admissible actions:")[-1]
    out: dict[str, str] = {}
    for number, command in _ADMISSIBLE.findall(listed):
        out[command.strip()] = command.strip()
        if number:
            out[number] = command.strip()
    return out


def record_game(
    goal: str, prompts: list[str], replies: list[str], won: bool, max_turns: int
) -> GameRecord:
    """Classify one greedy game (pure): ``prompts[t]`` is turn t's user message and
    ``replies[t]`` the model's reply to it."""
    commands = []
    for prompt, reply in zip(prompts, replies):
        answer = parse_action(reply) or ""  # the env's own reading of a reply
        commands.append(admissible(prompt).get(answer, f"?{answer}"))
    first_dir = _DIRECTION.search(goal)
    first = commands[0] if commands else ""
    if not first.startswith("go "):
        first_move = "no move"
    elif first_dir is not None and first == f"go {first_dir.group(1)}":
        first_move = "right"
    else:
        first_move = "wrong"
    moves = {c for c in admissible(prompts[0]).values() if c.startswith("go ")} if prompts else ()
    end = "won" if won else ("timed out" if len(commands) >= max_turns else "lost")
    return GameRecord(first_move, end, 1.0 / len(moves) if moves else 0.0, tuple(commands))


def play(overrides: list[str], checkpoint: Path | None, split: str, n: int) -> list[GameRecord]:
    """``n`` greedy games of ``split``, recorded."""
    cfg = policy_config(
        "textworld", checkpoint, [*overrides, f"eval.split={split}", f"eval.num_tasks={n}"]
    )
    _tasks, episodes, decode = greedy_episodes(cfg)
    records = []
    for e in episodes:
        prompts, replies = [], []
        for s in e.samples:
            ids, mask = s.input_ids.tolist(), s.loss_mask.tolist()
            start = mask.index(True) if True in mask else len(ids)
            prompts.append(decode(ids[:start]).rsplit("<|im_start|>user", 1)[-1])
            replies.append(decode([i for i, m in zip(ids, mask) if m]))
        goal = re.search(r"Goal: (.*)", prompts[0]) if prompts else None
        records.append(
            record_game(
                goal.group(1) if goal else "", prompts, replies, e.success, cfg.rollout.max_turns
            )
        )
    return records


def summarise(records: list[GameRecord]) -> dict[str, object]:
    outcomes = Counter(f"{r.first_move} first move, {r.end}" for r in records)
    return {
        "games": len(records),
        "won": sum(r.end == "won" for r in records),
        "first_move_right": sum(r.first_move == "right" for r in records),
        "first_move_right_by_chance": round(sum(r.chance for r in records), 1),
        "outcomes": dict(sorted(outcomes.items())),
        "commands": dict(
            Counter(
                c.split()[0] if c.split() else c for r in records for c in r.commands
            ).most_common()
        ),
    }


def main() -> None:
    ap = parser(__doc__, split="validation", count="games", n=48)
    ap.add_argument("overrides", nargs="*", help="section.key=value on the textworld run config")
    args = ap.parse_args()
    summary = summarise(play(args.overrides, args.checkpoint, args.split, args.games))
    record = {
        "overrides": args.overrides,
        "checkpoint": str(args.checkpoint or ""),
        "split": args.split,
        **summary,
    }
    emit(record, args.out)


if __name__ == "__main__":
    main()
