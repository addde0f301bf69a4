"""The frozen reference policy of the KL loss (verl's ``actor.use_kl_loss``).

With ``loss.kl_coef > 0`` the on-policy loss gains ``kl_coef * agg(KL(pi || pi_ref))``, with the
estimator ``loss.kl_type`` (:mod:`spear.algo.kl`) and the loss's own aggregation mode, as verl
adds ``kl_loss`` to its policy loss. ``pi_ref`` is the policy the run started from:

* with LoRA, the base model itself, run with the adapters switched off (peft's
  ``disable_adapter`` context): no second copy of the weights;
* otherwise a frozen copy of the initial model, made only when ``kl_coef > 0`` (it doubles the
  policy's weight memory on the process that holds it, the driver on ``trainer.backend=ray``).

The reference log-probs are computed once per step, before the update, on exactly the batch the
update trains on, with the same code as the old log-probs (:meth:`Policy.batch_logprobs`) and
the sampling temperature; the update reads them as ``ref_logprobs [N, T]``. The replay (SIL)
pass has no KL term (the reference recipe applies none to replayed data).

The reference is built before a checkpoint is restored, so a resumed run keeps the initial
model as its reference, as an uninterrupted one does.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import Tensor

from spear.policy import Policy
from spear.types import TokenBatch


class ReferencePolicy:
    """Log-probs of the frozen reference policy (module docstring)."""

    def __init__(self, policy: Policy, *, adapters_off: bool) -> None:
        """``adapters_off``: ``policy.model`` is a peft model whose base is the reference; else a
        frozen copy of ``policy.model`` as it is now becomes the reference."""
        if adapters_off and not hasattr(policy.model, "disable_adapter"):
            raise TypeError("adapters_off needs a peft model (one with disable_adapter())")
        self.adapters_off = adapters_off
        if adapters_off:
            self._policy = policy  # the same module, run under disable_adapter()
        else:
            frozen = copy.deepcopy(policy.model).requires_grad_(False).eval()
            self._policy = dataclasses.replace(policy, model=frozen)

    @property
    def model(self) -> Any:
        """The module whose forward pass is the reference (the policy's own one with LoRA)."""
        return self._policy.model

    def _context(self) -> AbstractContextManager[Any]:
        model: Any = self._policy.model
        return model.disable_adapter() if self.adapters_off else nullcontext()

    def logprobs(self, batch: TokenBatch, *, micro_batch_size: int, temperature: float) -> Tensor:
        """``log pi_ref`` of ``batch.input_ids`` where ``batch.loss_mask > 0`` (0 elsewhere),
        without gradients. ``[N, T]`` float32 on the CPU, in ``batch``'s row order."""
        with self._context():
            return self._policy.batch_logprobs(
                batch, micro_batch_size=micro_batch_size, temperature=temperature
            )


def build_reference(policy: Policy, *, kl_coef: float, lora: bool) -> ReferencePolicy | None:
    """The reference of a run with ``loss.kl_coef = kl_coef`` (None when the KL term is off)."""
    if kl_coef <= 0:
        return None
    return ReferencePolicy(policy, adapters_off=lora)
