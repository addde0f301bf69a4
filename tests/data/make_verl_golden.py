"""Write ``tests/data/verl_golden.pt``: seeded inputs and what verl 0.9.1 itself computes on them.

``tests/algo/test_verl_golden.py`` compares spear against these numbers. This script imports verl
and never spear; spear's tests never import verl. verl 0.9.1 pins ``transformers<5.11``, so it
lives in its own virtual environment, never in spear's::

    python3.11 -m venv /work/verl-venv
    /work/verl-venv/bin/pip install torch==2.13.0     # first, so pip keeps the CPU wheel
    /work/verl-venv/bin/pip install verl==0.9.1
    /work/verl-venv/bin/python tests/data/make_verl_golden.py   # from the repository root

The output is deterministic (seeded inputs; verl's one random draw, Clip-Cov's token choice, is
recorded as the tokens it zeroed). Everything is float64 so that the comparison bound (1e-6)
measures the formulas, not float32 rounding.

Stored entries (all tensors; ``[N, T]`` unless noted):

* ``adv/inputs``: ``scores [N]``, ``index [N]`` (group ids, with a group of one), ``mask``;
  ``adv/grpo_std``, ``adv/grpo_no_std``, ``adv/rloo``: verl's advantages ``[N, T]``.
* ``loss/inputs``: ``old_log_prob``, ``log_prob``, ``advantages`` (never 0), ``mask`` (a row
  without a valid token); ``loss/vanilla/<agg>``: verl's ``pg_loss`` per aggregation mode and
  ``loss/vanilla/matrix``: the ``pg_losses`` matrix verl hands to ``agg_loss`` (clip_low 0.2,
  clip_high 0.28, clip_c 3); ``loss/vanilla/metrics``: ``[clipfrac, ppo_kl, clipfrac_lower]``.
* ``loss/clip_cov_all`` (ratio 1: every eligible token is detached, so no draw matters) and
  ``loss/clip_cov_few`` (ratio 0.1: a random subset): ``matrix``, ``selected`` (the tokens verl
  zeroed: loss 0 where the advantage is not), ``clipfrac`` (verl's ``pg_clipfrac``).
* ``loss/kl_cov``: ``matrix`` and ``ppo_kl`` (ratio 0.1, ppo_kl_coef 1).
* ``agg/inputs``: ``loss_mat``, ``mask``; ``agg/<mode>``: verl's ``agg_loss`` with its default
  arguments, and ``agg/seq-mean-token-sum-norm@16`` with ``loss_scale_factor=16``.
* ``entropy/inputs``: ``logits [N, T, V]``, ``labels``; ``entropy/entropy``
  (``entropy_from_logits``), ``entropy/logprobs`` (``logprobs_from_logits``).
* ``kl/inputs``: ``logprob``, ``ref_logprob`` (log-ratios from -30 to 30, past both clamps);
  ``kl/<name>/value`` and ``kl/<name>/grad`` (gradient of the sum with respect to ``logprob``)
  for every name verl's ``kl_penalty`` takes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "verl_golden.pt"
AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KL_NAMES = ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"]


def _mask(n: int, t: int, g: torch.Generator) -> torch.Tensor:
    """Right-padded response masks of random lengths 1..t; row 1 has no valid token."""
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[1] = 0
    return (torch.arange(t)[None, :] < lengths[:, None]).double()


def advantages(core: Any, g: torch.Generator) -> dict[str, Any]:
    n, t = 11, 5
    index = np.array([0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 4])  # groups 2 and 4 have one member
    scores = torch.randint(0, 4, (n,), generator=g).double() + 0.25 * torch.rand(n, generator=g)
    mask = (torch.arange(t)[None, :] < torch.randint(1, t + 1, (n,), generator=g)[:, None]).double()
    rewards = torch.zeros(n, t, dtype=torch.float64)
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(n), last] = scores  # the score on the last response token, as verl
    out: dict[str, Any] = {
        "adv/inputs": {"scores": scores, "index": torch.tensor(index), "mask": mask}
    }
    for key, norm in (("adv/grpo_std", True), ("adv/grpo_no_std", False)):
        adv, _ = core.compute_grpo_outcome_advantage(
            rewards.clone(), mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=norm
        )
        out[key] = adv
    out["adv/rloo"], _ = core.compute_rloo_outcome_advantage(rewards.clone(), mask, index)
    return out


class _Capture:
    """Records the ``loss_mat`` each verl policy loss hands to ``agg_loss``."""

    def __init__(self, core: Any) -> None:
        self.core, self.real, self.last = core, core.agg_loss, None

    def __enter__(self) -> _Capture:
        def agg(loss_mat: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self.last = loss_mat.detach().clone()
            return self.real(loss_mat, *args, **kwargs)

        self.core.agg_loss = agg
        return self

    def __exit__(self, *exc: object) -> None:
        self.core.agg_loss = self.real


def _actor_config(loss_mode: str, **policy_loss: float) -> Any:
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig

    return ActorConfig(
        strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2,
        clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode, **policy_loss),
    )  # fmt: skip


def policy_losses(core: Any, g: torch.Generator) -> dict[str, Any]:
    n, t = 6, 9
    mask = _mask(n, t, g)
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3 - 0.05
    new = old + 0.4 * torch.randn(n, t, generator=g, dtype=torch.float64)
    new[0, 0] = old[0, 0] + 25.0  # past the [-20, 20] clamp of the log-ratio
    adv = torch.randn(n, 1, generator=g, dtype=torch.float64).expand(n, t).clone()
    adv = adv + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)  # never exactly 0
    adv[2] = -adv[2].abs()  # row 2: negative advantages with ratios e^1.5 > clip_c (dual clip)
    new[2, :3] = old[2, :3] + 1.5
    out: dict[str, Any] = {
        "loss/inputs": {"old_log_prob": old, "log_prob": new, "advantages": adv, "mask": mask}
    }
    cfg = _actor_config("vanilla")
    for mode in AGG_MODES:
        with _Capture(core) as cap:
            loss, metrics = core.compute_policy_loss_vanilla(old, new, adv, mask, mode, cfg)
        out[f"loss/vanilla/{mode}"] = loss.detach()
    out["loss/vanilla/matrix"] = cap.last
    out["loss/vanilla/metrics"] = torch.tensor(
        [metrics["actor/pg_clipfrac"], metrics["actor/ppo_kl"], metrics["actor/pg_clipfrac_lower"]],
        dtype=torch.float64,
    )
    for key, ratio in (("loss/clip_cov_all", 1.0), ("loss/clip_cov_few", 0.1)):
        cfg = _actor_config("clip_cov", clip_cov_ratio=ratio, clip_cov_lb=-0.5, clip_cov_ub=0.5)
        torch.manual_seed(1234)  # verl draws the subset with torch.randperm on the global RNG
        with _Capture(core) as cap:
            _, metrics = core.compute_policy_loss_clip_cov(old, new, adv, mask, "token-mean", cfg)
        assert cap.last is not None
        out[key] = {
            "matrix": cap.last,
            "selected": (cap.last == 0) & (mask > 0),  # advantages are never 0: a zero is a pick
            "clipfrac": torch.tensor(metrics["actor/pg_clipfrac"], dtype=torch.float64),
        }
    cfg = _actor_config("kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=1.0)
    with _Capture(core) as cap:
        _, metrics = core.compute_policy_loss_kl_cov(old, new, adv, mask, "token-mean", cfg)
    out["loss/kl_cov"] = {
        "matrix": cap.last,
        "ppo_kl": torch.tensor(metrics["actor/ppo_kl"], dtype=torch.float64),
    }
    return out


def aggregation(core: Any, g: torch.Generator) -> dict[str, Any]:
    n, t = 5, 7
    mask = _mask(n, t, g)
    loss_mat = torch.randn(n, t, generator=g, dtype=torch.float64)
    out: dict[str, Any] = {"agg/inputs": {"loss_mat": loss_mat, "mask": mask}}
    for mode in AGG_MODES:
        out[f"agg/{mode}"] = core.agg_loss(loss_mat, mask, mode)
    out["agg/seq-mean-token-sum-norm@16"] = core.agg_loss(
        loss_mat, mask, "seq-mean-token-sum-norm", loss_scale_factor=16
    )
    return out


def entropy(g: torch.Generator) -> dict[str, Any]:
    import verl.utils.torch_functional as verl_f

    n, t, v = 3, 4, 11
    logits = 3.0 * torch.randn(n, t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n, t), generator=g)
    return {
        "entropy/inputs": {"logits": logits, "labels": labels},
        "entropy/entropy": verl_f.entropy_from_logits(logits),
        "entropy/logprobs": verl_f.logprobs_from_logits(logits, labels),
    }


def kl(core: Any, g: torch.Generator) -> dict[str, Any]:
    d = torch.tensor([-30.0, -12.0, -3.0, -1.0, -0.2, 0.0, 0.3, 1.0, 2.5, 11.0, 30.0])
    ref = -torch.rand(d.numel(), generator=g, dtype=torch.float64) * 4
    logprob = (ref + d.double())[None, :]  # [1, 11]
    out: dict[str, Any] = {"kl/inputs": {"logprob": logprob, "ref_logprob": ref[None, :]}}
    for name in KL_NAMES + [k + "+" for k in KL_NAMES]:
        lp = logprob.clone().requires_grad_(True)
        value = core.kl_penalty(lp, ref[None, :], name)
        value.sum().backward()
        assert lp.grad is not None
        out[f"kl/{name}/value"] = value.detach()
        out[f"kl/{name}/grad"] = lp.grad.detach()
    return out


def main() -> None:
    import verl
    import verl.trainer.ppo.core_algos as core

    if verl.__version__ != "0.9.1":
        sys.exit(f"this script pins verl 0.9.1, found {verl.__version__}")
    g = torch.Generator().manual_seed(20260)
    golden: dict[str, Any] = {
        "verl_version": verl.__version__,
        "torch_version": str(torch.__version__),
    }
    golden.update(advantages(core, g))
    golden.update(policy_losses(core, g))
    golden.update(aggregation(core, g))
    golden.update(entropy(g))
    golden.update(kl(core, g))
    torch.save(golden, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(golden)} entries)")


if __name__ == "__main__":
    main()
