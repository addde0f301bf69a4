"""Warm-start demonstrations for TextWorld tasks: TextWorld's walkthroughs of training games.

Each of ``num_demos`` training games (seeds drawn from the training pool by
:func:`~spear.envs.textworld_games.split_seeds`, so never a held-out game) is played by
:func:`~spear.envs.textworld_env.walkthrough_demonstrations`: the walkthrough (re-planned once play
leaves it), except that every turn takes a uniformly random admissible action instead with
probability ``random_action_rate``. The data is deliberately imperfect: random actions waste
turns and, in treasure hunter, can lose the game, so a model imitating it wins only sometimes and
RL has something to improve.

Every turn's prompt is the env's own message (:func:`~spear.envs.textworld_env.build_turn_prompt`
through :class:`~spear.envs.textworld_env.TextWorldEnv`), so the warm model sees exactly what it
sees during RL: in the ``turn`` layout one conversation per turn (that turn's user message, then
the ``<action>...</action>`` answer); in the ``episode`` layout one conversation per game (all
turns in order, as the agent loop grows it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spear.envs.textworld_env import (
    Demonstration,
    TextWorldParams,
    TextWorldTasks,
    walkthrough_demonstrations,
)
from spear.envs.textworld_games import game_spec, require_textworld
from spear.models.tokenizer import Conversation
from spear.types import Message

if TYPE_CHECKING:
    from spear.config import Config
    from spear.models.warmstart import WarmStartParams

log = logging.getLogger(__name__)

#: dataclass field metadata: leave this field out of the warm model's cache key
NOT_IN_KEY = {"cache_key": False}


@dataclass(frozen=True, slots=True)
class TextWorldDemoParams:
    """What determines TextWorld demonstrations (all but the marked fields go into the key).

    ``settings`` are the challenge's complete TextWorld settings (sorted pairs, as in
    :class:`~spear.envs.textworld_games.GameSpec`); ``textworld_version`` is part of the key
    because generated games differ between TextWorld versions.
    """

    challenge: str
    settings: tuple[tuple[str, Any], ...]
    level: int
    textworld_version: str
    env: TextWorldParams
    num_train_games: int  # the training pool demo games are drawn from (seeds below it)
    layout: str  # "turn" or "episode": how demos are cut into conversations
    random_action_rate: float  # probability of a random admissible action instead of the plan
    game_cache_dir: str = dataclasses.field(metadata=NOT_IN_KEY)
    gen_workers: int = dataclasses.field(metadata=NOT_IN_KEY)

    def __post_init__(self) -> None:
        if not 0.0 <= self.random_action_rate <= 1.0:
            raise ValueError(f"random_action_rate must be in [0, 1], got {self.random_action_rate}")
        if self.layout not in ("turn", "episode"):
            raise ValueError(f"layout must be 'turn' or 'episode', got {self.layout!r}")

    @classmethod
    def from_config(cls, cfg: Config) -> TextWorldDemoParams:
        """The demonstration settings of a textworld run (``task.*``, ``rollout.*``,
        ``model.warm_start.random_action_rate``)."""
        t, ro = cfg.task, cfg.rollout
        spec = game_spec(t.challenge, t.textworld_level)
        return cls(
            challenge=spec.challenge,
            settings=spec.settings,
            level=t.textworld_level,
            textworld_version=str(require_textworld().__version__),
            env=TextWorldParams(
                history_length=ro.history_length,
                max_steps=ro.max_turns,
                invalid_action_penalty=t.invalid_action_penalty,
                numbered_actions=t.textworld_numbered_actions,
            ),
            num_train_games=t.textworld_train_games,
            layout=ro.layout,
            random_action_rate=cfg.model.warm_start.random_action_rate,
            game_cache_dir=t.game_cache_dir,
            gen_workers=t.textworld_gen_workers,
        )


def demo_conversations(demo: Demonstration, layout: str) -> list[Conversation]:
    """Cut one played demonstration into training conversations (pure).

    ``turn``: one conversation per turn, ``[turn prompt..., assistant target]``.
    ``episode``: one conversation, the first prompt then alternating answers and observations,
    exactly as the agent loop's episode layout grows it.
    """
    if layout == "turn":
        return [
            Conversation([*t.messages, {"role": "assistant", "content": t.target}], None)
            for t in demo.turns
        ]
    if layout != "episode":
        raise ValueError(f"layout must be 'turn' or 'episode', got {layout!r}")
    messages: list[Message] = []
    for t in demo.turns:
        messages += [*t.messages, {"role": "assistant", "content": t.target}]
    return [Conversation(messages, None)] if messages else []


def demo_stats(demos: Sequence[Demonstration]) -> dict[str, float]:
    """Counts of a demonstration set (reported in the warm model's ``warmstart.json``)."""
    turns = [t for d in demos for t in d.turns]
    return {
        "demo_games": float(len(demos)),
        "demo_turns": float(len(turns)),
        "demo_won_fraction": sum(d.success for d in demos) / max(1, len(demos)),
        "demo_random_turn_fraction": sum(not t.expert for t in turns) / max(1, len(turns)),
    }


def make_textworld_demos(
    params: WarmStartParams, seed: int
) -> tuple[list[Conversation], dict[str, float]]:
    """Play ``params.num_demos`` training games (generated and cached on demand) and return the
    training conversations with :func:`demo_stats`. Deterministic in ``seed``."""
    tw: TextWorldDemoParams = params.task
    source = TextWorldTasks(
        spec=game_spec(tw.challenge, tw.level),
        cache_dir=tw.game_cache_dir,
        env_params=tw.env,
        num_train_games=tw.num_train_games,
        gen_workers=tw.gen_workers,
        progress=True,
    )
    tasks = source.tasks("train", params.num_demos, seed)
    played = walkthrough_demonstrations(
        tasks, tw.env, random_action_rate=tw.random_action_rate, seed=seed
    )
    demos = [d for d in played if d.turns]  # a game without a single turn teaches nothing
    if not demos:
        raise RuntimeError(
            f"no TextWorld demonstration could be played ({source.num_generation_failures} "
            "games failed to generate)"
        )
    stats = demo_stats(demos)
    stats["demo_generation_failures"] = float(source.num_generation_failures)
    log.info(
        "TextWorld demos: %d games, %d turns, %.0f%% won, %.0f%% random turns",
        stats["demo_games"],
        stats["demo_turns"],
        100 * stats["demo_won_fraction"],
        100 * stats["demo_random_turn_fraction"],
    )
    convs = [c for d in demos for c in demo_conversations(d, tw.layout)]
    return convs, stats
