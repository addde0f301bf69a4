"""Per-stage step time of Dr.BoT vs SPEAR in the same run, interleaved: SPEAR's overhead ratio.

    python benchmarks/speed_stages.py --steps 12            # -> results/speed/stages.{json,png}

Two worker processes (``speed_common.py worker``), one per method, train from the same cached
warm-started tiny model with the default run's budget (16 tasks x 8 rollouts, 4 turns, 48 new
tokens per turn; ``benchmarks/learning.py``'s method table). Step ``k`` of both methods runs back
to back, the order alternating with ``k``, so both see the same machine load. Per step we record
the wall time, the trainer's stage split (generation, env / tools, rest of the rollout, old
log-probs, update, SIL update), the untimed remainder (rewards with the tool bonus, filters,
advantages, replay add / consume, metric sync; probed by wrapping those functions), sequence
tokens, tokens/s and each process's peak RSS.

Overhead ratio = SPEAR seconds / Dr.BoT seconds of the same step index, on process CPU time
(the steady measure on a shared machine, see ``speed_common.CpuProbes``) and on wall time:
median, min and max over steps, plus the ratio of the totals (amortised over the run, SIL steps
included) and the same per token (the two methods' rollouts differ in length once the tool
bonus changes behaviour).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import (
    DEFAULT_CACHE,
    RESULTS,
    Worker,
    machine,
    ratio_summary,
    spear_worker_cmd,
    write_result,
)

STAGES = ["generation", "env_and_rest", "old_logprobs", "update", "sil_update", "other"]
CLOCKS = ("cpu", "wall")


def stage_row(rec: dict[str, Any]) -> dict[str, float]:
    """Seconds per stage of one step record, on both clocks (``cpu_*``: process CPU time from
    ``speed_common.CpuProbes``; ``wall_*``: the trainer's ``time/*``). ``env_and_rest`` = the
    rollout minus generation (env / tool calls, prompt rendering, observation tokens);
    ``other`` = the step minus the timed stages (rewards with the tool bonus, filters, advantages,
    replay add, metric sync)."""
    m = rec["metrics"]
    row: dict[str, float] = {}
    for clock, prefix, total in (("cpu", "cpu/", rec["cpu_s"]), ("wall", "time/", rec["wall_s"])):
        gen, roll = float(m.get(f"{prefix}generation", 0.0)), float(m.get(f"{prefix}rollout", 0.0))
        parts = {"generation": gen, "env_and_rest": roll - gen}
        parts.update(
            {k: float(m.get(f"{prefix}{k}", 0.0)) for k in ("old_logprobs", "update", "sil_update")}
        )
        parts["other"] = total - sum(parts.values())
        row.update({f"{clock}_{k}": v for k, v in parts.items()})
        row[clock] = total
    row["wall_env"] = float(m.get("time/env", 0.0))
    row["tokens"] = float(m["tokens"])
    row["response_tokens"] = float(m["train/response_tokens"]) * float(m["train/episodes"])
    row["sil_triggered"] = float("replay/n_sampled" in m)
    row["peak_rss_mb"] = rec["peak_rss_mb"]
    for k, v in m.items():
        if k.startswith("probe/"):
            row[k] = float(v)
    return row


def run(
    methods: list[str], steps: int, threads: int, cache_dir: str, overrides: list[str]
) -> dict[str, list[dict[str, float]]]:
    """Interleaved steps of every method; ``{method: [row per step]}``."""
    workers = {m: Worker(spear_worker_cmd(m, overrides, cache_dir, threads)) for m in methods}
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    try:
        for k in range(steps):
            for m in methods if k % 2 == 0 else methods[::-1]:
                rows[m].append(stage_row(workers[m].step()))
                print(
                    m,
                    k + 1,
                    {s: round(v, 2) for s, v in rows[m][-1].items() if s.startswith("cpu")},
                    flush=True,
                )
    finally:
        for w in workers.values():
            w.close()
    return rows


def _overhead(b: list[dict[str, float]], o: list[dict[str, float]], clock: str) -> dict[str, Any]:
    """Ratios ``o / b`` of step seconds on ``clock``: per step, of totals, per token, SIL split."""
    per_step = [y[clock] / x[clock] for x, y in zip(b, o)]
    trig = [i for i, r in enumerate(o) if r["sil_triggered"]]
    rest = [i for i in range(len(o)) if i not in trig]

    def total(rs: list[dict[str, float]], key: str) -> float:
        return sum(r[key] for r in rs)

    return {
        "per_step": ratio_summary(per_step),
        "per_step_per_token": ratio_summary(
            [(y[clock] / y["tokens"]) / (x[clock] / x["tokens"]) for x, y in zip(b, o)]
        ),
        "total": total(o, clock) / total(b, clock),
        "total_per_token": (total(o, clock) / total(o, "tokens"))
        / (total(b, clock) / total(b, "tokens")),
        "sil_triggered_steps": ratio_summary([per_step[i] for i in trig]) if trig else None,
        "non_sil_steps": ratio_summary([per_step[i] for i in rest]) if rest else None,
        "sil_update_s_median_on_triggered_steps": statistics.median(
            o[i][f"{clock}_sil_update"] for i in trig
        )
        if trig
        else None,
        "update_per_token": ratio_summary(
            [
                (y[f"{clock}_update"] / y["tokens"]) / (x[f"{clock}_update"] / x["tokens"])
                for x, y in zip(b, o)
            ]
        ),
    }


def summarise(rows: dict[str, list[dict[str, float]]], base: str, other: str) -> dict[str, Any]:
    """Means per stage, throughput, memory, and the overhead ratios of ``other`` over ``base``."""
    out: dict[str, Any] = {"per_method": {}}
    for m, rs in rows.items():
        out["per_method"][m] = {
            **{f"mean_{c}_s": {st: statistics.mean(r[f"{c}_{st}"] for r in rs) for st in STAGES} | {"step": statistics.mean(r[c] for r in rs)} for c in CLOCKS},
            "tokens_per_cpu_s": sum(r["tokens"] for r in rs) / sum(r["cpu"] for r in rs),
            "tokens_per_wall_s": sum(r["tokens"] for r in rs) / sum(r["wall"] for r in rs),
            "tokens_per_step": statistics.mean(r["tokens"] for r in rs),
            "response_tokens_per_step": statistics.mean(r["response_tokens"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "sil_steps": [i + 1 for i, r in enumerate(rs) if r["sil_triggered"]],
            "probes_mean_wall_s": {
                k: statistics.mean(r.get(k, 0.0) for r in rs) for k in sorted({k for r in rs for k in r if k.startswith("probe/")})
            },
        }  # fmt: skip
    out["overhead"] = {c: _overhead(rows[base], rows[other], c) for c in CLOCKS}
    return out


def plot(rows: dict[str, list[dict[str, float]]], path: Path) -> None:
    """Stacked mean seconds per stage, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = list(rows)
    bottom = [0.0] * len(methods)
    for s in STAGES:
        vals = [statistics.mean(r[f"cpu_{s}"] for r in rows[m]) for m in methods]
        ax.bar(methods, vals, bottom=bottom, label=s)
        bottom = [a + b for a, b in zip(bottom, vals)]
    ax.set_ylabel("mean process CPU seconds / step")
    ax.set_title("step time by stage (interleaved, same run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def loss_bench(reps: int, rows: int, width: int, response_frac: float) -> dict[str, Any]:
    """Seconds per call of the on-policy loss, vanilla vs Clip-Cov (forward + backward of the
    loss on ``[rows, width]`` log-probs, ``response_frac`` of the tokens in the loss), interleaved."""
    import time

    import torch

    from spear.algo.losses import POLICY_LOSSES, PolicyLossInput, PolicyLossParams

    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(rows, width, generator=g) < response_frac).float()
    old = -torch.rand(rows, width, generator=g)
    adv = torch.randn(rows, 1, generator=g).expand(rows, width) * mask
    params = PolicyLossParams(
        clip_low=0.2, clip_high=0.28, clip_c=10.0, cov_ratio=0.0002, cov_lb=1.0, cov_ub=5.0,
        kl_cov_ratio=0.0002, kl_cov_coef=1.0,
    )  # fmt: skip
    times: dict[str, list[float]] = {"vanilla": [], "clip_cov": []}
    for _ in range(reps):
        for name in times:
            lp = (old + 0.01 * torch.randn(rows, width, generator=g)).requires_grad_(True)
            t0 = time.process_time()
            out = POLICY_LOSSES.get(name)(PolicyLossInput(lp, old, adv, mask), params, g)
            (out.token_loss * mask).sum().backward()
            times[name].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": [rows, width],
        "reps": reps,
        "median_cpu_s": med,
        "clip_cov_minus_vanilla_s": med["clip_cov"] - med["vanilla"],
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--set", action="append", default=[], help="config override for both methods")
    p.add_argument("--out", type=Path, default=RESULTS / "stages.json")
    p.add_argument(
        "--loss-bench", action="store_true", help="only time vanilla vs Clip-Cov loss calls"
    )
    args = p.parse_args()
    if args.loss_bench:
        res = loss_bench(reps=200, rows=32, width=150, response_frac=0.25)
        (RESULTS / "loss_bench.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return
    load_before = machine()["loadavg"]
    rows = run(["drbot", "spear"], args.steps, args.threads, args.cache_dir, args.set)
    summary = summarise(rows, "drbot", "spear")
    write_result(args.out, summary, rows, load_before, plot=lambda png: plot(rows, png))


if __name__ == "__main__":
    main()
