"""Atomic checkpoints: the model in Hugging Face format plus the full trainer state.

Layout of ``<run_dir>/checkpoints/step_000020/``: ``model/`` (``save_pretrained`` of the model
and tokenizer, loadable with ``AutoModelForCausalLM.from_pretrained``; with LoRA only the
adapters, see :func:`load_model_weights`) and ``trainer_state.pt``
(optimizer, LR schedule, replay buffer, RNG states, step), plus ``progress.json`` (the step and
whether its evaluation is still to do, see :class:`Progress`). A checkpoint is written into a
temporary directory and renamed into place, and ``checkpoints/latest`` is replaced atomically,
so an interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

LATEST = "latest"
PROGRESS = "progress.json"  # {"step": k, "row_pending": bool}, readable without torch


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainerState:
    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    replay: dict[str, Any] | None
    rng: dict[str, Any]
    extra: dict[str, Any]


def capture_rng() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, model: nn.Module, tokenizer: Any, state: TrainerState) -> Path:
    """Write ``checkpoints/step_<k>`` atomically and point ``checkpoints/latest`` at it."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name}-"))
    try:
        # With LoRA this saves the adapter; transformers loads it (with peft installed) on top of
        # the base model named in its adapter_config.json.
        model.save_pretrained(tmp / "model")  # type: ignore[operator]
        tokenizer.save_pretrained(tmp / "model")
        torch.save(state.__dict__, tmp / "trainer_state.pt")
        pending = state.extra.get("pending_row") is not None
        (tmp / PROGRESS).write_text(json.dumps({"step": state.step, "row_pending": pending}))
        old = root / f".old-{final.name}"
        if final.exists():  # moved aside, not deleted, until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _write_text_atomic(root / LATEST, final.name + "\n")
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "trainer_state.pt").exists():
        raise CheckpointError(f"{pointer} points at {path.name}, which has no trainer_state.pt")
    return path


class Progress(NamedTuple):
    """How far the run of a checkpoint got: its step, and whether that step's evaluation and
    metrics row are still to do (an evaluation cut by Ctrl-C)."""

    step: int
    row_pending: bool


def checkpoint_progress(ckpt: Path) -> Progress:
    """The :class:`Progress` of ``ckpt`` (from ``progress.json``, else the trainer state)."""
    try:
        data = json.loads((ckpt / PROGRESS).read_text())
        return Progress(int(data["step"]), bool(data["row_pending"]))
    except (OSError, ValueError, KeyError, TypeError):
        state = load_trainer_state(ckpt)
        return Progress(state.step, state.extra.get("pending_row") is not None)


def load_trainer_state(ckpt: Path) -> TrainerState:
    try:
        data = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {ckpt / 'trainer_state.pt'}: {e}") from None
    return TrainerState(**data)


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def load_model_weights(model: nn.Module, model_dir: Path) -> None:
    """Load what :func:`save_checkpoint` wrote to ``model_dir`` into ``model``, in place.

    A peft (LoRA) model saved only its adapters (``adapter_model.safetensors``): they are loaded
    into ``model``'s adapters and its frozen base stays as built (the run's ``model.path`` or
    built-in model, as the run that saved it). Any other model loads the full weights through
    its class's ``from_pretrained``, which handles tied weights.
    """
    if _is_peft_model(model):
        from peft import load_peft_weights, set_peft_model_state_dict

        try:
            weights = load_peft_weights(str(model_dir))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the LoRA adapters in {model_dir}: {e}") from None
        result: Any = set_peft_model_state_dict(model, weights)
        if result.unexpected_keys:
            raise CheckpointError(
                f"{model_dir} holds adapter weights this model lacks: {result.unexpected_keys[:3]}"
                " (was it saved with other model.lora settings?)"
            )
        return
    model_cls: Any = type(model)
    saved = model_cls.from_pretrained(str(model_dir))
    model.load_state_dict(saved.state_dict())
