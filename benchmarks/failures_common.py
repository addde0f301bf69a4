"""What the failure analyses share: the policy to play (a run config's warm model or a trained
checkpoint), its greedy evaluation episodes, and writing the record."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from spear.config import Config, load_config, run_config_path
from spear.envs.base import Task
from spear.evaluate import resolve_checkpoint
from spear.trainer import Trainer
from spear.types import Episode

QUIET = ["logging.tensorboard=false", "logging.progress=false"]


def policy_config(config: str, checkpoint: Path | None, overrides: list[str]) -> Config:
    """The run config ``config`` (a shipped name or a file) with ``overrides``, or, with
    ``checkpoint``, that run's own config playing the checkpoint's weights."""
    if checkpoint is None:
        return load_config(file=run_config_path(config), overrides=[*QUIET, *overrides])
    ckpt = resolve_checkpoint(checkpoint)
    extra = [f"model.path={ckpt / 'model'}", "model.lora.enabled=false"]
    return load_config(
        file=ckpt.parent.parent / "config.yaml", overrides=[*QUIET, *overrides, *extra]
    )


def greedy_episodes(
    cfg: Config,
) -> tuple[list[Task], list[Episode], Callable[[list[int]], str]]:
    """The tasks of ``cfg``'s evaluation (``eval.split``, ``eval.num_tasks``), their greedy
    episodes (same order) and a decoder of token ids."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), resume=False)
        try:
            tasks, episodes = trainer.eval_episodes()
            tokenizer = trainer.c.policy.tokenizer
        finally:
            trainer.close()
    return tasks, episodes, lambda ids: str(tokenizer.decode(ids))


def parser(doc: str | None, *, split: str, count: str, n: int) -> argparse.ArgumentParser:
    """The options every failure analysis takes: ``--checkpoint``, ``--split``, ``--<count>``
    (how many episodes) and ``--out``."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", type=Path, default=None, help="a trained checkpoint instead")
    ap.add_argument("--split", default=split)
    ap.add_argument(f"--{count}", type=int, default=n)
    ap.add_argument("--out", type=Path, default=None)
    return ap


def emit(record: dict[str, object], out: Path | None) -> None:
    """Print ``record`` as JSON and, with ``out``, write it there too."""
    text = json.dumps(record, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
