"""Per-token KL estimators between the current policy and a reference policy.

One signature: ``fn(log_probs [N, T], ref_log_probs [N, T]) -> [N, T]`` (not masked, not
aggregated; the caller aggregates with the loss mask). With ``d = log_probs - ref_log_probs``:

* ``k1`` (alias ``kl``):         d
* ``abs``:                       |d|
* ``k2`` (alias ``mse``):        d^2 / 2
* ``k3`` (alias ``low_var_kl``): exp(x) - x - 1 with x = clamp(-d, -20, 20), result clamped to
  [-10, 10] (both clamps as in verl; the outer clamp also zeroes the gradient beyond 10).
* ``<name>+`` (straight-through, e.g. ``k3+``): the VALUE of ``<name>`` with the GRADIENT of
  ``k2``. k1 and k3 estimate the KL value without bias, but their gradients are not the KL
  gradient; k2's gradient is. Matches verl 0.9.1 ``kl_penalty`` (which strips the ``+`` before
  dispatching; ``k2+`` is numerically ``k2``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from spear.registry import Registry

KLFn = Callable[[Tensor, Tensor], Tensor]

KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")


def _check(log_probs: Tensor, ref_log_probs: Tensor) -> None:
    if log_probs.shape != ref_log_probs.shape:
        raise ValueError(
            f"ref_log_probs shape {tuple(ref_log_probs.shape)} != log_probs shape "
            f"{tuple(log_probs.shape)}"
        )


def kl_k1(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k1 = log p - log p_ref. [N, T]"""
    _check(log_probs, ref_log_probs)
    return log_probs - ref_log_probs


def kl_abs(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """|log p - log p_ref|. [N, T]"""
    _check(log_probs, ref_log_probs)
    return (log_probs - ref_log_probs).abs()


def kl_k2(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k2 = (log p - log p_ref)^2 / 2. [N, T]"""
    _check(log_probs, ref_log_probs)
    return 0.5 * (log_probs - ref_log_probs).square()


def kl_k3(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """k3 = r - log r - 1 with r = p_ref / p, clamped for stability (module docstring). [N, T]"""
    _check(log_probs, ref_log_probs)
    x = (ref_log_probs - log_probs).clamp(min=-20.0, max=20.0)
    return (torch.exp(x) - x - 1.0).clamp(min=-10.0, max=10.0)


def straight_through(value_fn: KLFn) -> KLFn:
    """Estimator with ``value_fn``'s value and k2's gradient."""

    def fn(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
        grad_part = kl_k2(log_probs, ref_log_probs)
        return grad_part - grad_part.detach() + value_fn(log_probs, ref_log_probs).detach()

    fn.__doc__ = f"Value of {value_fn.__name__}, gradient of k2 (straight-through). [N, T]"
    return fn


_BASE: dict[str, KLFn] = {
    "k1": kl_k1,
    "kl": kl_k1,
    "abs": kl_abs,
    "k2": kl_k2,
    "mse": kl_k2,
    "k3": kl_k3,
    "low_var_kl": kl_k3,
}

for _name, _fn in _BASE.items():
    KL_ESTIMATORS.register(_name)(_fn)
    KL_ESTIMATORS.register(_name + "+")(straight_through(_fn))
