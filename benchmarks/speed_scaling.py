"""How SPEAR's step time and its stage split grow as group size, turns and completion length double.

    python benchmarks/speed_scaling.py --steps 3      # -> results/speed/scaling.{json,png}

One worker process per configuration (``speed_common.py worker``, the ``spear`` method with the
default run's budget), all alive for the whole run and stepped round-robin (one warm-up step
each, dropped), so every configuration sees the same machine load; each step's process CPU time
(``speed_common.CpuProbes``; wall time is recorded too) is divided by the base configuration's
step of the same round.

* group size 4 / 8 / 16 (16 tasks per step, 4 turns, 48 new tokens per turn);
* max turns 1 / 2 / 4 (group 8): the cap doubles; the model decides how many turns it takes, so
  the measured turns per episode are reported beside the time;
* completion length 32 / 64 / 128 tokens, single turn, stop tokens disabled (``--force-length``
  in the worker), so every completion has exactly that many tokens; response filters off (a
  completion that never ends would be filtered as overlong / incomplete).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import DEFAULT_CACHE, RESULTS, Worker, machine, spear_worker_cmd, write_result

STAGES = ["generation", "env_and_rest", "old_logprobs", "update", "sil_update", "other"]
BASE = "base (g8, 4 turns, 48 tok)"
# Forced-length completions never end their turn: the overlong / incomplete filters would drop
# them all and leave the update empty, so the length series trains every sequence.
NO_RESPONSE_FILTERS = ["filters.overlong=false", "filters.incomplete=false", "filters.repetitive=false",
                       "filters.unreadable=false"]  # fmt: skip


def configs() -> dict[str, tuple[str, float, list[str], bool]]:
    """name -> (series, x value, overrides, force_length)."""
    out: dict[str, tuple[str, float, list[str], bool]] = {BASE: ("base", 0, [], False)}
    for g in (4, 16):
        out[f"group {g}"] = ("group_size", g, [f"rollout.group_size={g}"], False)
    for t in (1, 2):
        out[f"turns {t}"] = ("max_turns", t, [f"rollout.max_turns={t}"], False)
    for n in (32, 64, 128):
        over = ["rollout.max_turns=1", f"rollout.max_new_tokens={n}", f"rollout.max_response_tokens={n}",
                "rollout.max_context_tokens=512", *NO_RESPONSE_FILTERS]  # fmt: skip
        out[f"length {n} (forced, 1 turn)"] = ("completion_length", n, over, True)
    return out


def row(rec: dict[str, Any]) -> dict[str, float]:
    """Process CPU seconds per stage (``speed_common.CpuProbes``) and the step's facts."""
    m = rec["metrics"]
    gen = float(m.get("cpu/generation", 0.0))
    r = {"generation": gen, "env_and_rest": float(m.get("cpu/rollout", 0.0)) - gen}
    r.update({k: float(m.get(f"cpu/{k}", 0.0)) for k in ("old_logprobs", "update", "sil_update")})
    r["other"] = rec["cpu_s"] - sum(r.values())
    r.update(cpu=rec["cpu_s"], wall=rec["wall_s"], tokens=float(m["tokens"]), turns=float(m["train/turns"]),
             response_tokens=float(m["train/response_tokens"]), episodes=float(m["train/episodes"]),
             peak_rss_mb=rec["peak_rss_mb"])  # fmt: skip
    return r


def run(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    cfgs = configs()
    workers = {
        name: Worker(
            spear_worker_cmd("spear", over, args.cache_dir, args.threads, force_length=force)
        )
        for name, (_, _, over, force) in cfgs.items()
    }
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in workers}
    names = list(workers)
    try:
        for k in range(args.steps + 1):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                r = row(workers[name].step())
                if k > 0:
                    rows[name].append(r)
                print(k + 1, name, {a: round(b, 2) for a, b in r.items()}, flush=True)
    finally:
        for w in workers.values():
            w.close()
    return rows


def summarise(rows: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    cfgs, base = configs(), rows[BASE]
    out: dict[str, Any] = {}
    for name, rs in rows.items():
        series, x, _, _ = cfgs[name]
        ratios = [r["cpu"] / b["cpu"] for r, b in zip(rs, base)]
        wall = [r["wall"] / b["wall"] for r, b in zip(rs, base)]
        out[name] = {
            "series": series, "x": x,
            "median_cpu_s": statistics.median(r["cpu"] for r in rs),
            "median_wall_s": statistics.median(r["wall"] for r in rs),
            "cpu_ratio_vs_base": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "wall_ratio_vs_base": {"median": statistics.median(wall), "min": min(wall), "max": max(wall)},
            "mean_stage_cpu_s": {s: statistics.mean(r[s] for r in rs) for s in STAGES},
            "stage_share": {s: sum(r[s] for r in rs) / sum(r["cpu"] for r in rs) for s in STAGES},
            "tokens_per_step": statistics.mean(r["tokens"] for r in rs),
            "response_tokens_per_episode": statistics.mean(r["response_tokens"] for r in rs),
            "turns_per_episode": statistics.mean(r["turns"] for r in rs),
            "tokens_per_cpu_s": sum(r["tokens"] for r in rs) / sum(r["cpu"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
        }  # fmt: skip
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    base = summary[BASE]
    xs_base = {"group_size": 8, "max_turns": 4}
    for ax, series in zip(axes, ("group_size", "max_turns", "completion_length")):
        pts = sorted((v["x"], k) for k, v in summary.items() if v["series"] == series)
        if series in xs_base:
            pts = sorted([*pts, (xs_base[series], BASE)])
        xs = [x for x, _ in pts]
        bottom = [0.0] * len(pts)
        for s in STAGES:
            vals = [summary[k]["mean_stage_cpu_s"][s] for _, k in pts]
            ax.bar([str(int(x)) for x in xs], vals, bottom=bottom, label=s)
            bottom = [a + b for a, b in zip(bottom, vals)]
        ax.set_title(series)
        ax.set_ylabel("mean CPU s / step")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"SPEAR step CPU time by stage (base {base['median_cpu_s']:.1f} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--steps", type=int, default=3, help="measured steps per configuration (after 1 warm-up)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    args = p.parse_args()
    load_before = machine()["loadavg"]
    rows = run(args)
    summary = summarise(rows)
    write_result(args.out, summary, rows, load_before, plot=lambda png: plot(summary, png))


if __name__ == "__main__":
    main()
