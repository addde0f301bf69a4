"""The built-in hard-exploration tool task: a price lookup whose result feeds the calculator.

A problem asks for the cost of ``q`` units of a catalogue item, e.g.

    "How much do 37 units of part 418 cost?"

The unit price is not in the prompt: only the ``lookup`` tool reveals it. Success needs two
dependent tool calls in separate turns -- ``lookup(item)``, then ``calculator(q*price)`` with the
price copied from the first call's observation -- and a final ``\\boxed{q*price}``. The reward is
sparse and terminal: 1 for the right boxed number, 0 for anything else (tool calls earn nothing
here; the SPEAR recipe's intrinsic tool-call bonus is the trainer's, not the task's).

The catalogue is fixed: 900 items ``"part 100"`` ... ``"part 999"``, each priced (10-999) by a hash
of its name; item numbers, quantities and prices are each one token of the built-in tokenizer,
which copies numbers well (a two-word item name was beyond the warm-started tiny model: it copied
the wrong item into its lookups). Splits are by item:
an item belongs to ``test`` when the SHA-256 of its name falls in bucket 0 of
:data:`SPLIT_BUCKETS`, to ``validation`` in bucket 1, else to ``train``, so a held-out (or
validation) problem never names an item a training problem names, and memorising training
prices cannot help on held-out problems. The three splits also draw from disjoint seed streams.

:func:`oracle_actions` is the scripted policy that solves every problem through the real env
(tests check it does); the warm start (:mod:`spear.models.lookup_demos`) shows it only rarely.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spear.envs.arithmetic import CALCULATOR_LIMITS, Calculator
from spear.envs.base import Env, Task, Tool
from spear.envs.tool_env import NATIVE_PARSER, boxed_number_env, check_tool_limits

if TYPE_CHECKING:
    from spear.config import Config

SPLITS = ("train", "validation", "test")
SPLIT_BUCKETS = 8  # 1 in 8 items is held out (test), 1 in 8 is the validation split
MIN_QUANTITY, MAX_QUANTITY = 2, 99
MIN_PRICE, MAX_PRICE = 10, 999

SYSTEM_PROMPT = "Look up prices, then use the calculator. Answer as \\boxed{n}."

FIRST_PART, LAST_PART = 100, 999  # item numbers: one token each for the built-in tokenizer
_TEMPLATES = (
    "How much do {q} units of {item} cost?",
    "An order asks for {q} units of {item}. What is the total price?",
    "What is the price of {q} units of {item}?",
)


def catalogue() -> list[str]:
    """Every item name (``"part 100"`` ... ``"part 999"``), in a fixed order."""
    return [f"part {n}" for n in range(FIRST_PART, LAST_PART + 1)]


def unit_price(item: str) -> int:
    """The catalogue price of ``item`` (10-999), a pure function of its name."""
    digest = hashlib.sha256(f"lookup-price:{item}".encode()).digest()
    return MIN_PRICE + int.from_bytes(digest[:4], "big") % (MAX_PRICE - MIN_PRICE + 1)


def item_split(item: str) -> str:
    """The split an item (and every problem naming it) belongs to, from the SHA-256 of its name."""
    bucket = hashlib.sha256(item.encode()).digest()[0] % SPLIT_BUCKETS
    return {0: "test", 1: "validation"}.get(bucket, "train")


def _normalise(item: str) -> str:
    return " ".join(item.lower().split())


class Lookup:
    """The ``lookup`` tool: the unit price of a catalogue item; unknown items come back as text."""

    name = "lookup"
    description = "Look up the unit price of an item."
    parameters: dict[str, Any] = {  # noqa: RUF012 (the Tool protocol declares an attribute)
        "type": "object",
        "properties": {"item": {"type": "string"}},
        "required": ["item"],
    }

    def __init__(self) -> None:
        self._prices = {item: unit_price(item) for item in catalogue()}

    def __call__(self, **arguments: Any) -> str:
        extra = sorted(set(arguments) - {"item"})
        if extra or "item" not in arguments:
            return "error: lookup takes exactly one argument, 'item'"
        item = arguments["item"]
        if not isinstance(item, str):
            return "error: item must be a string"
        price = self._prices.get(_normalise(item))
        if price is None:
            return f"error: no item {item[:40]!r} in the catalogue"
        return str(price)


def generate_tasks(split: str, n: int, seed: int) -> list[Task]:
    """``n`` distinct problems of ``split``, deterministic in ``(split, seed)``."""
    if split not in SPLITS:
        raise ValueError(f"the lookup task's splits are {', '.join(SPLITS)}; got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    items = [item for item in catalogue() if item_split(item) == split]
    n_quantities = MAX_QUANTITY - MIN_QUANTITY + 1
    if n > len(items) * n_quantities:
        raise ValueError(
            f"the lookup task's {split} split has {len(items) * n_quantities} problems, "
            f"{n} were asked for"
        )
    rng = random.Random(f"lookup:{split}:{seed}")
    tasks: list[Task] = []
    seen: set[tuple[str, int]] = set()
    while len(tasks) < n:
        item, q = rng.choice(items), rng.randint(MIN_QUANTITY, MAX_QUANTITY)
        price = unit_price(item)
        if (item, q) in seen or str(price) in (str(q), item.split()[-1]):
            continue  # the price must not be a number the prompt already shows
        seen.add((item, q))
        prompt = rng.choice(_TEMPLATES).format(q=q, item=item)
        key = hashlib.sha256(f"{item}:{q}".encode()).hexdigest()[:12]
        meta = {"item": item, "quantity": q, "price": price, "split": split}
        tasks.append(Task(task_id=f"lookup-{key}", prompt=prompt, answer=str(q * price), meta=meta))
    return tasks


def oracle_actions(task: Task, observations: list[str]) -> str:
    """The scripted policy that solves every problem: the next action given the tool outputs
    seen so far (``lookup``, then ``calculator`` on the looked-up price, then the answer)."""
    from spear.models.arithmetic_demos import boxed, tool_call_text

    item, q = str(task.meta["item"]), int(task.meta["quantity"])
    if not observations:
        return tool_call_text("lookup", {"item": item})
    if len(observations) == 1:
        return tool_call_text("calculator", {"expression": f"{q}*{observations[0].strip()}"})
    return boxed(observations[-1].strip())


# ----------------------------------------------------------------------------------------------
# Task source

MAX_CALLS_PER_TURN = 1  # one tool call per turn: the two calls need two turns


@dataclass(frozen=True, slots=True)
class LookupParams:
    """The env's tool handling (the catalogue and splits are fixed)."""

    tool_timeout_s: float
    max_observation_chars: int

    def __post_init__(self) -> None:
        check_tool_limits(self.tool_timeout_s, self.max_observation_chars)


class LookupTasks:
    """The ``lookup`` :class:`~spear.envs.base.TaskSource` (see the module docstring)."""

    name = "lookup"

    def __init__(self, params: LookupParams, parser: str = NATIVE_PARSER) -> None:
        self.params = params
        self.parser = parser  # a spear.rollout.parsers name: how make_env's env reads calls
        self._tools: list[Tool] = [Lookup(), Calculator(CALCULATOR_LIMITS)]

    @staticmethod
    def params_from_config(cfg: Config) -> LookupParams:
        return LookupParams(
            tool_timeout_s=cfg.rollout.tool_timeout_s,
            max_observation_chars=cfg.rollout.max_observation_chars,
        )

    @classmethod
    def from_config(cls, cfg: Config) -> LookupTasks:
        return cls(cls.params_from_config(cfg), cfg.rollout.parser or NATIVE_PARSER)

    def tasks(self, split: str, n: int, seed: int) -> list[Task]:
        return generate_tasks(split, n, seed)

    def tools(self) -> list[Tool]:
        return list(self._tools)

    def make_env(self) -> Env:
        return boxed_number_env(
            self.tools(),
            self.parser,
            system_prompt=SYSTEM_PROMPT,
            tool_timeout_s=self.params.tool_timeout_s,
            max_calls_per_turn=MAX_CALLS_PER_TURN,
            max_observation_chars=self.params.max_observation_chars,
        )
