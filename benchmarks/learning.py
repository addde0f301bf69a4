"""Learning curves of SPEAR against GRPO and Dr.BoT (and SPEAR ablations), several seeds.

    python benchmarks/learning.py --cache-dir /tmp/spear-cache            # grpo drbot spear, seeds 0 1 2
    python benchmarks/learning.py --methods spear-no-tool spear-no-sil    # ablations

Every method trains on the built-in arithmetic tool task with the budget of the embedded default
run (``spear/configs/default.yaml``: its ``task``, ``rollout``, ``optim``, ``eval`` and ``trainer``
sections, 30 steps of 16 tasks x 8 rollouts, held-out eval of 128 greedy problems every 10 steps)
and the same cached warm-started tiny model. Only the algorithm differs:

* ``grpo``, ``drbot``: ``load_config(preset=NAME, file=<the budget sections only>)`` so they do
  NOT inherit the default run's replay / tool-bonus lines (their presets switch both off);
* ``spear``: the ``spear`` preset plus the budget sections plus default.yaml's ``replay`` and
  ``reward`` lines (buffer 48, history 1024, SIL weight and tool bonus horizons 30) -- exactly
  what ``spear train`` runs;
* ablations of ``spear``: ``spear-no-tool`` (``reward.tool_bonus.mode=none``), ``spear-no-sil``
  (``replay.enabled=false``), ``spear-no-recal`` (``replay.recalibration=decay
  replay.decay_weight=1.0``: the replayed advantage is the one collected, no median baseline, no
  re-filtering), ``spear-no-clipcov`` (``loss.policy_loss=vanilla replay.policy_loss=vanilla``).

Each run goes to ``<out>/<method>-s<seed>/`` (config.yaml, metrics.jsonl, run.json); the final
checkpoint is written (``trainer.save_every=0``) and deleted once summarised, so a finished run
is recognised by its ``run.json`` (or a final checkpoint) and skipped: the script resumes.
After every run ``<out>/summary.json`` and ``<out>/summary.md`` are rewritten, and with them the
plots ``<out>/heldout.png`` (held-out success vs step, mean over seeds, min-max band) and
``<out>/entropy.png`` (on-policy entropy, mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from spear.checkpoint import latest_checkpoint
from spear.config import DEFAULT_RUN_CONFIG, Config, config_to_yaml, load_config
from spear.metrics import read_metrics

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "learning"
BUDGET_SECTIONS = ("task", "rollout", "optim", "eval", "trainer")
SPEAR_SECTIONS = ("replay", "reward")

# method -> (preset, inherits default.yaml's replay/reward lines, extra overrides)
METHODS: dict[str, tuple[str, bool, list[str]]] = {
    "grpo": ("grpo", False, []),
    "drbot": ("drbot", False, []),
    "spear": ("spear", True, []),
    "spear-no-tool": ("spear", True, ["reward.tool_bonus.mode=none"]),
    "spear-no-sil": ("spear", True, ["replay.enabled=false"]),
    "spear-no-recal": ("spear", True, ["replay.recalibration=decay", "replay.decay_weight=1.0"]),
    "spear-no-clipcov": ("spear", True, ["loss.policy_loss=vanilla", "replay.policy_loss=vanilla"]),
}
MAIN_METHODS = ["grpo", "drbot", "spear"]

# Resolved settings printed per method (budget first, then algorithm).
KEY_SETTINGS = [
    "preset",
    "task.name",
    "task.difficulty",
    "rollout.tasks_per_step",
    "rollout.group_size",
    "rollout.max_turns",
    "rollout.max_new_tokens",
    "rollout.max_response_tokens",
    "rollout.temperature",
    "optim.lr",
    "optim.ppo_epochs",
    "optim.mini_batch_size",
    "optim.micro_batch_size",
    "eval.every",
    "eval.num_tasks",
    "eval.temperature",
    "trainer.steps",
    "model.warm_start.steps",
    "advantage.estimator",
    "advantage.norm_by_std",
    "loss.policy_loss",
    "loss.clip_low",
    "loss.clip_high",
    "loss.clip_c",
    "loss.aggregation",
    "loss.entropy_coef",
    "filters.overlong",
    "filters.group_keep_ratio",
    "replay.enabled",
    "replay.capacity",
    "replay.history_size",
    "replay.recalibration",
    "replay.decay_weight",
    "replay.policy_loss",
    "replay.loss_coef",
    "reward.tool_bonus.mode",
    "reward.tool_bonus.horizon",
]


def _get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg.model_dump(mode="json")
    for part in dotted.split("."):
        value = value[part]
    return value


def method_config(
    method: tuple[str, bool, list[str]],
    run_config: Path,
    sections: tuple[str, ...],
    spear_sections: tuple[str, ...],
    overrides: Sequence[str],
) -> Config:
    """One method's config: its preset <- the ``sections`` of ``run_config`` (plus
    ``spear_sections`` for SPEAR variants) <- ``overrides`` <- the method's own overrides.

    ``method`` is a :data:`METHODS` entry ``(preset, is_spear, extra overrides)``; every method
    built from the same ``run_config`` and ``overrides`` gets the same budget."""
    preset, spear_lines, extra = method
    base = yaml.safe_load(run_config.read_text())
    wanted = sections + (spear_sections if spear_lines else ())
    layer = {k: base[k] for k in wanted if k in base}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "budget.yaml"
        path.write_text(yaml.safe_dump(layer, sort_keys=False))
        return load_config(preset=preset, file=path, overrides=[*overrides, *extra])


def run_overrides(seed: int, save_every: int, threads: int, cache_dir: str) -> list[str]:
    """The overrides every benchmark run gets: seed, checkpointing, threads, quiet, cache."""
    return [
        f"trainer.seed={seed}",
        f"trainer.save_every={save_every}",
        f"trainer.num_threads={threads}",
        "logging.progress=false",
        "logging.tensorboard=false",
        f"model.cache_dir={cache_dir}",
    ]


def build_config(method: str, seed: int, args: argparse.Namespace) -> Config:
    """The run config of ``method``: preset <- budget (and SPEAR) sections of default.yaml <- overrides."""
    overrides = run_overrides(seed, args.save_every, args.threads, args.cache_dir)
    if args.steps is not None:
        overrides.append(f"trainer.steps={args.steps}")
    if args.eval_tasks is not None:
        overrides.append(f"eval.num_tasks={args.eval_tasks}")
    return method_config(
        METHODS[method], DEFAULT_RUN_CONFIG, BUDGET_SECTIONS, SPEAR_SECTIONS, overrides
    )


# ------------------------------------------------------------------------------ summaries


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _series(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if _finite(r.get(key))]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarise_run(rows: Sequence[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Per-run numbers from metrics.jsonl rows."""
    train = [r for r in rows if r["step"] >= 1]
    last = max(train, key=lambda r: r["step"]) if train else {}
    replayed = [r for r in train if _finite(r.get("replay/n_sampled"))]  # steps that consumed
    tail = [r for r in train if r["step"] > steps - 5]  # the last 5 training steps
    out: dict[str, Any] = {
        "steps_done": int(last.get("step", 0)),
        "eval_success": dict(_series(rows, "eval/success")),
        "eval_tool_calls": dict(_series(rows, "eval/tool_calls")),
        "final_eval_success": dict(_series(rows, "eval/success")).get(steps),
        "initial_eval_success": dict(_series(rows, "eval/success")).get(0),
        "final_eval_tool_calls": dict(_series(rows, "eval/tool_calls")).get(steps),
        "train_tool_calls_last5": _mean(
            [r["train/tool_calls"] for r in tail if _finite(r.get("train/tool_calls"))]
        ),
        "train_success_last5": _mean(
            [r["train/success"] for r in tail if _finite(r.get("train/success"))]
        ),
        "actor_entropy": dict(_series(rows, "actor/entropy")),
        "actor_clipfrac_mean": _mean([v for _, v in _series(train, "actor/clipfrac")]),
        "actor_cov_frac_mean": _mean([v for _, v in _series(train, "actor/cov_frac")]),
        "replay_consumes": len(replayed),
        "replay_first_step": min((int(r["step"]) for r in replayed), default=None),
        "replay_optimizer_steps": sum(
            float(r.get("replay/optimizer_steps") or 0) for r in replayed
        ),
        "replay_samples": sum(float(r.get("replay/n_sampled") or 0) for r in replayed),
        "replay_clipfrac_mean": _mean([v for _, v in _series(replayed, "replay/clipfrac")]),
        "replay_cov_frac_mean": _mean([v for _, v in _series(replayed, "replay/cov_frac")]),
        "replay_sil_weight_at_consumes": _mean(
            [v for _, v in _series(replayed, "replay/sil_weight")]
        ),
        "buffer_added_total": last.get("replay/total_added"),
        "zero_std_groups_mean": _mean([v for _, v in _series(train, "filter/zero_std_groups")]),
        "groups_removed_mean": _mean([v for _, v in _series(train, "filter/groups_removed")]),
        "step_time_mean_s": _mean([v for _, v in _series(train, "time/step")]),
    }
    return out


def _fmt(v: float | None, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _mean_std(xs: Sequence[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.4f} (1 seed)"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def write_summary(
    out: Path, runs: dict[str, dict[str, Any]], settings: dict[str, dict[str, Any]]
) -> None:
    """summary.json (every run + per-method aggregates), summary.md (tables), the two plots."""
    methods = [m for m in METHODS if any(r["method"] == m for r in runs.values())]
    agg: dict[str, Any] = {}
    for m in methods:
        rs = sorted((r for r in runs.values() if r["method"] == m), key=lambda r: r["seed"])
        fin = [r["final_eval_success"] for r in rs if r["final_eval_success"] is not None]
        agg[m] = {
            "seeds": [r["seed"] for r in rs],
            "final_eval_success": fin,
            "final_eval_success_mean": statistics.mean(fin) if fin else None,
            "final_eval_success_std": statistics.stdev(fin) if len(fin) > 1 else None,
            **{
                k: _mean([r[k] for r in rs if r[k] is not None])
                for k in (
                    "initial_eval_success",
                    "final_eval_tool_calls",
                    "train_tool_calls_last5",
                    "train_success_last5",
                    "actor_clipfrac_mean",
                    "actor_cov_frac_mean",
                    "replay_consumes",
                    "replay_optimizer_steps",
                    "replay_samples",
                    "replay_clipfrac_mean",
                    "replay_cov_frac_mean",
                    "wall_s",
                )
            },
        }
    (out / "summary.json").write_text(
        json.dumps({"methods": agg, "runs": runs, "settings": settings}, indent=1, sort_keys=True)
    )
    lines = [
        "| method | seeds | held-out success step 0 | final held-out success (mean ± std) | per seed "
        "| held-out tool calls / episode (final) | train tool calls / episode (last 5 steps) "
        "| train success (last 5 steps) | replay updates (consumes) | replay optimizer steps "
        "| replay clipfrac | replay cov_frac | actor clipfrac | actor cov_frac | wall s / run |",
        "|" + "---|" * 15,
    ]
    for m in methods:
        a = agg[m]
        lines.append(
            f"| {m} | {len(a['seeds'])} | {_fmt(a['initial_eval_success'])} "
            f"| {_mean_std(a['final_eval_success'])} "
            f"| {', '.join(f'{x:.4f}' for x in a['final_eval_success'])} "
            f"| {_fmt(a['final_eval_tool_calls'], 3)} | {_fmt(a['train_tool_calls_last5'], 3)} "
            f"| {_fmt(a['train_success_last5'])} | {_fmt(a['replay_consumes'], 2)} "
            f"| {_fmt(a['replay_optimizer_steps'], 2)} | {_fmt(a['replay_clipfrac_mean'])} "
            f"| {_fmt(a['replay_cov_frac_mean'])} | {_fmt(a['actor_clipfrac_mean'])} "
            f"| {_fmt(a['actor_cov_frac_mean'])} | {_fmt(a['wall_s'], 0)} |"
        )
    lines += ["", "| setting | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for key in KEY_SETTINGS:
        vals = [json.dumps(settings[m].get(key)) for m in methods]
        lines.append(f"| `{key}` | " + " | ".join(f"`{v}`" for v in vals) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(out, runs, methods)


def plot(out: Path, runs: dict[str, dict[str, Any]], methods: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")
    for name, key, ylabel, band in (
        ("heldout.png", "eval_success", "held-out success (greedy)", True),
        ("entropy.png", "actor_entropy", "on-policy entropy (nats / token)", False),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, m in enumerate(methods):
            rs = [r for r in runs.values() if r["method"] == m]
            steps = sorted(set.intersection(*(set(map(int, r[key])) for r in rs)))
            if not steps:
                continue
            vals = [[r[key][str(s)] for r in rs] for s in steps]
            mean = [statistics.mean(v) for v in vals]
            style = "-" if m in MAIN_METHODS else "--"
            ax.plot(
                steps,
                mean,
                style,
                color=colors(i),
                marker="o" if len(steps) < 15 else None,
                markersize=4,
                label=f"{m} ({len(rs)} seed{'s' if len(rs) > 1 else ''})",
            )
            if band and len(rs) > 1:
                ax.fill_between(
                    steps,
                    [min(v) for v in vals],
                    [max(v) for v in vals],
                    color=colors(i),
                    alpha=0.12,
                )
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(
            "held-out success: mean over seeds, band = min-max"
            if band
            else "actor/entropy: mean over seeds"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)


# ------------------------------------------------------------------------------ runs


def run_one(method: str, seed: int, cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Train (or resume / skip) one run and return its summary (also written to run.json)."""
    from spear.trainer import Trainer

    steps = cfg.trainer.steps
    marker = run_dir / "run.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("steps") == steps:
            print(f"[skip] {run_dir.name}: finished before", flush=True)
            return done
    final = run_dir / "checkpoints" / f"step_{steps:06d}"
    wall = None
    if not final.exists():
        resume = run_dir.exists() and latest_checkpoint(run_dir) is not None
        if run_dir.exists() and not resume:
            print(f"[restart] {run_dir.name}: incomplete and without checkpoint", flush=True)
            shutil.rmtree(run_dir)
        if not resume:
            run_dir.mkdir(parents=True)
            (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
        print(f"[run] {run_dir.name} ({'resume' if resume else 'fresh'})", flush=True)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, run_dir, resume=resume)

        def on_step(step: int, m: dict[str, float]) -> None:
            ev = f" eval {m['eval/success']:.4f}" if "eval/success" in m else ""
            print(
                f"  {run_dir.name} step {step:3d} train {m.get('train/success', 0):.3f} "
                f"tools {m.get('train/tool_calls', 0):.2f} {m.get('time/step', 0):.1f}s{ev}",
                flush=True,
            )

        try:
            trainer.fit(on_step=on_step)
        finally:
            trainer.close()
        wall = time.perf_counter() - t0
    else:
        print(f"[skip] {run_dir.name}: final checkpoint present; summarising", flush=True)
    summary = summarise_run(read_metrics(run_dir / "metrics.jsonl"), steps)
    summary.update(method=method, seed=seed, steps=steps, wall_s=wall)
    marker.write_text(json.dumps(summary, indent=1))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return json.loads(marker.read_text())  # step keys as strings, as when read back later


def machine() -> dict[str, str]:
    """The machine line of a learning run: :func:`speed_common.machine`'s fields as strings."""
    from speed_common import machine as speed_machine

    m = speed_machine()
    return {
        "nproc": str(m["cores"]),
        **{k: str(m[k]) for k in ("cpu", "python", "torch", "transformers")},
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=MAIN_METHODS, choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="override trainer.steps (default: 30)")
    p.add_argument("--eval-tasks", type=int, default=None, help="override eval.num_tasks")
    p.add_argument(
        "--cache-dir", default="~/.cache/spear", help="warm-model cache (model.cache_dir)"
    )
    p.add_argument("--threads", type=int, default=2, help="trainer.num_threads")
    p.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="trainer.save_every (0 = only the final checkpoint); checkpoints are "
        "deleted once a run is summarised, a killed run resumes from the latest",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="only rewrite summary.json / summary.md / plots from finished runs",
    )
    args = p.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(machine()), flush=True)

    # Runs already summarised in `out` (from earlier invocations) stay in the summary.
    runs: dict[str, dict[str, Any]] = {}
    settings: dict[str, dict[str, Any]] = {}
    for marker in sorted(out.glob("*-s*/run.json")):
        r = json.loads(marker.read_text())
        if r["method"] in METHODS:
            runs[marker.parent.name] = r
    for m in {r["method"] for r in runs.values()} | set(args.methods):
        cfg = build_config(m, args.seeds[0], args)
        settings[m] = {k: _get(cfg, k) for k in KEY_SETTINGS}

    if args.summary_only:
        write_summary(out, runs, settings)
        print((out / "summary.md").read_text())
        return 0
    for seed in args.seeds:  # seed-major: a partial benchmark has every method on the same seeds
        for m in args.methods:
            cfg = build_config(m, seed, args)
            name = f"{m}-s{seed}"
            runs[name] = run_one(m, seed, cfg, out / name)
            write_summary(out, runs, settings)
            r = runs[name]
            print(
                f"[done] {name}: held-out {r['initial_eval_success']} -> "
                f"{r['final_eval_success']}, wall {r['wall_s']}",
                flush=True,
            )
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
