"""The report of a comparison: ``summary.json``, ``summary.md`` and the plots.

Per method: the final evaluation success of every seed with its mean and a 95% percentile
bootstrap interval of the mean over seeds; the warm (step-0) success; the swept value used; and
curves over steps, each the mean over seeds with its min-max band -- evaluation success, sampled
training success, per-token policy entropy, tool calls per episode, the fraction of groups whose
rewards are all equal (no gradient), and self-imitation (replayed rows per step; steps that
replayed are the triggers).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from spear.compare import CompareSpec, RunPlan

BOOTSTRAP_RESAMPLES = 10_000
#: curve name -> how one metrics row gives its value (None: the row has none)
CURVES = {
    "train_success": lambda r: r.get("train/success"),
    "entropy": lambda r: r.get("actor/entropy"),
    "tool_calls": lambda r: r.get("train/tool_calls"),
    "invalid_actions": lambda r: r.get("train/invalid_actions"),
    "all_equal_groups": lambda r: _ratio(
        r.get("filter/zero_std_groups"), r.get("filter/groups_before")
    ),
    "replayed_rows": lambda r: r.get("replay/n_sampled", 0.0) if r.get("step", 0) > 0 else None,
}


def _ratio(a: Any, b: Any) -> float | None:
    return float(a) / float(b) if _finite(a) and _finite(b) and b > 0 else None


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def bootstrap_ci(
    values: Sequence[float],
    *,
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    x = np.asarray(values, dtype=np.float64)  # [n]
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)  # [resamples]
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_diff_ci(
    a: Sequence[float], b: Sequence[float], *, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(a) - mean(b)``, each resampled on its own."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.size == 0 or xb.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    da = xa[rng.integers(0, xa.size, size=(BOOTSTRAP_RESAMPLES, xa.size))].mean(axis=1)
    db = xb[rng.integers(0, xb.size, size=(BOOTSTRAP_RESAMPLES, xb.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(da - db, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_paired_ci(
    a: Sequence[float], b: Sequence[float], *, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(a - b)`` over pairs ``(a[i], b[i])`` resampled
    together. Runs of one seed share their held-out problems, warm model and first rollouts, so
    pairing by seed cancels the spread between seeds that both methods see."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)  # [n]
    return bootstrap_ci(d.tolist(), level=level, seed=seed)


def band(per_seed: Sequence[dict[int, float]]) -> dict[str, list[float]]:
    """Mean and min-max over seeds at every step some seed has: ``{step, mean, min, max}``."""
    steps = sorted({s for series in per_seed for s in series})
    out: dict[str, list[float]] = {"step": [], "mean": [], "min": [], "max": []}
    for s in steps:
        vals = [series[s] for series in per_seed if s in series]
        out["step"].append(float(s))
        out["mean"].append(statistics.fmean(vals))
        out["min"].append(min(vals))
        out["max"].append(max(vals))
    return out


def _series(rows: Sequence[dict[str, Any]], get: Any) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in rows:
        v = get(r)
        if _finite(v):
            out[int(r["step"])] = float(v)
    return out


def method_summary(records: Sequence[dict[str, Any]], lr: float, steps: int) -> dict[str, Any]:
    """The summary of one method's runs (``records`` sorted by seed)."""
    evals = [_series(r["rows"], lambda row: row.get("eval/success")) for r in records]
    final = [e.get(steps, math.nan) for e in evals]
    warm = [e.get(0, math.nan) for e in evals]
    curves = {
        name: band([_series(r["rows"], get) for r in records]) for name, get in CURVES.items()
    }
    triggers = [
        sum(1 for row in r["rows"] if _finite(row.get("replay/n_sampled"))) for r in records
    ]
    replayed = [
        sum(float(row.get("replay/n_sampled") or 0.0) for row in r["rows"]) for r in records
    ]
    lo, hi = bootstrap_ci([v for v in final if _finite(v)])
    return {
        "seeds": [int(r["seed"]) for r in records],
        "steps": steps,
        "lr": lr,
        "final_heldout": final,
        "final_heldout_mean": statistics.fmean(final) if final else math.nan,
        "final_heldout_ci95": [lo, hi],
        "warm_heldout": warm,
        "sil_triggers_per_run": triggers,
        "replayed_rows_per_step": [x / steps for x in replayed],
        "wall_s": [float(r.get("wall_s") or 0.0) for r in records],
        "curves": {"heldout": band(evals), **curves},
    }


def write_report(
    spec: CompareSpec,
    plans: Sequence[RunPlan],
    records: Sequence[dict[str, Any]],
    sweep_records: Sequence[dict[str, Any]],
    chosen: dict[str, str],
) -> dict[str, Any]:
    """Write ``summary.json``, ``summary.md`` and the plots under ``spec.out``; return the summary."""
    from spear.compare import final_success

    lr_of = {p.method: p.config.optim.lr for p in plans}
    steps_of = {p.method: p.config.trainer.steps for p in plans}
    methods: dict[str, Any] = {}
    for m in spec.methods:
        rs = sorted((r for r in records if r["method"] == m), key=lambda r: r["seed"])
        if rs:
            methods[m] = method_summary(rs, lr_of[m], steps_of[m])
    sweep: dict[str, dict[str, list[float]]] = {}
    for r in sweep_records:
        sweep.setdefault(r["method"], {}).setdefault(str(r["value"]), []).append(final_success(r))
    summary = {
        "base": spec.base,
        "task": plans[0].config.task.name if plans else None,
        "overrides": list(spec.overrides),
        "sweep": {
            "values": {k: list(v) for k, v in spec.sweep.items()},
            "validation_final": sweep,
            "chosen": chosen,
            "carried_over": bool(spec.chosen),
        },
        "methods": methods,
        "gaps": _gaps(methods),
    }
    (spec.out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=True))
    (spec.out / "summary.md").write_text(summary_markdown(summary))
    plot_summary(summary, spec.out)
    return summary


def _gaps(methods: dict[str, Any]) -> dict[str, Any]:
    """``spear`` minus each other method: mean difference of final success and its 95% CI, and,
    over the seeds both ran, the paired difference (``paired``: mean, CI, seeds)."""
    if "spear" not in methods:
        return {}
    spear = methods["spear"]
    ref = [v for v in spear["final_heldout"] if _finite(v)]
    out: dict[str, Any] = {}
    for name, m in methods.items():
        other = [v for v in m["final_heldout"] if _finite(v)]
        if name == "spear" or not other or not ref:
            continue
        lo, hi = bootstrap_diff_ci(ref, other)
        gap: dict[str, Any] = {
            "mean": statistics.fmean(ref) - statistics.fmean(other),
            "ci95": [lo, hi],
        }
        theirs = dict(zip(m["seeds"], m["final_heldout"]))
        pairs = [
            (v, theirs[s])
            for s, v in zip(spear["seeds"], spear["final_heldout"])
            if s in theirs and _finite(v) and _finite(theirs[s])
        ]
        if len(pairs) >= 2:
            a, b = zip(*pairs)
            plo, phi = bootstrap_paired_ci(a, b)
            mean = statistics.fmean(x - y for x, y in pairs)
            gap["paired"] = {"mean": mean, "ci95": [plo, phi], "seeds": len(pairs)}
        out[f"spear-{name}"] = gap
    return out


def _pct(x: float) -> str:
    return "–" if not _finite(x) else f"{100 * x:.1f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The comparison's tables as Markdown (success in percent)."""
    lines = [
        "| method | lr | warm | final held-out (mean) | 95% CI | per seed | SIL triggers / run | replayed rows / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["methods"].items():
        lo, hi = m["final_heldout_ci95"]
        warm = statistics.fmean(m["warm_heldout"]) if m["warm_heldout"] else math.nan
        lines.append(
            f"| {name} | {m['lr']:g} | {_pct(warm)} | {_pct(m['final_heldout_mean'])} | "
            f"[{_pct(lo)}, {_pct(hi)}] | {', '.join(_pct(v) for v in m['final_heldout'])} | "
            f"{statistics.fmean(m['sil_triggers_per_run']):.1f} | "
            f"{statistics.fmean(m['replayed_rows_per_step']):.2f} |"
        )
    if summary["gaps"]:
        lines += [
            "",
            "| gap | mean (points) | 95% CI | paired by seed: mean | paired 95% CI |",
            "|---|---|---|---|---|",
        ]
        for name, g in summary["gaps"].items():
            p = g.get("paired") or {"mean": math.nan, "ci95": [math.nan, math.nan]}
            lines.append(
                f"| {name} | {_pct(g['mean'])} | [{_pct(g['ci95'][0])}, {_pct(g['ci95'][1])}] | "
                f"{_pct(p['mean'])} | [{_pct(p['ci95'][0])}, {_pct(p['ci95'][1])}] |"
            )
    sweep = summary["sweep"]
    if sweep["validation_final"]:
        lines += [
            "",
            "| method | swept value: mean final validation success | chosen |",
            "|---|---|---|",
        ]
        for name, by_value in sweep["validation_final"].items():
            cells = ", ".join(f"{v}: {_pct(statistics.fmean(s))}" for v, s in by_value.items())
            lines.append(f"| {name} | {cells} | {sweep['chosen'].get(name)} |")
    elif sweep.get("carried_over"):
        picks = ", ".join(f"{m} {v}" for m, v in sweep["chosen"].items())
        lines += ["", f"Swept setting carried over from another comparison's sweep: {picks}."]
    return "\n".join(lines) + "\n"


_PANELS = (
    ("heldout", "held-out success"),
    ("train_success", "sampled training success"),
    ("entropy", "policy entropy (per token)"),
    ("tool_calls", "tool calls / episode"),
    ("all_equal_groups", "groups with all-equal rewards"),
    ("replayed_rows", "replayed rows / step"),
)
#: task name -> (curve, title) in place of the tool-call panel, for tasks that act without tools
ACTION_PANELS = {"textworld": ("invalid_actions", "inadmissible actions / episode")}


def panels(task: str | None) -> tuple[tuple[str, str], ...]:
    """The six (curve, title) panels of ``curves.png`` for a comparison on ``task``."""
    swap = ACTION_PANELS.get(task or "")
    return tuple(swap if swap and key == "tool_calls" else (key, t) for key, t in _PANELS)


def plot_summary(summary: dict[str, Any], out: Path) -> None:
    """``curves.png``: the six curves, mean over seeds with a min-max band, one line a method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title) in zip(axes.flat, panels(summary.get("task"))):
        for name, m in summary["methods"].items():
            c = m["curves"].get(key, {"step": []})
            if not c["step"]:
                continue
            (line,) = ax.plot(
                c["step"], c["mean"], label=name, marker="o" if key == "heldout" else None
            )
            ax.fill_between(c["step"], c["min"], c["max"], alpha=0.15, color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"spear compare: {summary['base'] or 'defaults'} (mean over seeds, min-max band)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)
