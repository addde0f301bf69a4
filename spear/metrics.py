"""Metric sinks: JSON lines (always), TensorBoard (when installed), Weights & Biases (opt-in).

Metrics arrive once per step as a flat ``dict[str, float]`` with ``/``-separated names
(``train/success``, ``replay/size``, ...). Tensors are converted by :func:`sync_metrics`, the one
host synchronisation of a step.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def sync_metrics(metrics: Mapping[str, Tensor | float | int]) -> dict[str, float]:
    """Turn a mix of tensors and numbers into floats with a single device->host copy."""
    names = [k for k, v in metrics.items() if isinstance(v, Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)}
    by_device: dict[torch.device, list[str]] = {}
    for k in names:
        by_device.setdefault(metrics[k].device, []).append(k)  # type: ignore[union-attr]
    for keys in by_device.values():  # stacked where they live: one copy per device
        stacked = torch.stack([metrics[k].detach().float().reshape(()) for k in keys])  # type: ignore[union-attr]
        out.update(zip(keys, stacked.cpu().tolist()))
    return dict(sorted(out.items()))


class MetricSink(Protocol):
    def write(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per step to ``metrics.jsonl``; non-finite values become null."""

    def __init__(self, path: Path, *, truncate_after_step: int | None = None) -> None:
        self.path = path
        if truncate_after_step is not None and path.exists():
            # On resume, drop rows written after the checkpoint so the file equals an uninterrupted run.
            keep = [
                json.dumps(row)
                for row in read_metrics(path)
                if row.get("step", 0) <= truncate_after_step
            ]
            path.write_text("".join(ln + "\n" for ln in keep))
        self._fh = path.open("a")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        row: dict[str, Any] = {"step": step}
        row.update({k: (v if math.isfinite(v) else None) for k, v in metrics.items()})
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(str(log_dir))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self._w.add_scalar(k, v, step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class WandbSink:
    def __init__(self, project: str, run_dir: Path, config: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                "logging.wandb=true needs wandb: pip install 'spear[wandb]'"
            ) from None
        self._run = wandb.init(project=project, dir=str(run_dir), config=dict(config))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


class MetricLogger:
    """Fans one step's metrics out to every configured sink."""

    def __init__(self, sinks: list[MetricSink]) -> None:
        self.sinks = sinks

    @classmethod
    def create(
        cls,
        run_dir: Path,
        *,
        tensorboard: bool,
        wandb: bool,
        wandb_project: str,
        config: Mapping[str, Any],
        resume_step: int | None,
    ) -> MetricLogger:
        sinks: list[MetricSink] = [
            JsonlSink(run_dir / "metrics.jsonl", truncate_after_step=resume_step)
        ]
        if tensorboard:
            try:
                sinks.append(TensorBoardSink(run_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed; logging to metrics.jsonl only")
        if wandb:
            sinks.append(WandbSink(wandb_project, run_dir, config))
        return cls(sinks)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for s in self.sinks:
            s.write(step, metrics)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl`` file; a last line cut short by a killed process (no
    newline yet, not valid JSON) is left out."""
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return [json.loads(ln) for ln in lines if ln.strip()]


def logged_steps(run_dir: Path) -> set[int]:
    """The steps that have a row in ``run_dir/metrics.jsonl`` (none when it does not exist)."""
    path = run_dir / "metrics.jsonl"
    return {int(r.get("step", 0)) for r in read_metrics(path)} if path.exists() else set()
