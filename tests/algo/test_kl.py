"""KL estimators: hand values, clamps, aliases, straight-through gradients."""

import math

import pytest
import torch

from spear.algo.kl import KL_ESTIMATORS
from spear.registry import UnknownNameError

E = math.e


def _value_and_grad(name: str, d: float) -> tuple[float, float]:
    """Estimator value at lp - ref = d and its derivative with respect to lp."""
    lp = torch.tensor([[d]], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(1, 1, dtype=torch.float64)
    out = KL_ESTIMATORS.get(name)(lp, ref)
    out.sum().backward()
    assert lp.grad is not None
    return out.item(), lp.grad.item()


@pytest.mark.parametrize(
    ("name", "d", "value", "grad"),
    [
        # k1 = d, grad 1
        ("k1", 2.0, 2.0, 1.0),
        ("kl", -2.0, -2.0, 1.0),
        # abs = |d|, grad sign(d)
        ("abs", -2.0, 2.0, -1.0),
        # k2 = d^2 / 2, grad d
        ("k2", -2.0, 2.0, -2.0),
        ("mse", 1.0, 0.5, 1.0),
        # k3: x = -d; exp(x) - x - 1. d = 0 -> 0 (reference §11)
        ("k3", 0.0, 0.0, 0.0),
        # d = 1 -> e^-1 + 1 - 1 = 0.3679 (reference §11); grad = 1 - e^-d = 1 - 0.3679
        ("k3", 1.0, 1 / E, 1 - 1 / E),
        # d = -1 -> e - 2 = 0.7183; grad = 1 - e^1
        ("low_var_kl", -1.0, E - 2, 1 - E),
        # d = -30 -> x clamped to 20: e^20 - 21 >> 10 -> clamped to 10, gradient 0
        ("k3", -30.0, 10.0, 0.0),
        # d = +30 -> x clamped to -20: e^-20 + 19 > 10 -> 10
        ("k3", 30.0, 10.0, 0.0),
        # straight-through: value of the base estimator, gradient of k2 (= d)
        ("k1+", 2.0, 2.0, 2.0),
        ("k3+", 1.0, 1 / E, 1.0),
        ("k3+", -30.0, 10.0, -30.0),
        ("k2+", -2.0, 2.0, -2.0),
        ("abs+", -3.0, 3.0, -3.0),
    ],
)
def test_hand_values(name: str, d: float, value: float, grad: float) -> None:
    v, g = _value_and_grad(name, d)
    assert v == pytest.approx(value, abs=1e-12)
    assert g == pytest.approx(grad, abs=1e-12)


def test_k3_reference_vector() -> None:
    assert _value_and_grad("k3", 1.0)[0] == pytest.approx(0.3679, abs=1e-4)


@pytest.mark.parametrize(("alias", "name"), [("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")])
def test_aliases_are_identical(alias: str, name: str) -> None:
    lp, ref = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(KL_ESTIMATORS.get(alias)(lp, ref), KL_ESTIMATORS.get(name)(lp, ref))
    assert torch.equal(
        KL_ESTIMATORS.get(alias + "+")(lp, ref), KL_ESTIMATORS.get(name + "+")(lp, ref)
    )


def test_errors() -> None:
    with pytest.raises(ValueError, match="ref_log_probs shape"):
        KL_ESTIMATORS.get("k3")(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(UnknownNameError, match="k3"):
        KL_ESTIMATORS.get("k4")
    with pytest.raises(UnknownNameError):
        KL_ESTIMATORS.get("full")
