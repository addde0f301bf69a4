"""Held-out evaluation of a saved checkpoint (``spear eval``).

What to evaluate may be named three ways: a checkpoint directory (``<run>/checkpoints/step_k``),
the run directory itself or its ``checkpoints/`` folder (its latest checkpoint), or the
``checkpoints/latest`` pointer file. The result is appended, as one row at the checkpoint's
step, to ``<checkpoint>/eval/metrics.jsonl`` (so several evaluations of one checkpoint, e.g.
with different ``eval.num_tasks``, are all kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spear.checkpoint import LATEST, CheckpointError, checkpoint_progress, latest_checkpoint
from spear.config import ConfigError, load_config

EVAL_DIR = "eval"  # inside the checkpoint directory


@dataclass(frozen=True)
class EvalResult:
    checkpoint: Path  # the checkpoint directory evaluated
    step: int  # its training step
    metrics: dict[str, float]  # eval/... metrics
    metrics_file: Path  # where the row was appended


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint directory that ``path`` names (see the module docstring); raises
    :class:`ConfigError` with one line saying what is wrong."""
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    run_dir = None
    if path.is_file() and path.name == LATEST and path.parent.name == "checkpoints":
        run_dir = path.parent.parent  # <run>/checkpoints/latest
    elif path.is_dir() and (path / LATEST).is_file():
        run_dir = path.parent  # <run>/checkpoints
    elif path.is_dir() and (path / "checkpoints").is_dir() and not (path / "model").is_dir():
        run_dir = path  # <run>
    if run_dir is not None:
        try:
            ckpt = latest_checkpoint(run_dir)
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
        if ckpt is None:
            raise ConfigError(f"{path}: the run has no checkpoint yet (no checkpoints/latest)")
        return ckpt
    if not (path / "model").is_dir():
        raise ConfigError(
            f"{path} is not a checkpoint directory (no model/ inside); pass a run directory, "
            "<run>/checkpoints/latest or <run>/checkpoints/step_XXXXXX"
        )
    return path


def evaluate_checkpoint(path: Path, overrides: Sequence[str] = ()) -> EvalResult:
    """Evaluate the checkpoint ``path`` names on the held-out tasks of its run's config and
    append the metrics to ``<checkpoint>/eval/metrics.jsonl``."""
    from spear.trainer import Trainer

    ckpt = resolve_checkpoint(path)
    run_dir = ckpt.parent.parent
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise ConfigError(f"{cfg_file} not found: the checkpoint must sit inside its run directory")
    fixed = [
        f"model.path={ckpt / 'model'}",
        "model.lora.enabled=false",
        "logging.tensorboard=false",
        "logging.wandb=false",
    ]
    cfg = load_config(file=cfg_file, overrides=[*fixed, *overrides])
    step = checkpoint_progress(ckpt).step
    out_dir = ckpt / EVAL_DIR
    out_dir.mkdir(exist_ok=True)
    trainer = Trainer(cfg, out_dir, resume=False)
    try:
        metrics = trainer.evaluate()
        trainer.logger.write(step, metrics)
    finally:
        trainer.close()
    return EvalResult(ckpt, step, metrics, out_dir / "metrics.jsonl")
