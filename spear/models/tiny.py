"""The built-in tiny Llama-style causal LM, created from scratch (no download)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


@dataclass(frozen=True, slots=True)
class TinyModelParams:
    """Architecture of the tiny model (the vocabulary comes from the tokenizer).

    ``hidden_size`` must be divisible by ``num_heads``; ``max_position_embeddings`` is the
    longest context the model accepts.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int


def _check(params: TinyModelParams) -> None:
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads"):
        if getattr(params, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(params, name)}")
    if params.hidden_size % params.num_heads:
        raise ValueError(
            f"hidden_size={params.hidden_size} must be divisible by num_heads={params.num_heads}"
        )
    if (params.hidden_size // params.num_heads) % 2:
        raise ValueError("hidden_size / num_heads must be even (rotary embeddings)")
    if params.max_position_embeddings < 16:
        raise ValueError(
            f"max_position_embeddings must be >= 16, got {params.max_position_embeddings}"
        )


def build_tiny_model(
    params: TinyModelParams, tokenizer: PreTrainedTokenizerFast, seed: int
) -> LlamaForCausalLM:
    """A freshly initialised float32 Llama model sized for ``tokenizer``; same seed, same weights.

    Input and output embeddings are tied. The global torch RNG is left untouched.
    """
    _check(params)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise ValueError("the tokenizer needs an eos and a pad token")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        num_key_value_heads=params.num_heads,
        max_position_embeddings=params.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    return model.float()
