"""Policy log-probs: micro-batching by length returns every row's values in row order."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spear.policy import Policy, length_order, prefix_order
from spear.types import Sample, TokenBatch


def _policy() -> Policy:
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg).float()
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    return Policy(
        lm, None, torch.device("cpu"), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    )


def _batch(lengths: list[int]) -> TokenBatch:
    g = torch.Generator().manual_seed(1)
    samples = [
        Sample(
            input_ids=torch.randint(0, 64, (t,), generator=g),
            loss_mask=torch.ones(t, dtype=torch.bool),
            behavior_logprobs=torch.zeros(t),
            group_id=0,
            episode_id=i,
        )
        for i, t in enumerate(lengths)
    ]
    return TokenBatch.collate(samples, pad_id=0)


def test_length_order_is_stable() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert length_order(mask).tolist() == [1, 3, 0, 2]


def test_batch_logprobs_rows_match_one_row_at_a_time() -> None:
    policy, batch = _policy(), _batch([9, 3, 14, 5, 11, 4, 7])
    got = policy.batch_logprobs(batch, micro_batch_size=3, temperature=1.0)
    assert got.shape == batch.input_ids.shape
    for i in range(batch.num_rows):
        one = policy.batch_logprobs(
            batch.select(slice(i, i + 1)), micro_batch_size=1, temperature=1.0
        )
        n = one.shape[1]
        torch.testing.assert_close(got[i, :n], one[0], atol=1e-5, rtol=0)


def test_prefix_order_puts_rows_of_one_prompt_together_shortest_first() -> None:
    ids = torch.tensor([[1, 2, 7, 7, 0], [1, 3, 8, 0, 0], [1, 2, 9, 0, 0], [1, 3, 5, 5, 5]])
    attn = (torch.arange(5) < torch.tensor([4, 3, 3, 5])[:, None]).long()
    loss = torch.zeros(4, 5)
    loss[:, 2:] = 1.0  # prompts [1, 2] and [1, 3]: each row's unscored prefix is [1]
    assert prefix_order(ids, attn, loss).tolist() == [1, 2, 0, 3]  # all one prefix: by length
    loss[:, 2] = 0.0  # now the prompts are [1, 2, x]: prefixes [1, 2] / [1, 3]
    assert prefix_order(ids, attn, loss).tolist() == [2, 0, 1, 3]


def test_models_that_transform_their_logits_are_named_and_refused(tmp_path) -> None:
    import pytest
    from transformers import CohereConfig, Gemma2Config, GraniteConfig

    from spear.policy import ModelLoadError, load_pretrained, logit_transform
    from tests.rollout.conftest import build_tokenizer

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2, head_dim=8)  # fmt: skip
    assert logit_transform(LlamaConfig(**small)) is None
    assert logit_transform(GraniteConfig(**small)) is None  # logits_scaling 1.0: no change
    assert logit_transform(GraniteConfig(**small, logits_scaling=8.0)) == "logits_scaling=8.0"
    assert logit_transform(CohereConfig(**small)) == "logit_scale=0.0625"
    assert logit_transform(Gemma2Config(**small)) == "final_logit_softcapping=30.0"
    assert logit_transform(Gemma2Config(**small, final_logit_softcapping=None)) is None

    from transformers import Gemma2ForCausalLM

    Gemma2ForCausalLM(Gemma2Config(**small)).save_pretrained(tmp_path / "gemma")
    build_tokenizer().save_pretrained(tmp_path / "gemma")
    with pytest.raises(ModelLoadError, match=r"final_logit_softcapping=30\.0"):
        load_pretrained(str(tmp_path / "gemma"), None, "float32")
