"""Loss aggregation: hand-derived values, NaN safety, micro-batch invariance."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear.algo.aggregation import AGGREGATIONS, AggregationNorm
from spear.registry import UnknownNameError

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

# Rows: [1, 2, 3] all valid (sum 6, mean 2); [4, 5, x] two valid (sum 9, mean 4.5);
# [7, 7, 7] fully masked (a filtered sample). 5 valid tokens, 2 non-empty sequences.
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0], [7.0, 7.0, 7.0]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 3.0),  # (1+2+3+4+5) / 5 valid tokens
        ("seq-mean-token-sum", 7.5),  # (6 + 9) / 2 non-empty rows (the empty row is not counted)
        ("seq-mean-token-mean", 3.25),  # (2 + 4.5) / 2
        ("seq-mean-token-sum-norm", 1.875),  # 15 / (2 rows * max_response_len 4)
    ],
)
def test_hand_values(mode: str, expected: float) -> None:
    norm = AggregationNorm.from_mask(MASK, max_response_len=4)
    assert float(norm.num_tokens) == 5 and float(norm.num_sequences) == 2
    assert AGGREGATIONS.get(mode)(VALUES, MASK, norm).item() == pytest.approx(expected, abs=1e-12)


def test_python_number_counts_equal_tensor_counts() -> None:
    norm = AggregationNorm(num_tokens=5, num_sequences=2, max_response_len=4)
    assert AGGREGATIONS.get("seq-mean-token-sum-norm")(VALUES, MASK, norm).item() == pytest.approx(
        1.875
    )


@pytest.mark.parametrize("mode", MODES)
def test_global_counts_not_local_ones(mode: str) -> None:
    # The first row alone, normalised by the whole batch's counts: token-mean 6/5,
    # seq-mean-token-sum 6/2, seq-mean-token-mean 2/2, sum-norm 6/(2*4).
    expected = {"token-mean": 1.2, "seq-mean-token-sum": 3.0, "seq-mean-token-mean": 1.0}
    expected["seq-mean-token-sum-norm"] = 0.75
    norm = AggregationNorm.from_mask(MASK, max_response_len=4)
    got = AGGREGATIONS.get(mode)(VALUES[:1], MASK[:1], norm).item()
    assert got == pytest.approx(expected[mode])


@pytest.mark.parametrize("mode", MODES)
def test_all_masked_gives_zero_not_nan(mode: str) -> None:
    values = torch.tensor([[math.inf, math.nan]], requires_grad=True)
    mask = torch.zeros(1, 2)
    out = AGGREGATIONS.get(mode)(values, mask, AggregationNorm.from_mask(mask, 2))
    assert out.item() == 0.0
    out.backward()
    assert values.grad is not None and torch.equal(values.grad, torch.zeros(1, 2))


@pytest.mark.parametrize("mode", MODES)
def test_masked_garbage_does_not_leak(mode: str) -> None:
    dirty = VALUES.clone()
    dirty[1, 2], dirty[2, 0] = math.nan, math.inf
    norm = AggregationNorm.from_mask(MASK, 4)
    agg = AGGREGATIONS.get(mode)
    assert agg(dirty, MASK, norm).item() == agg(VALUES, MASK, norm).item()


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="max_response_len"):
        AggregationNorm(num_tokens=1, num_sequences=1, max_response_len=0)
    with pytest.raises(ValueError, match="num_tokens"):
        AggregationNorm(num_tokens=-1, num_sequences=1, max_response_len=3)
    with pytest.raises(ValueError, match="mask shape"):
        AGGREGATIONS.get("token-mean")(VALUES, MASK[:, :2], AggregationNorm.from_mask(MASK, 3))
    with pytest.raises(UnknownNameError, match="token-mean"):
        AGGREGATIONS.get("token_mean")


@st.composite
def batches_and_splits(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    n = draw(st.integers(1, 9))
    t = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, t, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, t, generator=g) < draw(st.floats(0.0, 1.0))).double()
    cuts = sorted(set(draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=4))))
    bounds = [0, *[c for c in cuts if 0 < c < n], n]
    return values, mask, bounds, t + draw(st.integers(0, 5))


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=40, deadline=None)
@given(data=batches_and_splits())
def test_micro_batch_invariance(
    mode: str, data: tuple[torch.Tensor, torch.Tensor, list[int], int]
) -> None:
    """Sum over any row split of fn(micro, global norm) == fn(whole), values and gradients."""
    values, mask, bounds, max_len = data
    agg = AGGREGATIONS.get(mode)
    norm = AggregationNorm.from_mask(mask, max_len)
    whole_v = values.clone().requires_grad_(True)
    whole = agg(whole_v, mask, norm)
    whole.backward()
    split_v = values.clone().requires_grad_(True)
    parts = [agg(split_v[a:b], mask[a:b], norm) for a, b in itertools.pairwise(bounds)]
    total = torch.stack(parts).sum()
    total.backward()
    assert torch.isfinite(whole)
    assert total.item() == pytest.approx(whole.item(), abs=1e-12)
    assert whole_v.grad is not None and split_v.grad is not None
    torch.testing.assert_close(split_v.grad, whole_v.grad, rtol=0, atol=1e-12)
