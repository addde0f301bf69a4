"""PNG curves of a run from its ``metrics.jsonl``: success, entropy, tool use, curriculum, replay."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spear.metrics import read_metrics


@dataclass(frozen=True, slots=True)
class Panel:
    """One subplot: its title, ``(metric, label)`` series and y-label. ``drop_zero``: a series
    that is zero at every step is left out when another one is not (a tool task has no
    inadmissible actions, a text game no tool calls)."""

    title: str
    series: tuple[tuple[str, str], ...]
    ylabel: str
    drop_zero: bool = False


PANELS: tuple[Panel, ...] = (
    Panel("Success", (("train/success", "train"), ("eval/success", "held-out")), "success rate"),
    Panel(
        "Policy entropy",
        (("actor/entropy", "on-policy"), ("replay/entropy", "replay")),
        "nats / token",
    ),
    Panel(
        "Tool calls / inadmissible actions",
        (
            ("train/tool_calls", "valid tool calls"),
            ("train/invalid_tool_calls", "invalid tool calls"),
            ("train/invalid_actions", "inadmissible actions"),
        ),
        "per episode",
        drop_zero=True,
    ),
    Panel(
        "Curriculum",
        (
            ("replay/sil_weight", "SIL weight λ(t)"),
            ("reward/tool_factor", "tool-reward factor φ(t)"),
        ),
        "weight",
    ),
    Panel(
        "Replay buffer",
        (
            ("replay/size", "stored"),
            ("replay/eligible", "eligible (pass recalibration)"),
            ("replay/trigger_at", "SIL trigger (> trigger_ratio × capacity)"),
            ("replay/n_sampled", "replayed"),
        ),
        "samples",
    ),
    Panel(
        "Reward",
        (("reward/outcome", "outcome"), ("reward/tool_bonus", "tool bonus")),
        "mean per sample",
    ),
)


def panel_series(
    rows: Sequence[dict[str, Any]], panel: Panel
) -> list[tuple[str, list[int], list[float]]]:
    """``(label, steps, values)`` of the series of ``panel`` that the run recorded (after
    ``drop_zero``)."""
    out = [(label, *_series(rows, key)) for key, label in panel.series]
    out = [s for s in out if s[1]]
    if panel.drop_zero and any(any(s[2]) for s in out):
        out = [s for s in out if any(s[2])]
    return out


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``<run_dir>/plots/curves.png`` (or ``out``) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl; is it a spear run directory?")
    rows = read_metrics(path)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, panel in zip(axes.flat, PANELS):
        drawn = panel_series(rows, panel)
        for label, xs, ys in drawn:
            ax.plot(xs, ys, marker="o" if len(xs) < 15 else None, markersize=3, label=label)
        ax.set_title(panel.title)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(
                0.5,
                0.5,
                "not recorded in this run",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="gray",
            )
    fig.suptitle(f"spear run: {run_dir.name}")
    fig.tight_layout()
    out = out or run_dir / "plots" / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
