"""Where a lookup policy fails: greedy episodes sorted by the first link of the chain they break.

Plays ``--tasks`` greedy episodes of a split (default: the held-out ``test`` split) with the
warm model of a run config, or with a trained checkpoint, through the trainer's own rollout path,
and sorts each into the first step of the chain it gets wrong:

1. ``no lookup``: no ``lookup`` call at all;
2. ``lookup of another item``: every lookup names an item other than the problem's (a copying
   error: the item number is in the prompt);
3. ``no calculator call`` after the right lookup;
4. ``calculator without the price``: the expression does not contain the looked-up price;
5. ``price, wrong expression``: the price is there, but the expression is not ``q*price``
   (another operation or another quantity);
6. ``right product, wrong answer``: the calculator computed ``q*price`` but the boxed answer
   differs;
7. ``success``.

    python benchmarks/lookup_failures.py --checkpoint runs/lookup/checkpoints/latest \\
        --out benchmarks/results/hard_exploration/failures_trained.json
    python benchmarks/lookup_failures.py --out benchmarks/results/hard_exploration/failures_warm.json
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from failures_common import emit, greedy_episodes, parser, policy_config

from spear.envs.base import Task

STAGES = (
    "no lookup",
    "lookup of another item",
    "no calculator call",
    "calculator without the price",
    "price, wrong expression",
    "right product, wrong answer",
    "success",
)
_CALL = re.compile(r'"name": "(\w+)", "arguments": \{"(\w+)": "([^"]*)"\}')


def classify(task: Task, transcript: str, success: bool) -> str:
    """The first link of the lookup chain that ``transcript`` (the episode's decoded context,
    from the user's problem on) breaks; ``success`` if none."""
    if success:
        return STAGES[-1]
    item, q, price = task.meta["item"], task.meta["quantity"], task.meta["price"]
    calls = _CALL.findall(transcript)
    looked = [i for i, (name, _k, arg) in enumerate(calls) if name == "lookup" and arg == item]
    if not looked:
        return STAGES[1] if any(name == "lookup" for name, _k, _a in calls) else STAGES[0]
    after = [arg for name, _k, arg in calls[looked[0] + 1 :] if name == "calculator"]
    if not after:
        return STAGES[2]
    expr = after[0].replace(" ", "")
    if str(price) not in re.findall(r"\d+", expr):
        return STAGES[3]
    if expr not in (f"{q}*{price}", f"{price}*{q}"):
        return STAGES[4]
    return STAGES[5]


def play(cfg_name: str, checkpoint: Path | None, split: str, n: int, seed: int) -> list[str]:
    """The stage of each of ``n`` greedy episodes on ``split``."""
    overrides = [f"eval.split={split}", f"eval.num_tasks={n}", f"trainer.seed={seed}"]
    cfg = policy_config(cfg_name, checkpoint, overrides)
    tasks, episodes, decode = greedy_episodes(cfg)
    by_id = {t.task_id: t for t in tasks}
    stages = []
    for e in episodes:
        text = decode(e.samples[-1].input_ids.tolist()) if e.samples else ""
        text = text.split("<|im_start|>user", 1)[-1]
        stages.append(classify(by_id[e.task_id], text, e.success))
    return stages


def main() -> None:
    ap = parser(__doc__, split="test", count="tasks", n=256)
    ap.add_argument("--config", default="lookup", help="run config of the warm model")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    stages = play(args.config, args.checkpoint, args.split, args.tasks, args.seed)
    counts = Counter(stages)
    record = {
        "config": args.config if args.checkpoint is None else None,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "split": args.split,
        "episodes": len(stages),
        "stages": {s: counts.get(s, 0) for s in STAGES},
    }
    emit(record, args.out)


if __name__ == "__main__":
    main()
