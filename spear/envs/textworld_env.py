"""TextWorld text games as a spear :class:`~spear.envs.base.Env` and :class:`TaskSource`.

Episode protocol (ALFWorld-style, one user message per turn): every turn the model sees the task
objective, the last ``history_length`` observation/action pairs, the current observation and the
admissible commands (:func:`build_turn_prompt`), and answers one admissible command inside
``<action>...</action>``, optionally after ``<think>...</think>`` (:func:`parse_action`). A reply
without an action, or with a command that is not admissible, is *not* executed: the game state
is unchanged, the turn's reward is 0 and it costs ``info["penalty"] = invalid_action_penalty``
(with ``info["invalid_action"] = True``). The penalty is not an env reward: it never enters the
episode's outcome, the trainer subtracts it from the offending turn's sample only (its score,
and under GiGPO its own step return, undiscounted), as the reference does (§5.1, §5.3): the
credit for a wasted turn goes to that turn, not to the turns before it or the whole episode.
(In the episode layout the one sample holds every turn and pays their sum.) The reward is
sparse: 1.0 on the winning step, else 0.0; TextWorld's own score is kept as a metric
(``info["score"]``, ``info["max_score"]``).
The agent loop counts such turns as inadmissible actions (``Episode.num_invalid_actions``,
metric ``*/invalid_actions``), apart from invalid tool calls, so ``reward.invalid_call_penalty``
does not charge them.
After ``max_steps`` actions (valid or not) an unfinished episode is truncated. ``info`` also
carries ``"admissible_actions"``, ``"anchor"`` (the raw observation of the current game state,
for GiGPO; invalid turns leave it unchanged because the state did not change) and
``"success"`` (won).

A game that failed to generate (``task.meta["game_file"]`` is None) or an interpreter that
crashes raises :class:`TextWorldEpisodeError` from ``reset``/``step``; the agent loop ends that
episode as failed (ENV_ERROR) and training goes on. Batches of games step concurrently in
worker processes with :class:`~spear.envs.textworld_games.ProcessEnvPool`.

ALFWorld (not run here: ALFWorld and its data are not installed on this machine)
--------------------------------------------------------------------------------
ALFWorld's text games are TextWorld games: ``alfworld-download`` puts, for every trial,
``$ALFWORLD_DATA/json_2.1.1/<split>/<task-type>-.../trial_.../game.tw-pddl`` (a JSON holding the
PDDL domain, the PDDL problem, the text grammar and a ``solvable`` flag); ALFWorld's
``AlfredTWEnv`` keeps the solvable ones and plays them with ``textworld`` (``.tw-pddl`` files go
to TextWorld's ``PddlEnv`` backend, which needs ``pip install 'textworld[pddl]'`` for
``fast_downward``), wrapped in ALFWorld's ``AlfredDemangler`` (readable object names such as
"fridge 1") and ``AlfredInfos`` (the game file in ``info``). The same adapter plays them::

    from spear.envs.textworld_env import TextWorldEnv, alfworld_tasks, alfworld_wrappers
    tasks = alfworld_tasks(os.environ["ALFWORLD_DATA"], "valid_unseen")
    env = TextWorldEnv(params, wrappers=alfworld_wrappers())
    messages, info = env.reset(tasks[0])

Requirements: ``pip install alfworld 'textworld[pddl]'`` and ``alfworld-download``. ``PddlEnv``
reports no objective and no score: the objective is read from the first observation ("Your task
is to: ..."), ``info["score"]`` is 1 once won and ``info["max_score"]`` is 0. ``PddlEnv`` answers
``policy_commands`` by re-planning, so :func:`walkthrough_demonstrations` should also work on
ALFWorld games (untested). TextWorld >= 1.7 dropped Glulx (``.ulx``): the older ``.ulx`` ALFWorld
release needs TextWorld < 1.7.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spear.envs.base import StepResult, Task
from spear.envs.textworld_games import (
    GameCache,
    GameSpec,
    GenerationResult,
    game_spec,
    require_textworld,
    split_seeds,
)
from spear.types import Message

log = logging.getLogger(__name__)

WIN_REWARD = 1.0  # sparse outcome reward of a won game (the spec's "reward 1 on a win")

_ACTION_RE = re.compile(r"<action>(.*?)</action>", re.IGNORECASE | re.DOTALL)
_BANNER_RE = re.compile(r"^[\s_|\\/$<>]*[_|\\/$][\s_|\\/$<>]*$")  # TextWorld's ASCII-art title
_OBJECTIVE_RE = re.compile(r"Your task is to:\s*(.+)")
_BOILERPLATE = ("Would you like to RESTART, RESTORE a saved game",)
_HIDDEN_COMMANDS = frozenset({"help"})
# TextWorld parses a game's logic with a shared parser that is not thread-safe: games started
# concurrently in threads of one process (the agent loop steps envs in a thread pool) fail with
# parse errors. Starting (and resetting) a game holds this lock; steps run concurrently.
_START_LOCK = threading.Lock()


class TextWorldEpisodeError(RuntimeError):
    """A game could not be started or its interpreter failed: the episode counts as failed."""


@dataclass(frozen=True, slots=True)
class TextWorldParams:
    """Episode settings of :class:`TextWorldEnv` (defaults live in ``spear.config``)."""

    history_length: int  # observation/action pairs shown in the prompt (reference: 2)
    max_steps: int  # actions (valid or not) before an unfinished episode is truncated
    invalid_action_penalty: float  # >= 0, charged for a missing or inadmissible action
    # the prompt numbers the admissible commands and an answer may be a number: <action>3</action>
    # plays the third (an admissible command's text is still accepted)
    numbered_actions: bool

    def __post_init__(self) -> None:
        if self.history_length < 0:
            raise ValueError(f"history_length must be >= 0, got {self.history_length}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.invalid_action_penalty < 0:
            raise ValueError(
                f"invalid_action_penalty must be >= 0, got {self.invalid_action_penalty}"
            )


# --------------------------------------------------------------------------------------------
# Pure text functions
# --------------------------------------------------------------------------------------------


def parse_action(text: str) -> str | None:
    """The command inside the first ``<action>...</action>`` of ``text``, normalised.

    Normalisation: surrounding whitespace and quotes stripped, lower-cased, inner whitespace
    collapsed. Returns None when there is no (non-empty) action tag.
    """
    m = _ACTION_RE.search(text)
    if m is None:
        return None
    action = " ".join(m.group(1).strip().strip("'\"`").split()).lower()
    return action or None


def clean_observation(raw: str) -> str:
    """TextWorld feedback without the ASCII title, input prompts, status line and boilerplate."""
    kept: list[str] = []
    for line in raw.splitlines():
        s = line.strip()
        if s and (_BANNER_RE.match(s) or s.startswith(">") or s.startswith(_BOILERPLATE)):
            continue
        if s or (kept and kept[-1]):
            kept.append(s)
    return "\n".join(kept).strip()


def extract_objective(objective: str | None, first_observation: str) -> str:
    """The game's objective, else ALFWorld's "Your task is to: ..." line, else ""."""
    if objective and objective.strip():
        return objective.strip()
    m = _OBJECTIVE_RE.search(first_observation)
    return m.group(1).strip() if m else ""


def build_turn_prompt(
    *,
    objective: str,
    observation: str,
    admissible: Sequence[str],
    history: Sequence[tuple[str, str]],
    history_length: int,
    numbered: bool = False,
) -> str:
    """The user message of one turn (pure).

    ``history`` holds every (observation, action) pair of the episode so far, oldest first; only
    the last ``history_length`` are shown, numbered by their step in the episode. ``numbered``
    lists the admissible actions as ``1. go north`` and asks for a number.
    """
    steps = len(history)
    lines = [
        "You are playing a text adventure game.",
        f"Goal: {objective or '(discover it by exploring)'}",
    ]
    shown = list(history[-history_length:]) if history_length > 0 else []
    if steps:
        lines.append(f"Steps taken so far: {steps}.")
    if shown:
        lines.append("Most recent observations and the actions you took:")
        for i, (obs, act) in enumerate(shown, start=steps - len(shown) + 1):
            lines += [f"Observation {i}: {obs}", f"Action {i}: {act}"]
    lines += [f"Current observation (step {steps + 1}):", observation, "Admissible actions:"]
    if numbered:
        lines += [f"{i}. {a}" for i, a in enumerate(admissible, start=1)]
        ask = "Reply with the number of one admissible action inside <action></action>. "
    else:
        lines += [f"- {a}" for a in admissible]
        ask = "Reply with exactly one admissible action inside <action></action>. "
    lines.append(ask + "You may reason briefly inside <think></think> before it.")
    return "\n".join(lines)


def resolve_action(action: str | None, admissible: Sequence[str], numbered: bool) -> str | None:
    """The command an answer names (pure): with ``numbered``, ``"k"`` for ``1 <= k <=
    len(admissible)`` is the k-th admissible command; anything else is returned unchanged (an
    admissible command's text, or an answer the env will refuse)."""
    if numbered and action is not None and action.isdigit() and 1 <= int(action) <= len(admissible):
        return admissible[int(action) - 1]
    return action


def invalid_action_feedback(action: str | None, observation: str) -> str:
    """The observation shown after a turn whose action was missing or inadmissible."""
    if action is None:
        head = "No action was executed: put one admissible action inside <action></action>."
    else:
        head = f"No action was executed: {action!r} is not an admissible action."
    return f"{head}\n{observation}"


# --------------------------------------------------------------------------------------------
# The env
# --------------------------------------------------------------------------------------------


class TextWorldEnv:
    """One TextWorld game at a time behind spear's Env protocol (see the module docstring).

    ``wrappers`` are TextWorld wrappers passed to ``textworld.start`` (ALFWorld needs its own);
    ``expert=True`` additionally puts TextWorld's walkthrough (``info["walkthrough"]``) and
    current optimal plan (``info["expert_plan"]``) in ``info`` (used for demonstrations).
    ``reset``'s ``seed`` is unused: generated games are deterministic.
    """

    def __init__(
        self,
        params: TextWorldParams,
        *,
        wrappers: Sequence[Callable[..., Any]] = (),
        expert: bool = False,
    ) -> None:
        self.params = params
        self._wrappers = list(wrappers)
        self._expert = expert
        self._game: Any = None
        self._done = True
        self._objective = ""
        self._observation = ""  # what the model saw this turn
        self._anchor = ""  # last raw game observation (GiGPO anchor)
        self._history: list[tuple[str, str]] = []
        self._steps = 0
        self._state: Any = None

    # -- protocol --------------------------------------------------------------------------

    def reset(self, task: Task, *, seed: int | None = None) -> tuple[list[Message], dict[str, Any]]:
        game_file = task.meta.get("game_file")
        if not game_file:
            reason = task.meta.get("generation_error") or "task.meta has no 'game_file'"
            raise TextWorldEpisodeError(f"game of task {task.task_id} is unavailable: {reason}")
        self.close()
        textworld = require_textworld()
        infos = textworld.EnvInfos(
            admissible_commands=True, won=True, lost=True, score=True, max_score=True,
            objective=True, policy_commands=self._expert,
            extras=["walkthrough"] if self._expert else [],
        )  # fmt: skip
        try:
            with _START_LOCK, warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not fully supported.*")  # jericho
                self._game = textworld.start(
                    str(game_file), request_infos=infos, wrappers=self._wrappers
                )
                self._state = self._game.reset()
        except Exception as e:
            self._game = None
            raise TextWorldEpisodeError(
                f"could not start {game_file}: {type(e).__name__}: {e}"
            ) from e
        first = clean_observation(self._state.feedback or "")
        self._objective = extract_objective(self._state.get("objective") or task.prompt, first)
        if self._objective and self._objective in first:
            first = first.replace(self._objective, "").strip()
        self._observation = self._anchor = first
        self._history, self._steps, self._done = [], 0, False
        return self._messages(), self._info(invalid=False, action=None)

    def step(self, action_text: str) -> StepResult:
        if self._done or self._game is None:
            raise RuntimeError("TextWorldEnv.step called without a running episode; call reset()")
        admissible = self._admissible()
        action = resolve_action(parse_action(action_text), admissible, self.params.numbered_actions)
        self._steps += 1
        seen = self._observation
        valid = action is not None and action in admissible
        terminated, reward = False, 0.0
        if valid:
            try:
                self._state, _, game_over = self._game.step(action)
            except Exception as e:
                self._done = True
                raise TextWorldEpisodeError(
                    f"TextWorld crashed on {action!r}: {type(e).__name__}: {e}"
                ) from e
            self._observation = self._anchor = clean_observation(self._state.feedback or "")
            won = bool(self._state.get("won"))
            terminated = bool(game_over or won or self._state.get("lost"))
            reward = WIN_REWARD if won else 0.0
        else:
            self._observation = invalid_action_feedback(action, self._anchor)  # info["penalty"]
        self._history.append((seen, action if action is not None else "(no action)"))
        truncated = not terminated and self._steps >= self.params.max_steps
        self._done = terminated or truncated
        info = self._info(invalid=not valid, action=action)
        return StepResult(self._messages(), reward, terminated, truncated, info)

    def format_turn_prompt(self, ctx: Any) -> list[Message]:
        """Turn-layout hook of :func:`spear.rollout.loop.run_episodes` (``ctx``: its
        ``TurnContext``): this env's observation already is the whole turn prompt (objective,
        last k observation/action pairs, current observation, admissible actions), so the
        prompt is the reset messages at turn 0 and the latest observation messages after."""
        return list(ctx.first_messages if ctx.turn_index == 0 else ctx.observation)

    def close(self) -> None:
        if self._game is not None:
            try:
                self._game.close()
            except Exception:  # closing a crashed interpreter must not mask the original error
                log.debug("error while closing a TextWorld game", exc_info=True)
            self._game = None
        self._done = True

    # -- helpers -----------------------------------------------------------------------------

    def _admissible(self) -> list[str]:
        cmds = self._state.get("admissible_commands") or []
        return [c for c in cmds if c not in _HIDDEN_COMMANDS]

    def _messages(self) -> list[Message]:
        prompt = build_turn_prompt(
            objective=self._objective,
            observation=self._observation,
            admissible=self._admissible(),
            history=self._history,
            history_length=self.params.history_length,
            numbered=self.params.numbered_actions,
        )
        return [{"role": "user", "content": prompt}]

    def _info(self, *, invalid: bool, action: str | None) -> dict[str, Any]:
        s = self._state
        info: dict[str, Any] = {
            "admissible_actions": self._admissible(),
            "anchor": self._anchor,
            "success": bool(s.get("won")),
            "won": bool(s.get("won")),
            "lost": bool(s.get("lost")),
            "score": float(s.get("score") or 0.0),
            "max_score": float(s.get("max_score") or 0.0),
            "invalid_action": invalid,
            "penalty": self.params.invalid_action_penalty if invalid else 0.0,
            "action": action,
            "steps": self._steps,
            "objective": self._objective,
        }
        if self._expert:
            info["walkthrough"] = list(s.get("extra.walkthrough") or [])
            info["expert_plan"] = list(s.get("policy_commands") or [])
        return info


# --------------------------------------------------------------------------------------------
# Task source
# --------------------------------------------------------------------------------------------


def read_objective(game_file: str | Path) -> str:
    """The objective text stored in a generated game's ``.json`` ("" if absent)."""
    meta = Path(game_file).with_suffix(".json")
    try:
        return str(json.loads(meta.read_text()).get("objective") or "")
    except (OSError, ValueError):
        return ""


class TextWorldTasks:
    """Generated TextWorld games as tasks: a training pool and a held-out set, split by seed.

    ``tasks`` generates (in ``gen_workers`` processes, cached on disk) whatever games it needs.
    A seed whose game fails to generate still yields a task (``meta["game_file"] = None``,
    ``meta["generation_error"]``) whose episode then fails at ``reset``; such failures are
    counted in ``num_generation_failures``.
    """

    name = "textworld"

    def __init__(
        self,
        *,
        spec: GameSpec,
        cache_dir: str | Path,
        env_params: TextWorldParams,
        num_train_games: int,
        gen_workers: int,
        progress: bool,
    ) -> None:
        self.spec = spec
        self.cache = GameCache(cache_dir, spec)
        self.env_params = env_params
        self.num_train_games = num_train_games
        self.gen_workers = gen_workers
        self.progress = progress
        self.num_generation_failures = 0
        split_seeds("train", 0, 0, num_train_games)  # validates num_train_games early

    @classmethod
    def from_config(cls, cfg: Any) -> TextWorldTasks:
        """Build from ``spear.config.Config`` (task.* and rollout.* fields)."""
        t, ro = cfg.task, cfg.rollout
        missing = [
            f for f in ("textworld_train_games", "textworld_gen_workers") if not hasattr(t, f)
        ]
        if missing:
            raise ValueError(
                f"config section task lacks field(s) {missing} needed by the textworld task"
            )
        return cls(
            spec=game_spec(t.challenge, t.textworld_level),
            cache_dir=t.game_cache_dir,
            env_params=TextWorldParams(
                history_length=ro.history_length,
                max_steps=ro.max_turns,
                invalid_action_penalty=t.invalid_action_penalty,
                numbered_actions=t.textworld_numbered_actions,
            ),
            num_train_games=t.textworld_train_games,
            gen_workers=t.textworld_gen_workers,
            progress=True,
        )

    def tasks(self, split: str, n: int, seed: int) -> list[Task]:
        seeds = split_seeds(split, n, seed, self.num_train_games)
        results = self.cache.ensure(seeds, workers=self.gen_workers, progress=self.progress)
        self.num_generation_failures += sum(
            1 for r in results.values() if not r.ok and not r.cached
        )
        return [self._task(split, results[s]) for s in seeds]

    def make_env(self) -> TextWorldEnv:
        return TextWorldEnv(self.env_params)

    def tools(self) -> list[Any]:
        return []  # actions are plain text in <action> tags, not tool calls

    def _task(self, split: str, result: GenerationResult) -> Task:
        objective = read_objective(result.path) if result.path else ""
        return Task(
            task_id=f"{self.spec.challenge}-{self.spec.digest()}-seed{result.seed}",
            prompt=objective,
            meta={
                "seed": result.seed,
                "split": split,
                "challenge": self.spec.challenge,
                "settings": self.spec.settings_dict(),
                "game_file": result.path,
                "generation_error": result.error,
            },
        )


# --------------------------------------------------------------------------------------------
# Demonstrations for a supervised warm start
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoTurn:
    """One supervised pair in the turn layout: the turn's prompt and the target response."""

    messages: list[Message]
    target: str  # "<action>...</action>"
    expert: bool  # False when the action was a deliberate random admissible one


@dataclass(frozen=True, slots=True)
class Demonstration:
    task_id: str
    turns: tuple[DemoTurn, ...]
    success: bool


def walkthrough_demonstrations(
    tasks: Sequence[Task], params: TextWorldParams, *, random_action_rate: float, seed: int
) -> list[Demonstration]:
    """Play each game by TextWorld's walkthrough, taking a random admissible action instead with
    probability ``random_action_rate`` (deliberately imperfect data).

    Once play leaves the walkthrough, TextWorld's re-planned optimal commands
    (``policy_commands``) continue from the current state. Episodes stop at a win, a loss (a
    random action can lose), or ``params.max_steps``. Games that cannot be played are skipped
    and logged. Deterministic in ``seed``.
    """
    if not 0.0 <= random_action_rate <= 1.0:
        raise ValueError(f"random_action_rate must be in [0, 1], got {random_action_rate}")
    rng = random.Random(seed)
    env = TextWorldEnv(params, expert=True)
    demos: list[Demonstration] = []
    try:
        for task in tasks:
            try:
                demos.append(_demonstrate(env, task, random_action_rate, rng))
            except TextWorldEpisodeError as e:
                log.warning("skipping demonstration of %s: %s", task.task_id, e)
    finally:
        env.close()
    return demos


def _demonstrate(env: TextWorldEnv, task: Task, rate: float, rng: random.Random) -> Demonstration:
    messages, info = env.reset(task)
    walkthrough, on_track = list(info["walkthrough"]), True
    turns: list[DemoTurn] = []
    done = False
    while not done:
        admissible = info["admissible_actions"]
        planned = walkthrough[len(turns)] if on_track and len(turns) < len(walkthrough) else None
        if planned not in admissible:  # off the walkthrough: follow the re-planned commands
            on_track = False
            planned = next((a for a in info["expert_plan"] if a in admissible), None)
        expert = planned is not None and rng.random() >= rate
        action = planned if expert else rng.choice(admissible) if admissible else None
        if action is None:
            break
        on_track = on_track and action == planned
        answer = str(admissible.index(action) + 1) if env.params.numbered_actions else action
        target = f"<action>{answer}</action>"
        turns.append(DemoTurn(messages=messages, target=target, expert=expert))
        result = env.step(target)
        messages, info = result.messages, result.info
        done = result.terminated or result.truncated
    return Demonstration(task_id=task.task_id, turns=tuple(turns), success=bool(info["success"]))


# --------------------------------------------------------------------------------------------
# ALFWorld games (not run here; see the module docstring)
# --------------------------------------------------------------------------------------------


def alfworld_game_files(data_root: str | Path, split: str) -> list[Path]:
    """The solvable ``game.tw-pddl`` files of an ALFWorld split (e.g. "train", "valid_unseen").

    ``data_root`` is ``$ALFWORLD_DATA`` (filled by ``alfworld-download``); games flagged
    ``"solvable": false`` by ALFWorld are left out.
    """
    root = Path(data_root).expanduser() / "json_2.1.1" / split
    if not root.is_dir():
        raise FileNotFoundError(f"no ALFWorld split folder {root} (run alfworld-download?)")
    files = []
    for path in sorted(root.rglob("game.tw-pddl")):
        try:
            solvable = json.loads(path.read_text()).get("solvable", True)
        except (OSError, ValueError):
            solvable = False
        if solvable:
            files.append(path)
    return files


def alfworld_wrappers() -> list[Any]:
    """ALFWorld's TextWorld wrappers (readable object names, game file in infos)."""
    require_textworld()
    try:
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
    except ImportError as e:
        raise ImportError(
            "ALFWorld is not installed: run pip install alfworld 'textworld[pddl]'"
        ) from e
    return [AlfredDemangler(shuffle=False), AlfredInfos]


def alfworld_tasks(data_root: str | Path, split: str) -> list[Task]:
    """Tasks for ALFWorld's solvable games of ``split`` (play them with ``alfworld_wrappers()``).

    Not run here (needs ALFWorld's data); see the module docstring.
    """
    return [
        Task(
            task_id=f"alfworld-{split}-{path.parent.parent.name}-{path.parent.name}",
            prompt="",  # the objective is read from the first observation
            meta={
                "split": split,
                "challenge": "alfworld",
                "game_file": str(path),
                "generation_error": None,
            },
        )
        for path in alfworld_game_files(data_root, split)
    ]
