"""LoRA end to end on the tiny built-in model: train, save, resume, evaluate, load with HF + peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spear import cli
from spear.checkpoint import CheckpointError, latest_checkpoint, load_model_weights
from spear.config import load_config
from spear.evaluate import evaluate_checkpoint
from spear.metrics import read_metrics
from spear.trainer import Trainer
from tests.test_trainer import TINY, _comparable

LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "optim.lr=1e-2"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spear-cache")


def _train(cache_dir: Path, run_dir: Path, steps: int, *, resume: bool = False) -> None:
    """``spear train`` as a user runs it (a new run, or ``--resume`` of one)."""
    args = ["--resume", str(run_dir)] if resume else [
        *TINY, *LORA, f"model.cache_dir={cache_dir}", f"trainer.run_dir={run_dir}",
    ]  # fmt: skip
    assert cli.main(["train", *args, f"trainer.steps={steps}"]) == 0


@pytest.fixture(scope="module")
def runs(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-step LoRA run, and the same run stopped after 2 steps then resumed to 4."""
    root = tmp_path_factory.mktemp("lora-runs")
    _train(cache_dir, root / "full", 4)
    _train(cache_dir, root / "part", 2)
    _train(cache_dir, root / "part", 4, resume=True)
    return {"full": root / "full", "part": root / "part"}


def _adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    return load_file(str(ckpt / "model" / "adapter_model.safetensors"))


def test_a_lora_run_saves_only_its_adapters(runs: dict[str, Path]) -> None:
    ckpt = latest_checkpoint(runs["full"])
    assert ckpt is not None
    files = {p.name for p in (ckpt / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files
    trained = _adapters(runs["full"])
    assert trained and any(float(v.abs().max()) > 0 for k, v in trained.items() if "lora_B" in k)


def test_resumed_lora_run_equals_the_uninterrupted_one(runs: dict[str, Path]) -> None:
    """Bit for bit: the same metrics rows and the same adapter weights after step 4."""
    rows_full = _comparable(read_metrics(runs["full"] / "metrics.jsonl"))
    rows_part = _comparable(read_metrics(runs["part"] / "metrics.jsonl"))
    assert [r["step"] for r in rows_part] == [0, 1, 2, 3, 4] and rows_part == rows_full
    full, part = _adapters(runs["full"]), _adapters(runs["part"])
    assert full.keys() == part.keys()
    for k, v in full.items():
        assert torch.equal(v, part[k]), k


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_lora_checkpoint_loads_with_transformers_and_peft(runs: dict[str, Path]) -> None:
    """peft (base + adapter), transformers' own peft integration and spear's resume load the
    same model from the checkpoint, and it is not the base model."""
    ckpt = latest_checkpoint(runs["full"])
    assert ckpt is not None
    adapter_cfg = json.loads((ckpt / "model" / "adapter_config.json").read_text())
    base_path = adapter_cfg["base_model_name_or_path"]
    assert Path(base_path).is_dir()  # the run's base model (the built-in one's cache directory)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    cfg = load_config(file=runs["full"] / "config.yaml")
    resumed = Trainer(cfg, runs["full"], resume=True)  # spear's own loader
    resumed.close()
    assert resumed.step == 4
    want = _logits(resumed.c.policy.model, ids)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    assert not torch.allclose(_logits(base, ids), want, atol=1e-4)  # the adapters matter
    via_peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_path), str(ckpt / "model")
    )
    torch.testing.assert_close(_logits(via_peft, ids), want, atol=1e-5, rtol=0)
    via_auto = AutoModelForCausalLM.from_pretrained(str(ckpt / "model"))  # peft integration
    torch.testing.assert_close(_logits(via_auto, ids), want, atol=1e-5, rtol=0)


def test_spear_eval_of_a_lora_run_scores_the_trained_adapters(runs: dict[str, Path]) -> None:
    """``spear eval`` of the run gives the final evaluation the run logged at step 4."""
    logged = read_metrics(runs["full"] / "metrics.jsonl")[-1]
    res = evaluate_checkpoint(runs["full"])
    assert res.step == 4 and res.metrics
    for k, v in res.metrics.items():
        assert v == pytest.approx(logged[k], abs=1e-9), k


def test_a_directory_without_adapters_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(file=runs["full"] / "config.yaml")
    t = Trainer(cfg, runs["full"], resume=False)
    t.close()
    with pytest.raises(CheckpointError, match="cannot read the LoRA adapters"):
        load_model_weights(t.c.policy.model, tmp_path)
