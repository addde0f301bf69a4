"""How hard the lookup task is for the warm policy: sampled training success before any RL.

Builds (or loads from the cache) the warm model of a run config (default: ``lookup``), then plays
``--batches`` batches of training tasks through the trainer's own rollout path at the config's
sampling temperature (``rollout.group_size`` rollouts a task, as in training), and the greedy
held-out and validation evaluations. Reports success, how often each tool is called, the share
of episodes whose first call is ``lookup``, and the fraction of groups whose rewards are all
equal (they give GRPO no gradient). Writes a JSON record.

    python benchmarks/hard_exploration_probe.py --out benchmarks/results/hard_exploration/probe.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from spear.backends import RolloutRequest
from spear.config import load_config, run_config_path
from spear.stages import episode_metrics
from spear.trainer import Trainer, stage_generator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="lookup")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(
        file=run_config_path(args.config),
        overrides=[*args.overrides, "logging.tensorboard=false", "logging.progress=false"],
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        build_s = time.perf_counter() - t0
        episodes = []
        for b in range(args.batches):
            tasks = trainer.c.source.tasks("train", cfg.rollout.tasks_per_step, seed=10_000 + b)
            request = RolloutRequest(
                tasks,
                group_size=cfg.rollout.group_size,
                params=trainer.c.loop_params,
                step=0,
                first_group_id=b * len(tasks),
                first_episode_id=b * len(tasks) * cfg.rollout.group_size,
            )
            episodes += trainer.backend.rollout(request, stage_generator(args.seed, b, 2))
        sampled = episode_metrics(episodes, "train")
        groups: dict[int, list[bool]] = {}
        for e in episodes:
            groups.setdefault(e.group_id, []).append(e.success)
        all_equal = sum(len(set(v)) == 1 for v in groups.values()) / len(groups)
        firsts = Counter(
            _first_action(e.samples[0] if e.samples else None, trainer) for e in episodes
        )
        greedy_test = trainer.evaluate()
        trainer.cfg = cfg.model_copy(
            update={"eval": cfg.eval.model_copy(update={"split": "validation"})}
        )
        greedy_val = trainer.evaluate()
        trainer.close()
    record = {
        "config": args.config,
        "overrides": args.overrides,
        "episodes": len(episodes),
        "sampled_train_success": sampled["train/success"],
        "sampled_tool_calls": sampled["train/tool_calls"],
        "sampled_invalid_tool_calls": sampled["train/invalid_tool_calls"],
        "groups_with_all_equal_outcomes": all_equal,
        "first_action": dict(firsts),
        "greedy_test_success": greedy_test["eval/success"],
        "greedy_test_tool_calls": greedy_test["eval/tool_calls"],
        "greedy_validation_success": greedy_val["eval/success"],
        "build_or_load_s": build_s,
        "total_s": time.perf_counter() - t0,
    }
    print(json.dumps(record, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))


def _first_action(sample, trainer: Trainer) -> str:
    """What the first turn did: ``lookup`` / ``calculator`` call, ``answer`` or ``other``."""
    if sample is None:
        return "none"
    ids = sample.input_ids[sample.loss_mask.bool()].tolist()
    text = trainer.c.policy.tokenizer.decode(ids)
    for name in ("lookup", "calculator"):
        if f'"name": "{name}"' in text.split("</tool_call>")[0][:80]:
            return name
    return "answer" if "\\boxed" in text[:40] else "other"


if __name__ == "__main__":
    main()
