"""Chunked log-probs / entropy: hand values, equality with the naive computation, memory bound."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import spear.algo.logprobs as logprobs_mod
from spear.algo.logprobs import logprobs_from_hidden, token_logprobs_and_entropy


def naive(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return lp, -(logp.exp() * logp).sum(-1)


def test_hand_values() -> None:
    # logits [0, ln 3] -> probs [1/4, 3/4]: log p(1) = ln 0.75 = -0.287682;
    # entropy = 0.25 ln 4 + 0.75 ln(4/3) = 0.562335
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    lp, ent = token_logprobs_and_entropy(
        logits, torch.tensor([[1]]), temperature=1.0, chunk_size=1, with_entropy=True
    )
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert ent is not None and ent.item() == pytest.approx(
        0.25 * math.log(4) + 0.75 * math.log(4 / 3), abs=1e-6
    )
    # temperature 2: logits/2 = [0, ln(3)/2] -> probs [1, sqrt 3] / (1 + sqrt 3);
    # log p(0) = -ln(1 + sqrt 3) = -1.005052
    lp, ent = token_logprobs_and_entropy(
        logits, torch.tensor([[0]]), temperature=2.0, chunk_size=4, with_entropy=False
    )
    assert lp.item() == pytest.approx(-math.log(1 + math.sqrt(3)), abs=1e-6)
    assert ent is None


def test_low_precision_input_gives_float32() -> None:
    logits = torch.randn(2, 3, 11).bfloat16()
    lp, ent = token_logprobs_and_entropy(
        logits, torch.randint(0, 11, (2, 3)), temperature=1.0, chunk_size=2, with_entropy=True
    )
    assert lp.dtype == torch.float32 and ent is not None and ent.dtype == torch.float32


@st.composite
def shapes(draw: st.DrawFn) -> tuple[int, int, int, int, int, float, int]:
    return (
        draw(st.integers(1, 3)),  # N
        draw(st.integers(1, 6)),  # T
        draw(st.integers(2, 13)),  # V
        draw(st.integers(1, 5)),  # H
        draw(st.integers(1, 20)),  # chunk_size (may exceed N*T)
        draw(st.sampled_from([1.0, 0.7, 1.5])),
        draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=25, deadline=None)
@given(s=shapes())
def test_chunked_logits_equal_naive(s: tuple[int, int, int, int, int, float, int]) -> None:
    n, t, v, _, chunk, temp, seed = s
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, v, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, v, (n, t), generator=g)
    w_lp, w_ent = (
        torch.randn(n, t, generator=g, dtype=torch.float64),
        torch.randn(n, t, generator=g, dtype=torch.float64),
    )
    a = logits.clone().requires_grad_(True)
    lp, ent = token_logprobs_and_entropy(
        a, targets, temperature=temp, chunk_size=chunk, with_entropy=True
    )
    assert ent is not None
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    b = logits.clone().requires_grad_(True)
    lp_ref, ent_ref = naive(b, targets, temp)
    ((lp_ref * w_lp).sum() + (ent_ref * w_ent).sum()).backward()
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(ent, ent_ref, rtol=0, atol=1e-10)
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(s=shapes(), with_bias=st.booleans())
def test_chunked_hidden_equal_naive(
    s: tuple[int, int, int, int, int, float, int], with_bias: bool
) -> None:
    n, t, v, h, chunk, temp, seed = s
    torch.manual_seed(seed)
    head = nn.Linear(h, v, bias=with_bias).double()
    hidden = torch.randn(n, t, h, dtype=torch.float64)
    targets = torch.randint(0, v, (n, t))
    x = hidden.clone().requires_grad_(True)
    lp, ent = logprobs_from_hidden(
        x, head, targets, temperature=temp, chunk_size=chunk, with_entropy=True
    )
    assert ent is not None
    (lp.sum() + 0.3 * ent.sum()).backward()
    grads = [x.grad] + [p.grad for p in head.parameters()]
    head.zero_grad()
    y = hidden.clone().requires_grad_(True)
    lp_ref, ent_ref = naive(head(y), targets, temp)
    (lp_ref.sum() + 0.3 * ent_ref.sum()).backward()
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(ent, ent_ref, rtol=0, atol=1e-10)
    for got, want in zip(grads, [y.grad] + [p.grad for p in head.parameters()]):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_weight_tensor_form_and_no_grad() -> None:
    head = nn.Linear(4, 9, bias=False)
    hidden, targets = torch.randn(2, 5, 4), torch.randint(0, 9, (2, 5))
    with torch.no_grad():
        a, _ = logprobs_from_hidden(
            hidden, head.weight, targets, temperature=1.0, chunk_size=3, with_entropy=False
        )
        b, _ = logprobs_from_hidden(
            hidden, head, targets, temperature=1.0, chunk_size=3, with_entropy=False
        )
    assert torch.equal(a, b) and not a.requires_grad


def _saved_bytes_outside(inputs: list[torch.Tensor], run: object) -> int:
    """Bytes of tensors autograd saves for backward that do not alias one of ``inputs``."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in own:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()  # type: ignore[operator]
    return total


def test_backward_memory_is_bounded_by_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without per-chunk checkpointing autograd would keep every chunk's float32 logits
    # (N*T*V*4 bytes = 48 KB here); with it only O(N*T) outputs are kept.
    monkeypatch.setattr(logprobs_mod, "CHECKPOINT_MIN_BYTES", 0)  # checkpoint even tiny calls
    n, t, v, h = 4, 30, 100, 8
    full_logits_bytes = n * t * v * 4
    hidden = torch.randn(n, t, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n, t))

    def from_hidden() -> None:
        logprobs_from_hidden(
            hidden, weight, targets, temperature=1.0, chunk_size=16, with_entropy=True
        )

    logits = torch.randn(n, t, v, requires_grad=True)

    def from_logits() -> None:
        token_logprobs_and_entropy(
            logits, targets, temperature=1.0, chunk_size=16, with_entropy=True
        )

    assert _saved_bytes_outside([hidden, weight, targets], from_hidden) < full_logits_bytes / 10
    assert _saved_bytes_outside([logits, targets], from_logits) < full_logits_bytes / 10


def test_150k_vocab_keeps_no_full_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logprobs_mod, "CHECKPOINT_MIN_BYTES", 32 * 2**20)  # below 57.6 MB
    # A Qwen-sized vocabulary: the whole batch's float32 logits would be N*T*V*4 = 57.6 MB and
    # one chunk's 16 * 150000 * 4 = 9.6 MB; autograd keeps less than one chunk (only per-chunk
    # outputs: the checkpoint recomputes each chunk's logits during backward).
    n, t, v, h, chunk = 2, 48, 150_000, 8, 16
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, t, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 0.1).requires_grad_(True)
    targets = torch.randint(0, v, (n, t), generator=g)
    out: list[torch.Tensor] = []

    def run() -> None:
        lp, ent = logprobs_from_hidden(
            hidden, weight, targets, temperature=1.0, chunk_size=chunk, with_entropy=True
        )
        assert ent is not None
        out.append(lp.sum() + ent.sum())

    assert _saved_bytes_outside([hidden, weight, targets], run) < chunk * v * 4
    out[0].backward()
    assert hidden.grad is not None and bool(torch.isfinite(hidden.grad).all())
    # spot-check one position against the unchunked float64 computation
    logits = hidden[1, 5].detach().double() @ weight.detach().double().T  # [V]
    want = torch.log_softmax(logits, -1)[targets[1, 5]]
    with torch.no_grad():
        got, _ = logprobs_from_hidden(
            hidden, weight, targets, temperature=1.0, chunk_size=chunk, with_entropy=False
        )
    assert abs(float(got[1, 5]) - float(want)) < 1e-4


def test_validation_errors() -> None:
    logits, targets = torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(
            logits, targets, temperature=0.0, chunk_size=1, with_entropy=False
        )
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs_and_entropy(
            logits, targets, temperature=1.0, chunk_size=0, with_entropy=False
        )
    with pytest.raises(ValueError, match="targets"):
        token_logprobs_and_entropy(
            logits, targets[:, :1], temperature=1.0, chunk_size=1, with_entropy=False
        )
    with pytest.raises(ValueError, match="lm_head weight"):
        logprobs_from_hidden(
            torch.randn(1, 2, 4),
            torch.randn(3, 5),
            targets,
            temperature=1.0,
            chunk_size=1,
            with_entropy=False,
        )


def test_empty_batch() -> None:
    lp, ent = token_logprobs_and_entropy(
        torch.randn(0, 3, 5),
        torch.zeros(0, 3, dtype=torch.long),
        temperature=1.0,
        chunk_size=2,
        with_entropy=True,
    )
    assert lp.shape == (0, 3) and ent is not None and ent.shape == (0, 3)


def test_small_calls_skip_the_checkpoint_with_identical_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Below CHECKPOINT_MIN_BYTES the chunks keep their activations (no LM-head recompute in the
    # backward); values and gradients are bit-identical to the checkpointed path.
    g = torch.Generator().manual_seed(3)
    hidden0 = torch.randn(3, 20, 8, generator=g)
    weight0 = torch.randn(50, 8, generator=g)
    targets = torch.randint(0, 50, (3, 20), generator=g)

    def grads(min_bytes: int) -> tuple[torch.Tensor, ...]:
        monkeypatch.setattr(logprobs_mod, "CHECKPOINT_MIN_BYTES", min_bytes)
        hidden, weight = hidden0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
        lp, ent = logprobs_from_hidden(
            hidden, weight, targets, temperature=0.7, chunk_size=16, with_entropy=True
        )
        assert ent is not None
        (lp.sum() + 0.1 * ent.sum()).backward()
        assert hidden.grad is not None and weight.grad is not None
        return lp.detach(), ent.detach(), hidden.grad, weight.grad

    for a, b in zip(grads(0), grads(2**40)):
        assert torch.equal(a, b)
