"""Policy log-probs: micro-batching by length returns every row's values in row order."""

import pytest
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


SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, head_dim=8)  # fmt: skip


def test_logit_transforms_are_read_off_the_config() -> None:
    from transformers import CohereConfig, Gemma2Config, GraniteConfig

    from spear.policy import logit_transform

    def name(cfg):
        found = logit_transform(cfg)
        return None if found is None else found[0]

    assert name(LlamaConfig(**SMALL)) is None
    assert name(GraniteConfig(**SMALL)) is None  # logits_scaling 1.0: no change
    assert name(GraniteConfig(**SMALL, logits_scaling=8.0)) == "logits_scaling=8.0"
    assert name(CohereConfig(**SMALL)) == "logit_scale=0.0625"
    assert name(Gemma2Config(**SMALL)) == "final_logit_softcapping=30.0"
    assert name(Gemma2Config(**SMALL, final_logit_softcapping=None)) is None
    _, softcap = logit_transform(Gemma2Config(**SMALL, final_logit_softcapping=2.0))
    x = torch.tensor([-4.0, 0.0, 1.0, 100.0])
    torch.testing.assert_close(softcap(x), 2.0 * torch.tanh(x / 2.0))  # [-1.928, 0, 0.924, 2]


@pytest.mark.parametrize(
    "arch",
    [
        ("Gemma2", {"final_logit_softcapping": 0.05}),  # small cap: tanh bites on random logits
        ("Cohere", {"logit_scale": 4.0}),
        ("Granite", {"logits_scaling": 0.25}),
    ],
)
def test_training_logprobs_equal_the_models_own_logits(arch) -> None:
    import transformers

    name, extra = arch
    cfg = getattr(transformers, f"{name}Config")(**SMALL, **extra)
    torch.manual_seed(0)
    lm = getattr(transformers, f"{name}ForCausalLM")(cfg).float().eval()
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    policy = Policy(
        lm, None, torch.device("cpu"), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    )
    batch = _batch([9, 6, 12])
    lp, ent = policy.forward_logprobs(batch, temperature=1.0, with_entropy=True)
    with torch.no_grad():
        logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ref = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t scores token t + 1
    want = ref.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    want_ent = -(ref.exp() * ref).sum(-1)
    m = batch.loss_mask[:, 1:] > 0
    torch.testing.assert_close(lp[:, 1:][m], want[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[:, 1:][m], want_ent[m], atol=1e-5, rtol=0)
    # without the transform the values would differ: the test sees it
    raw = torch.log_softmax(lm.lm_head(lm.model(input_ids=batch.input_ids).last_hidden_state), -1)
    assert (raw[:, :-1].gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1) - want)[
        m
    ].abs().max() > 1e-2
