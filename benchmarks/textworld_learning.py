"""Learning curves on TextWorld: GRPO, Dr.BoT, SPEAR, GiGPO and SPEAR-GiGPO, several seeds.

    python benchmarks/textworld_learning.py                          # all five methods, seeds 0 1 2
    python benchmarks/textworld_learning.py --methods spear --seeds 0 1 2 --steps 20

Every method trains with the budget of ``spear/configs/textworld.yaml`` (its ``task``, ``model``,
``rollout``, ``optim``, ``eval`` and ``trainer`` sections: treasure hunter level 3, per-turn
samples, 10 steps of 4 games x 4 rollouts, held-out eval every 5 steps on the same 24 greedy
games) and the same
cached warm-started tiny model; only the algorithm differs, exactly as in
``benchmarks/learning.py``:

* ``grpo``, ``drbot``, ``gigpo``: their preset plus the budget sections only (no replay, no bonus);
* ``spear``, ``spear-gigpo``: their preset plus the budget sections plus textworld.yaml's
  ``replay`` and ``reward`` lines (buffer 48, SIL weight and turn-count bonus horizons 10).

Runs, resumption, summaries and plots are ``benchmarks/learning.py``'s (``run_one``,
``write_summary``): ``<out>/<method>-s<seed>/``, ``<out>/summary.{json,md}``, ``<out>/heldout.png``
(held-out success vs step, mean over seeds, min-max band) and ``<out>/entropy.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning  # benchmarks/learning.py, the shared runner

from spear.config import Config

ROOT = Path(__file__).resolve().parent
TW_CONFIG = ROOT.parent / "spear" / "configs" / "textworld.yaml"
DEFAULT_OUT = ROOT / "results" / "textworld"
BUDGET_SECTIONS = ("task", "model", "rollout", "optim", "eval", "trainer")
SPEAR_SECTIONS = ("replay", "reward")

# method -> (preset, inherits textworld.yaml's replay/reward lines, extra overrides)
METHODS: dict[str, tuple[str, bool, list[str]]] = {
    "grpo": ("grpo", False, []),
    "drbot": ("drbot", False, []),
    "spear": ("spear", True, []),
    "gigpo": ("gigpo", False, []),
    "spear-gigpo": ("spear-gigpo", True, []),
}
KEY_SETTINGS = [
    "preset", "task.challenge", "task.textworld_level", "task.textworld_train_games",
    "task.invalid_action_penalty", "model.warm_start.num_demos", "model.warm_start.steps",
    "model.warm_start.random_action_rate", "rollout.layout", "rollout.history_length",
    "rollout.tasks_per_step", "rollout.group_size", "rollout.max_turns", "rollout.max_new_tokens",
    "rollout.temperature", "optim.lr", "optim.micro_batch_size", "eval.every", "eval.num_tasks",
    "eval.temperature", "trainer.steps", "advantage.estimator", "advantage.norm_by_std",
    "loss.policy_loss", "loss.clip_high", "loss.aggregation", "filters.group_keep_ratio",
    "replay.enabled", "replay.capacity", "replay.loss_coef", "reward.tool_bonus.mode",
    "reward.tool_bonus.alpha", "reward.tool_bonus.count",
]  # fmt: skip


def build_config(method: str, seed: int, args: argparse.Namespace) -> Config:
    """``method``'s preset <- the budget (and, for SPEAR, replay/reward) sections <- overrides."""
    overrides = learning.run_overrides(seed, args.save_every, args.threads, args.cache_dir)
    overrides.append(f"task.game_cache_dir={args.game_cache_dir}")
    if args.steps is not None:
        overrides.append(f"trainer.steps={args.steps}")
    return learning.method_config(
        METHODS[method], TW_CONFIG, BUDGET_SECTIONS, SPEAR_SECTIONS, overrides
    )


def _use_textworld_methods() -> None:
    """Point learning.py's summary and plots at this benchmark's methods and settings."""
    learning.METHODS.clear()
    learning.METHODS.update(METHODS)
    learning.MAIN_METHODS[:] = list(METHODS)
    learning.KEY_SETTINGS[:] = KEY_SETTINGS


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="override trainer.steps (default 10)")
    p.add_argument("--cache-dir", default="~/.cache/spear", help="warm-model cache")
    p.add_argument("--game-cache-dir", default="~/.cache/spear/textworld", help="game cache")
    p.add_argument("--threads", type=int, default=1, help="trainer.num_threads")
    p.add_argument("--save-every", type=int, default=10, help="trainer.save_every")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    _use_textworld_methods()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(learning.machine()), flush=True)
    runs: dict[str, dict[str, Any]] = {}
    for marker in sorted(out.glob("*-s*/run.json")):
        r = json.loads(marker.read_text())
        if r["method"] in METHODS:
            runs[marker.parent.name] = r
    settings = {
        m: {k: learning._get(build_config(m, args.seeds[0], args), k) for k in KEY_SETTINGS}
        for m in {r["method"] for r in runs.values()} | set(args.methods)
    }
    if not args.summary_only:
        for seed in args.seeds:  # seed-major: a partial benchmark has every method per seed
            for m in args.methods:
                name = f"{m}-s{seed}"
                runs[name] = learning.run_one(m, seed, build_config(m, seed, args), out / name)
                learning.write_summary(out, runs, settings)
                r = runs[name]
                print(f"[done] {name}: held-out {r['initial_eval_success']} -> "
                      f"{r['final_eval_success']}, wall {r['wall_s']}", flush=True)  # fmt: skip
    learning.write_summary(out, runs, settings)
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
