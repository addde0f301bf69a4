"""``spear compare``: the command line of :mod:`spear.compare`."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from spear.config import ConfigError

log = logging.getLogger("spear")


def _sweep(items: list[str]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(
                f"--sweep {item!r}: write section.key=v1,v2,... (e.g. optim.lr=1e-4,3e-4)"
            )
        out[key] = tuple(v.strip() for v in values.split(",") if v.strip())
    return out


def _chosen_from(path: str | None) -> dict[str, str]:
    """The sweep's choices recorded in a comparison's ``summary.json`` ({} without a path)."""
    if path is None:
        return {}
    try:
        chosen = json.loads(Path(path).read_text())["sweep"]["chosen"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--chosen-from {path}: not a compare summary.json ({e})") from None
    if not chosen:
        raise ConfigError(f"--chosen-from {path}: that comparison ran no sweep")
    return {str(m): str(v) for m, v in chosen.items()}


def add_compare_parser(sub: Any) -> None:
    from spear.compare import METHODS

    c = sub.add_parser(
        "compare",
        help="train methods x seeds at identical budgets; resumable; writes summary.json and plots",
        description=(
            "Compare recipes fairly: every method gets the base config's task, model and budget; "
            "with --sweep each method gets the same sweep, chosen on the validation split, before "
            "the main runs on the held-out split. Running it again resumes after a kill."
        ),
    )
    c.add_argument(
        "config", nargs="?", help="base run config (YAML file or shipped name, e.g. lookup)"
    )
    c.add_argument("overrides", nargs="*", help="section.key=value applied to every method")
    c.add_argument("--methods", nargs="+", default=["grpo", "drbot", "spear"], metavar="M",
                   help=f"methods to compare (known: {', '.join(METHODS.names())})")  # fmt: skip
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the main runs")
    c.add_argument("--sweep", nargs="*", default=[], metavar="KEY=V1,V2",
                   help="one setting to sweep per method, e.g. optim.lr=1e-4,3e-4,1e-3")  # fmt: skip
    c.add_argument("--sweep-seeds", nargs="*", type=int, default=[], help="seeds of the sweep runs")
    c.add_argument("--chosen-from", metavar="SUMMARY_JSON",
                   help="skip the sweep: use the values another comparison's sweep chose "
                        "(its summary.json; give the same --sweep)")  # fmt: skip
    c.add_argument("--out", required=True, help="output directory (reused: finished runs are kept)")
    c.add_argument(
        "--jobs", type=int, default=1, help="runs at a time (each in its own process, 1 thread)"
    )
    c.add_argument("--keep-horizons", action="store_true",
                   help="do not set the curriculum horizons to trainer.steps")  # fmt: skip
    c.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from spear.compare import CompareSpec, RunPlan, plan_runs, run_comparison

    console = Console()
    spec = CompareSpec(
        base=args.config,
        methods=tuple(args.methods),
        seeds=tuple(args.seeds),
        out=Path(args.out),
        overrides=tuple(args.overrides),
        sweep=_sweep(args.sweep),
        sweep_seeds=tuple(args.sweep_seeds),
        match_horizons=not args.keep_horizons,
        jobs=args.jobs,
        chosen=_chosen_from(args.chosen_from),
    )
    n_sweep = (
        len(plan_runs(spec)) if spec.sweep and not spec.chosen else 0
    )  # builds every config: errors show now
    n_main = len(spec.methods) * len(spec.seeds)
    console.print(
        f"[bold]spear compare[/]: {', '.join(spec.methods)} x seeds {list(spec.seeds)}"
        + (f", sweep {n_sweep} runs" if n_sweep else "")
        + f", main {n_main} runs -> {spec.out}"
    )
    start, done = time.perf_counter(), [0]

    def on_done(plan: RunPlan, record: dict[str, Any]) -> None:
        done[0] += 1
        from spear.compare import final_success

        console.print(
            f"  [{done[0]}/{n_sweep + n_main}] {plan.phase} {plan.method} seed {plan.seed}"
            + (f" {plan.value}" if plan.value else "")
            + f": final {plan.config.eval.split} success {final_success(record):.1%}"
            + f" ({record.get('wall_s', 0):.0f} s; {time.perf_counter() - start:.0f} s so far)"
        )

    summary = run_comparison(spec, on_done)
    table = Table(title=f"final {'held-out'} success (mean over seeds, 95% bootstrap CI)")
    for col in ("method", "lr", "warm", "final", "95% CI", "per seed"):
        table.add_column(col)
    for name, m in summary["methods"].items():
        lo, hi = m["final_heldout_ci95"]
        warm = sum(m["warm_heldout"]) / len(m["warm_heldout"])
        table.add_row(
            name,
            f"{m['lr']:g}",
            f"{warm:.1%}",
            f"{m['final_heldout_mean']:.1%}",
            f"[{lo:.1%}, {hi:.1%}]",
            " ".join(f"{v:.1%}" for v in m["final_heldout"]),
        )
    console.print(table)
    console.print(
        f"summary: {spec.out / 'summary.json'}, {spec.out / 'summary.md'}; plots: {spec.out / 'curves.png'}"
    )
    return 0
