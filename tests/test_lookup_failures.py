"""benchmarks/lookup_failures.py sorts an episode into the first link of the chain it breaks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from spear.envs.lookup import generate_tasks
from spear.models.arithmetic_demos import boxed, tool_call_text

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "lookup_failures.py"
sys.path.insert(0, str(_PATH.parent))  # the script imports its sibling failures_common
_spec = importlib.util.spec_from_file_location("lookup_failures", _PATH)
assert _spec is not None and _spec.loader is not None
lf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lf)

TASK = generate_tasks("test", 1, seed=0)[0]
ITEM, Q, PRICE = TASK.meta["item"], TASK.meta["quantity"], TASK.meta["price"]


def _turns(*actions: str) -> str:
    return "\n".join(f"<|im_start|>assistant\n{a}<|im_end|>" for a in actions)


def _lookup(item: str) -> str:
    return tool_call_text("lookup", {"item": item})


def _calc(expr: str) -> str:
    return tool_call_text("calculator", {"expression": expr})


@pytest.mark.parametrize(
    ("actions", "stage"),
    [
        ((boxed(str(Q)),), "no lookup"),
        ((_calc(f"{Q}*{PRICE}"), boxed("1")), "no lookup"),
        ((_lookup("part 100" if ITEM != "part 100" else "part 101"), boxed("1")), lf.STAGES[1]),
        ((_lookup(ITEM), boxed(str(PRICE))), "no calculator call"),
        ((_calc(f"{Q}*{PRICE}"), _lookup(ITEM), boxed("1")), "no calculator call"),  # order
        ((_lookup(ITEM), _calc(f"{Q}*17"), boxed("1")), "calculator without the price"),
        ((_lookup(ITEM), _calc(f"{Q}+{PRICE}"), boxed("1")), "price, wrong expression"),
        ((_lookup(ITEM), _calc(f"{Q + 1}*{PRICE}"), boxed("1")), "price, wrong expression"),
        ((_lookup(ITEM), _calc(f"{PRICE} * {Q}"), boxed("1")), "right product, wrong answer"),
    ],
)
def test_each_failure_is_named_by_its_first_broken_link(actions: tuple[str, ...], stage: str):
    assert lf.classify(TASK, _turns(*actions), success=False) == stage


def test_a_successful_episode_is_a_success():
    text = _turns(_lookup(ITEM), _calc(f"{Q}*{PRICE}"), boxed(str(Q * PRICE)))
    assert lf.classify(TASK, text, success=True) == "success"
