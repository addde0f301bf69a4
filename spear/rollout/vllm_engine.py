"""A vLLM rollout engine for GPUs (optional extra: ``pip install 'spear[vllm]'``).

:class:`VLLMEngine` implements the :class:`~spear.rollout.engine.RolloutEngine` protocol over a
``vllm.LLM``: token-id prompts in (``{"prompt_token_ids": ids}``), sampled ids and the sampled
tokens' log-probs out, one ``vllm.SamplingParams`` per prompt (its own ``max_tokens`` and a seed
drawn from the caller's generator, so a rollout is reproducible for a given generator state).
Log-probs are requested for the sampled token only (``logprobs=0``) with
``logprobs_mode="processed_logprobs"`` (after temperature / top-k / top-p), matching the
convention of :mod:`spear.rollout.engine`.

Weight sync: the trainer's state dict (Hugging Face parameter names) is handed to every vLLM
worker with ``LLM.collective_rpc`` and loaded by the model's own ``load_weights`` (which maps
HF names onto vLLM's fused layers, e.g. ``q_proj/k_proj/v_proj`` -> ``qkv_proj``) through the
:class:`WeightLoader` worker extension; the prefix cache is reset afterwards, since cached KV
blocks belong to the old weights.

vLLM is imported only when an engine is built from a path; everything else here is plain Python
(tested on CPU with a stand-in ``LLM``). Not exercised on a GPU in this repository's CI.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from spear.rollout.engine import FinishReason, Generation, SamplingParams

log = logging.getLogger(__name__)

LOAD_METHOD = "spear_load_weights"  # the WeightLoader method collective_rpc calls
EXTENSION = "spear.rollout.vllm_engine.WeightLoader"


class VLLMMissingError(ImportError):
    """vLLM is not installed (it needs a CUDA GPU)."""


def _vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise VLLMMissingError(
            "distributed.rollout_engine=vllm needs vLLM and a CUDA GPU: pip install 'spear[vllm]' "
            "(or keep the default rollout_engine=hf)"
        ) from None
    return vllm


def prompt_limits(
    n: int, params: SamplingParams, max_new_tokens: Sequence[int] | None
) -> list[int]:
    """New-token cap of each of ``n`` prompts (``max_new_tokens`` as given, else the default)."""
    if max_new_tokens is None:
        return [params.max_new_tokens] * n
    limits = [int(m) for m in max_new_tokens]
    if len(limits) != n:
        raise ValueError(f"max_new_tokens has {len(limits)} values for {n} prompts")
    if any(m < 1 for m in limits):
        raise ValueError(f"every max_new_tokens value must be >= 1, got {min(limits)}")
    return limits


def prompt_seeds(n: int, generator: torch.Generator | None) -> list[int]:
    """One sampling seed per prompt, drawn from ``generator`` (the global RNG if None)."""
    return [int(s) for s in torch.randint(0, 2**31 - 1, (n,), generator=generator).tolist()]


def sampling_kwargs(
    params: SamplingParams, max_tokens: int, seed: int, eos_id: int | None
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one prompt of a turn."""
    stop_ids = (
        list(params.stop_token_ids)
        if params.stop_token_ids is not None
        else ([] if eos_id is None else [eos_id])
    )
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k is not None else -1,  # -1: off
        "max_tokens": max_tokens,
        "stop_token_ids": stop_ids,
        "stop": list(params.stop_strings or []),
        "include_stop_str_in_output": True,  # the token completing a stop string is kept
        "skip_special_tokens": False,
        "seed": seed,
        "logprobs": 0,  # the sampled token's log-prob only
    }


def generation_from(completion: Any) -> Generation:
    """A :class:`Generation` from one ``vllm.CompletionOutput`` (ids, sampled log-probs)."""
    ids = [int(t) for t in completion.token_ids]
    steps = completion.logprobs
    if steps is None or len(steps) != len(ids):
        raise RuntimeError("vLLM returned no log-prob per sampled token (SamplingParams.logprobs)")
    logprobs = [float(step[t].logprob) for step, t in zip(steps, ids)]
    finish: FinishReason = "stop" if completion.finish_reason == "stop" else "length"
    return Generation(token_ids=ids, logprobs=logprobs, finish_reason=finish)


def weight_items(state: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    """``(hf_name, tensor)`` pairs for ``model.load_weights`` (PEFT-free names, CPU tensors)."""
    for name in state:
        if "lora_" in name or name.startswith("base_model."):
            raise ValueError(
                f"vLLM weight sync takes plain model weights; got the adapter name {name!r}"
            )
    return [(name, t.detach().to("cpu")) for name, t in state.items()]


class WeightLoader:
    """vLLM worker extension (``LLM(worker_extension_cls=EXTENSION)``): loads pushed weights."""

    model_runner: Any  # provided by the vLLM worker class this is mixed into

    def spear_load_weights(self, items: list[tuple[str, Tensor]]) -> int:
        self.model_runner.model.load_weights(weights=items)
        return len(items)


class VLLMEngine:
    """The engine protocol over a ``vllm.LLM`` (module docstring)."""

    def __init__(self, llm: Any, eos_id: int | None, vllm_module: Any) -> None:
        self.llm, self.eos_id, self._vllm = llm, eos_id, vllm_module

    @classmethod
    def from_path(cls, model_path: str, gpu_memory_utilization: float) -> VLLMEngine:
        """A vLLM engine over the Hugging Face model directory ``model_path``."""
        vllm = _vllm()
        llm = vllm.LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=True,
            worker_extension_cls=EXTENSION,
            logprobs_mode="processed_logprobs",
        )
        eos = llm.get_tokenizer().eos_token_id
        return cls(llm, int(eos) if eos is not None else None, vllm)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        generator: torch.Generator | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """See :meth:`RolloutEngine.generate`."""
        if not prompts:
            return []
        limits = prompt_limits(len(prompts), params, max_new_tokens)
        seeds = prompt_seeds(len(prompts), generator)
        sampling = [
            self._vllm.SamplingParams(**sampling_kwargs(params, m, s, self.eos_id))
            for m, s in zip(limits, seeds)
        ]
        inputs = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        outputs = self.llm.generate(inputs, sampling_params=sampling, use_tqdm=False)
        return [generation_from(out.outputs[0]) for out in outputs]

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load the trainer's weights into every vLLM worker; drop KV blocks of the old ones."""
        loaded = self.llm.collective_rpc(LOAD_METHOD, args=(weight_items(state),))
        log.debug("vLLM workers loaded %s tensors", loaded)
        self.llm.reset_prefix_cache()

    def update_weights(self, model: nn.Module | None = None) -> None:
        """The :class:`RolloutEngine` hook: push ``model``'s weights (required here)."""
        if model is None:
            raise ValueError("VLLMEngine.update_weights needs the model whose weights to push")
        self.load_state_dict(dict(model.state_dict()))


@dataclass(frozen=True)
class VLLMEngineFactory:
    """Builds a :class:`VLLMEngine` inside a rollout worker (one GPU per worker via Ray)."""

    model_path: str
    gpu_memory_utilization: float
    num_threads: int

    def __call__(self) -> VLLMEngine:
        torch.set_num_threads(self.num_threads)
        return VLLMEngine.from_path(self.model_path, self.gpu_memory_utilization)
