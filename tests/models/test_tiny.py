import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from spear.envs.arithmetic import generate_tasks
from spear.models.tiny import TinyModelParams, build_tiny_model
from spear.models.tokenizer import Conversation, TokenizerParams, train_tokenizer

PARAMS = TinyModelParams(
    hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_position_embeddings=128
)


@pytest.fixture(scope="module")
def tok():
    convs = [
        Conversation([{"role": "user", "content": t.prompt}], None)
        for t in generate_tasks("train", 30, 0, 1)
    ]
    return train_tokenizer(convs, TokenizerParams(vocab_size=320))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_seeded_determinism(tok) -> None:
    a = build_tiny_model(PARAMS, tok, seed=7)
    b = build_tiny_model(PARAMS, tok, seed=7)
    c = build_tiny_model(PARAMS, tok, seed=8)
    assert _same(a, b)
    assert not _same(a, c)


def test_global_rng_untouched(tok) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(PARAMS, tok, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_shape_and_config(tok) -> None:
    m = build_tiny_model(PARAMS, tok, seed=0)
    assert m.dtype == torch.float32
    assert m.config.vocab_size == len(tok)
    assert m.config.max_position_embeddings == 128
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # tied
    assert m.config.eos_token_id == tok.eos_token_id
    assert m.generation_config.pad_token_id == tok.pad_token_id
    # tied embedding 320*32 + per layer (4 attn 32x32 + 3 mlp 32x64 + 2 norms) + final norm
    # = 10240 + 2 * (4096 + 6144 + 64) + 32 = 30880 when the vocab is exactly 320
    n = sum(p.numel() for p in m.parameters())
    assert n == len(tok) * 32 + 2 * (4096 + 6144 + 64) + 32
    out = m(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, len(tok))


def test_save_and_load_round_trip(tok, tmp_path) -> None:
    m = build_tiny_model(PARAMS, tok, seed=1)
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _same(m, loaded)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(m(input_ids=ids).logits, loaded(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("num_heads", 3, "divisible"),
        ("hidden_size", 0, "hidden_size"),
        ("num_layers", 0, "num_layers"),
        ("max_position_embeddings", 4, "max_position_embeddings"),
    ],
)
def test_bad_params(tok, field: str, value: int, match: str) -> None:
    bad = dataclasses.replace(PARAMS, **{field: value})
    with pytest.raises(ValueError, match=match):
        build_tiny_model(bad, tok, seed=0)
