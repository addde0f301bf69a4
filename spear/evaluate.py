"""Held-out evaluation of a saved checkpoint (``spear eval``).

What to evaluate may be named three ways: a checkpoint directory (``<run>/checkpoints/step_k``),
the run directory itself or its ``checkpoints/`` folder (its latest checkpoint), or the
``checkpoints/latest`` pointer file. The result is appended, as one row at the checkpoint's
step, to ``<checkpoint>/eval/metrics.jsonl`` (so several evaluations of one checkpoint, e.g.
with different ``eval.num_tasks``, are all kept), and the latest evaluation is written as one
JSON document, with what was evaluated and how, to ``<checkpoint>/eval/results.json``.

With ``eval.samples=n`` the report adds, next to greedy ``eval/success``, ``eval/pass@k`` (the
unbiased estimator over n samples per task at ``eval.sample_temperature``, for each k of
``eval.pass_at``, default 1 and n) and ``eval/mean@n``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spear.checkpoint import (
    LATEST,
    CheckpointError,
    checkpoint_progress,
    latest_checkpoint,
    load_model_weights,
)
from spear.config import ConfigError, load_config

EVAL_DIR = "eval"  # inside the checkpoint directory
RESULTS_FILE = "results.json"  # the latest evaluation, inside EVAL_DIR


@dataclass(frozen=True)
class EvalResult:
    checkpoint: Path  # the checkpoint directory evaluated
    step: int  # its training step
    metrics: dict[str, float]  # eval/... metrics
    metrics_file: Path  # where the row was appended
    results_file: Path  # the JSON report (results_document)


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
    # a LoRA run saved only its adapters: build the run's own model (base + adapters) and load
    # them into it; any other checkpoint is a whole Hugging Face model
    lora = (ckpt / "model" / "adapter_config.json").is_file()
    model = [] if lora else [f"model.path={ckpt / 'model'}", "model.lora.enabled=false"]
    fixed = [*model, "logging.tensorboard=false", "logging.wandb=false"]
    cfg = load_config(file=cfg_file, overrides=[*fixed, *overrides])
    step = checkpoint_progress(ckpt).step
    out_dir = ckpt / EVAL_DIR
    out_dir.mkdir(exist_ok=True)
    trainer = Trainer(cfg, out_dir, resume=False)
    try:
        if lora:
            load_model_weights(trainer.c.policy.model, ckpt / "model")
        metrics = trainer.evaluate()
        trainer.logger.write(step, metrics)
    finally:
        trainer.close()
    results = out_dir / RESULTS_FILE
    results.write_text(json.dumps(results_document(ckpt, step, cfg, metrics), indent=1) + "\n")
    return EvalResult(ckpt, step, metrics, out_dir / "metrics.jsonl", results)


def results_document(ckpt: Path, step: int, cfg: Any, metrics: dict[str, float]) -> dict[str, Any]:
    """The JSON report of one evaluation: what was evaluated, how, and the metrics."""
    e = cfg.eval
    return {
        "checkpoint": str(ckpt),
        "step": step,
        "task": cfg.task.name,
        "num_tasks": int(metrics.get("eval/episodes", 0)),
        "greedy_temperature": e.temperature,
        "samples": e.samples,
        "sample_temperature": e.sample_temperature if e.samples else None,
        "pass_at": e.ks,
        "metrics": metrics,
    }
