"""Algorithm core: advantage estimators, policy losses, loss aggregation, KL estimators and
chunked log-prob / entropy computation. Pure functions over tensors, reachable through the
registries below (unknown names raise :class:`spear.registry.UnknownNameError`)."""

from spear.algo.advantages import ADVANTAGES, AdvantageInput, AdvantageParams, discounted_returns
from spear.algo.aggregation import AGGREGATIONS, AggregationNorm
from spear.algo.kl import KL_ESTIMATORS
from spear.algo.logprobs import logprobs_from_hidden, token_logprobs_and_entropy
from spear.algo.losses import (
    POLICY_LOSSES,
    PolicyLossInput,
    PolicyLossOutput,
    PolicyLossParams,
    clip_cov_select,
    kl_cov_select,
)

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "AdvantageInput",
    "AdvantageParams",
    "AggregationNorm",
    "PolicyLossInput",
    "PolicyLossOutput",
    "PolicyLossParams",
    "clip_cov_select",
    "discounted_returns",
    "kl_cov_select",
    "logprobs_from_hidden",
    "token_logprobs_and_entropy",
]
