"""Warm-start demonstrations for the ``lookup`` task: mostly partial or wrong tool use.

Every demo is a scripted episode of a training problem played in the task's real env, so tool
outputs and errors look exactly as during RL. The three warm-start fractions keep their names
(``model.warm_start.frac_tool`` / ``frac_guess`` / ``frac_bad_call``) with these meanings here:

* ``tool``: the full chain (:func:`~spear.envs.lookup.oracle_actions`): ``lookup(item)``, then
  ``calculator(q*price)`` with the looked-up price, then ``\\boxed{result}``;
* ``guess``: one of four plausible but wrong strategies, in turn -- answer the quantity with no
  tool call; call the calculator with a made-up price (never the real one) and box its result;
  look the price up and box the price (stopping one call short); look the price up, copy it into
  the calculator with the wrong operation (``q+price``) and box that;
* ``bad_call``: in turn, a malformed call or a lookup of a misspelled item (an error), each
  followed by the quantity as a guess.

Each partial strategy is one piece of the chain, so a model that imitates the mix composes the
chain only by chance. The copy variant matters: without it the tiny model almost never copied a
looked-up price into the next call (0.2% sampled success with three variants). Measured with the
shipped mix (``frac_tool=0.05``): 1.2% sampled training success, 91% of groups all-equal, 0 of
128 greedy held-out problems (``benchmarks/hard_exploration.md``), the sparse regime the SPEAR
recipe targets.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from spear.envs.base import Env, Task, tool_schema
from spear.envs.lookup import MAX_PRICE, MIN_PRICE, LookupTasks, catalogue, oracle_actions
from spear.models.tokenizer import Conversation
from spear.types import Message

if TYPE_CHECKING:
    from spear.models.arithmetic_demos import DemoKind
    from spear.models.warmstart import WarmStartParams


def _made_up_price(true_price: int, rng: random.Random) -> int:
    while True:
        p = rng.randint(MIN_PRICE, MAX_PRICE)
        if p != true_price:
            return p


def _misspelled(item: str, rng: random.Random) -> str:
    """``item`` with one letter dropped: not in the catalogue, so the lookup answers an error."""
    i = rng.randrange(len(item))
    if item[i] == " ":
        i = 0
    missing = item[:i] + item[i + 1 :]
    return missing if missing not in catalogue() else item + "s"


def _script(task: Task, kind: DemoKind, variant: int, rng: random.Random) -> list[str | None]:
    """The actions of one demo; ``None`` stands for "the oracle's next action"."""
    from spear.models.arithmetic_demos import DemoKind, boxed, malformed_call_text, tool_call_text

    item, q = str(task.meta["item"]), int(task.meta["quantity"])
    price = int(task.meta["price"])
    if kind is DemoKind.TOOL:
        return [None, None, None]
    if kind is DemoKind.GUESS:
        if variant % 4 == 0:
            return [boxed(str(q))]
        if variant % 4 == 1:
            expr = f"{q}*{_made_up_price(price, rng)}"
            return [tool_call_text("calculator", {"expression": expr}), "<box last>"]
        if variant % 4 == 2:
            return [tool_call_text("lookup", {"item": item}), "<box last>"]
        return [tool_call_text("lookup", {"item": item}), "<add last>", "<box last>"]
    if variant % 2 == 0:
        return [malformed_call_text(item, rng).replace("calculator", "lookup"), boxed(str(q))]
    return [tool_call_text("lookup", {"item": _misspelled(item, rng)}), boxed(str(q))]


def play_lookup_demo(
    env: Env, task: Task, kind: DemoKind, variant: int, rng: random.Random
) -> list[Message]:
    """Play one scripted demonstration in ``env``; return the whole conversation."""
    from spear.models.arithmetic_demos import boxed, tool_call_text

    messages, _ = env.reset(task)
    messages = list(messages)
    observations: list[str] = []
    for action in _script(task, kind, variant, rng):
        if action is None:
            text = oracle_actions(task, observations)
        elif action == "<box last>":
            text = boxed(observations[-1].strip())
        elif action == "<add last>":
            expr = f"{int(task.meta['quantity'])}+{observations[-1].strip()}"
            text = tool_call_text("calculator", {"expression": expr})
        else:
            text = action
        messages.append({"role": "assistant", "content": text})
        result = env.step(text)
        messages.extend(result.messages)
        observations += [str(m.get("content", "")) for m in result.messages]
        if result.terminated:
            break
    return messages


def make_lookup_demos(
    params: WarmStartParams, seed: int
) -> tuple[list[Conversation], dict[str, float]]:
    """``params.num_demos`` demonstrations on training problems, deterministic in ``seed``,
    and the share of demos that solve their problem (for the warm model's report)."""
    from spear.models.arithmetic_demos import DemoKind, demo_kinds

    rng = random.Random(f"warmstart-lookup:{seed}")
    source = LookupTasks(params.task)
    tasks = source.tasks("train", params.num_demos, seed)
    kinds = demo_kinds(
        params.num_demos, (params.frac_tool, params.frac_guess, params.frac_bad_call), rng
    )
    tools = [tool_schema(t) for t in source.tools()]
    env = source.make_env()
    demos: list[Conversation] = []
    counters = dict.fromkeys(DemoKind, 0)
    solved = 0
    try:
        for task, kind in zip(tasks, kinds):
            messages = play_lookup_demo(env, task, kind, counters[kind], rng)
            counters[kind] += 1
            solved += _solves(messages, task)
            demos.append(Conversation(messages, tools))
    finally:
        env.close()
    return demos, {"demo_success_rate": solved / max(1, len(demos))}


def _solves(messages: list[Message], task: Task) -> bool:
    from spear.envs.answers import extract_boxed

    last = next((m for m in reversed(messages) if m.get("role") == "assistant"), None)
    return last is not None and extract_boxed(str(last.get("content", ""))) == task.answer
