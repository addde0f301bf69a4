"""A custom spear task in one file: a shop with two tools whose answer needs both.

The model is asked the total price of an order ("Order: 7 x pen. What is the total price?").
It cannot know the unit price, so it must call ``price`` for the item, then ``multiply`` the
quantity by that price, then answer ``\\boxed{84}``.

Use it with ``task.name=examples.shop.task:make_task`` (from the repository root, as the
example's config does) or in Python: ``Trainer(cfg, run_dir, task=make_task(cfg))``.
"""

from __future__ import annotations

from pathlib import Path

from spear.config import Config
from spear.envs.base import Task
from spear.envs.function_task import EpisodeTrace, FunctionTask, correct_answer
from spear.rollout.parsers import hermes_call

DATA = Path(__file__).with_name("orders.jsonl")

PRICES = {
    "pen": 12, "cup": 17, "book": 23, "lamp": 48, "shirt": 35, "hat": 29, "bag": 41, "box": 14,
    "clock": 56, "chair": 73, "plate": 19, "spoon": 11, "fork": 13, "knife": 27, "towel": 22,
    "candle": 16, "brush": 18, "comb": 15, "mug": 21, "bowl": 24, "vase": 62, "rug": 87,
    "kettle": 44, "pillow": 33, "blanket": 58, "mirror": 66, "basket": 31, "jar": 26,
    "sock": 12, "glove": 25,
}  # fmt: skip


# -- the tools: plain functions; type hints and the docstring become the schema ---------------


def price(item: str) -> int:
    """The unit price of an item of the shop, in dollars.

    Args:
        item: The item's name, e.g. "pen".
    """
    key = item.strip().lower()
    if key not in PRICES:
        raise KeyError(f"the shop sells no {item!r}")  # becomes an observation for the model
    return PRICES[key]


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


# -- rewards: (task, episode) -> float ------------------------------------------------------


def used_both_tools(task: Task, episode: EpisodeTrace) -> float:
    """1.0 when both tools ran at least once in the episode."""
    return 1.0 if {"price", "multiply"} <= episode.tools_used else 0.0


# -- a scripted solution: what the built-in tiny model warm starts on -------------------------


def demonstration(task: Task) -> list[str]:
    """The assistant's turns of a correct episode."""
    item, qty = str(task.meta["item"]), int(task.meta["quantity"])
    return [
        hermes_call("price", {"item": item}),
        hermes_call("multiply", {"a": qty, "b": PRICES[item]}),
        f"\\boxed{{{qty * PRICES[item]}}}",
    ]


def make_task(cfg: Config) -> FunctionTask:
    """The task factory ``task.name`` points at."""
    return FunctionTask(
        name="shop",
        data=DATA,
        prompt_template="Order: {quantity} x {item}. What is the total price?",
        answer_column="answer",
        tools=[price, multiply],
        rewards={"correct": correct_answer, "used_both_tools": used_both_tools},
        reward_weights={"correct": 1.0, "used_both_tools": 0.1},
        system_prompt="Use the tools. Answer as \\boxed{n}.",
        held_out_fraction=0.2,
        demonstration=demonstration,
        config=cfg,
    )
