"""pass@k (the unbiased estimator) and mean@n of sampled held-out episodes."""

from __future__ import annotations

import pytest

from spear.config import ConfigError, load_config
from spear.stages import pass_at_k, sampled_metrics
from spear.types import EndReason, Episode


@pytest.mark.parametrize(
    ("n", "c", "k", "expect"),
    [
        (4, 1, 1, 0.25),  # pass@1 is c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 2, 2, 1 - 1 / 6),  # 1 - C(2,2)/C(4,2)
        (3, 2, 2, 1.0),  # only one failure: any 2 samples include a success
        (6, 0, 3, 0.0),
        (6, 6, 6, 1.0),
    ],
)
def test_pass_at_k_hand_derived(n: int, c: int, k: int, expect: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expect)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="need 0 <= c <= n"):
        pass_at_k(n, c, k)


def _ep(group: int, success: bool) -> Episode:
    return Episode("t", group, 0, [], EndReason.ANSWER, float(success), success, 1, 0, 0)


def test_sampled_metrics_average_over_tasks() -> None:
    # task 0: 1 of 4 right; task 1: 2 of 4 right
    eps = [_ep(0, s) for s in (True, False, False, False)] + [
        _ep(1, s) for s in (True, True, False, False)
    ]
    got = sampled_metrics(eps, 4, [1, 2, 4], "eval")
    assert got == {
        "eval/pass@1": pytest.approx((0.25 + 0.5) / 2),
        "eval/pass@2": pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2),
        "eval/pass@4": pytest.approx(1.0),
        "eval/mean@4": pytest.approx(3 / 8),
    }
    with pytest.raises(ValueError, match="exactly 4 sampled episodes"):
        sampled_metrics(eps[:-1], 4, [1], "eval")


def test_eval_sampling_config() -> None:
    assert load_config().eval.ks == []
    assert load_config(overrides=["eval.samples=8"]).eval.ks == [1, 8]
    assert load_config(overrides=["eval.samples=8", "eval.pass_at=[4,2,4]"]).eval.ks == [2, 4]
    with pytest.raises(ConfigError, match=r"eval.pass_at=\[9\] must lie in 1..eval.samples=8"):
        load_config(overrides=["eval.samples=8", "eval.pass_at=[9]"])
    with pytest.raises(ConfigError, match=r"eval\.pass_at needs eval\.samples"):
        load_config(overrides=["eval.pass_at=[1]"])
