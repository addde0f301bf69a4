"""Checkpoints are atomic and round-trip the model in Hugging Face format."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from spear import checkpoint as ck


@pytest.fixture()
def model_and_tok():
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    raw = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "a": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>")
    return model, tok


def _state(step):
    return ck.TrainerState(
        step=step, optimizer={}, scheduler={}, replay=None, rng=ck.capture_rng(), extra={"k": step}
    )


def test_save_load_round_trip(tmp_path, model_and_tok):
    model, tok = model_and_tok
    path = ck.save_checkpoint(tmp_path, model, tok, _state(3))
    assert path.name == "step_000003" and ck.latest_checkpoint(tmp_path) == path
    loaded = AutoModelForCausalLM.from_pretrained(path / "model")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert ck.load_trainer_state(path).extra == {"k": 3}


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, model_and_tok, monkeypatch):
    model, tok = model_and_tok
    good = ck.save_checkpoint(tmp_path, model, tok, _state(1))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path, model, tok, _state(2))
    assert ck.latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]


def test_rng_round_trip():
    state = ck.capture_rng()
    a = torch.rand(3)
    ck.restore_rng(state)
    assert torch.equal(a, torch.rand(3))


def test_latest_pointing_at_missing_state_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_000009\n")
    with pytest.raises(ck.CheckpointError, match="step_000009"):
        ck.latest_checkpoint(tmp_path)
