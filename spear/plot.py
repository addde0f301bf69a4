"""PNG curves of a run from its ``metrics.jsonl``: success, entropy, tool use, curriculum, replay."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spear.metrics import read_metrics

# (title, [(metric, label)], y-label) per panel
PANELS: list[tuple[str, list[tuple[str, str]], str]] = [
    ("Success", [("train/success", "train"), ("eval/success", "held-out")], "success rate"),
    (
        "Policy entropy",
        [("actor/entropy", "on-policy"), ("replay/entropy", "replay")],
        "nats / token",
    ),
    (
        "Tool calls per episode",
        [("train/tool_calls", "valid"), ("train/invalid_tool_calls", "invalid")],
        "calls",
    ),
    (
        "Curriculum",
        [
            ("replay/sil_weight", "SIL weight λ(t)"),
            ("reward/tool_factor", "tool-reward factor φ(t)"),
        ],
        "weight",
    ),
    (
        "Replay buffer",
        [
            ("replay/size", "stored"),
            ("replay/eligible", "eligible (pass recalibration)"),
            ("replay/trigger_at", "SIL trigger (> trigger_ratio × capacity)"),
            ("replay/n_sampled", "replayed"),
        ],
        "samples",
    ),
    (
        "Reward",
        [("reward/outcome", "outcome"), ("reward/tool_bonus", "tool bonus")],
        "mean per sample",
    ),
]


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

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl; is it a spear run directory?")
    rows = read_metrics(path)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (title, series, ylabel) in zip(axes.flat, PANELS):
        drawn = False
        for key, label in series:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 15 else None, markersize=3, label=label)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
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
