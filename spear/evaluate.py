"""Held-out evaluation of a saved checkpoint (``spear eval``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from spear.config import ConfigError, load_config


def evaluate_checkpoint(ckpt: Path, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Evaluate ``<run>/checkpoints/step_k`` on the held-out tasks of the run's config."""
    from spear.trainer import Trainer

    if not (ckpt / "model").is_dir():
        raise ConfigError(
            f"{ckpt} is not a checkpoint directory (no model/ inside); pass <run>/checkpoints/step_XXXXXX"
        )
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
    out_dir = ckpt / "eval"  # the evaluation's metrics.jsonl is kept beside the checkpoint
    out_dir.mkdir(exist_ok=True)
    trainer = Trainer(cfg, out_dir, resume=False)
    try:
        return trainer.evaluate()
    finally:
        trainer.close()
