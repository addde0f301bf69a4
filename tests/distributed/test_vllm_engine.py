"""The vLLM engine's own logic on CPU, with a stand-in ``vllm.LLM`` (vLLM itself needs a GPU).

What is checked: sampling-parameter mapping, per-prompt caps and seeds, log-prob extraction,
finish reasons, and the weight-sync path (collective_rpc -> worker extension -> load_weights).
What is not: vLLM's own sampling, which only a GPU run can show (marked ``gpu``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from spear.distributed.rollout import EngineReplica
from spear.rollout.engine import SamplingParams
from spear.rollout.vllm_engine import (
    LOAD_METHOD,
    VLLMEngine,
    VLLMMissingError,
    WeightLoader,
    generation_from,
    prompt_limits,
    prompt_seeds,
    sampling_kwargs,
    weight_items,
)

PARAMS = SamplingParams(
    temperature=0.7,
    top_p=0.9,
    top_k=None,
    max_new_tokens=4,
    stop_token_ids=None,
    stop_strings=("</tool_call>",),
)


@dataclass
class _FakeLLM:
    """Echoes ``max_tokens`` tokens ``prompt[-1] + 1, + 2, ...`` with log-prob ``-0.1 * i``."""

    calls: list[Any] = field(default_factory=list)
    rpcs: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    resets: int = 0
    worker: Any = None

    def generate(
        self, inputs: list[dict[str, list[int]]], sampling_params: list[Any], use_tqdm: bool
    ) -> list[Any]:
        self.calls.append((inputs, sampling_params))
        out = []
        for inp, sp in zip(inputs, sampling_params, strict=True):
            ids = [inp["prompt_token_ids"][-1] + i + 1 for i in range(sp.max_tokens)]
            steps = [
                {t: SimpleNamespace(logprob=-0.1 * (i + 1)), 999: SimpleNamespace(logprob=-9.0)}
                for i, t in enumerate(ids)
            ]
            reason = "length" if sp.max_tokens > 1 else "stop"
            out.append(
                SimpleNamespace(
                    outputs=[SimpleNamespace(token_ids=ids, logprobs=steps, finish_reason=reason)]
                )
            )
        return out

    def collective_rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        self.rpcs.append((method, args))
        return [getattr(self.worker, method)(*args)] if self.worker is not None else []

    def reset_prefix_cache(self) -> None:
        self.resets += 1


_VLLM = SimpleNamespace(SamplingParams=lambda **kw: SimpleNamespace(**kw))


def test_sampling_kwargs_follow_spear_conventions() -> None:
    kw = sampling_kwargs(PARAMS, max_tokens=3, seed=11, eos_id=2)
    assert kw["top_k"] == -1 and kw["stop_token_ids"] == [2] and kw["stop"] == ["</tool_call>"]
    assert kw["logprobs"] == 0 and kw["include_stop_str_in_output"] and kw["seed"] == 11
    assert kw["max_tokens"] == 3 and kw["temperature"] == 0.7 and kw["top_p"] == 0.9
    explicit = SamplingParams(
        temperature=0.0,
        top_p=1.0,
        top_k=5,
        max_new_tokens=2,
        stop_token_ids=(7, 8),
        stop_strings=None,
    )
    kw = sampling_kwargs(explicit, 2, 0, eos_id=2)
    assert kw["stop_token_ids"] == [7, 8] and kw["top_k"] == 5 and kw["stop"] == []


def test_limits_and_seeds() -> None:
    assert prompt_limits(2, PARAMS, None) == [4, 4]
    assert prompt_limits(2, PARAMS, [1, 3]) == [1, 3]
    with pytest.raises(ValueError, match=">= 1"):
        prompt_limits(1, PARAMS, [0])
    with pytest.raises(ValueError, match="2 values for 3 prompts"):
        prompt_limits(3, PARAMS, [1, 2])
    a = prompt_seeds(3, torch.Generator().manual_seed(5))
    assert a == prompt_seeds(3, torch.Generator().manual_seed(5)) and len(set(a)) == 3


def test_generate_maps_prompts_caps_seeds_and_logprobs() -> None:
    llm = _FakeLLM()
    engine = VLLMEngine(llm, eos_id=2, vllm_module=_VLLM)
    gens = engine.generate(
        [[5, 6], [9]], PARAMS, generator=torch.Generator().manual_seed(1), max_new_tokens=[3, 1]
    )
    inputs, sps = llm.calls[0]
    assert inputs == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [9]}]
    assert [sp.max_tokens for sp in sps] == [3, 1]
    assert [sp.seed for sp in sps] == prompt_seeds(2, torch.Generator().manual_seed(1))
    assert gens[0].token_ids == [7, 8, 9] and gens[0].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert gens[0].finish_reason == "length" and gens[1].finish_reason == "stop"
    assert gens[1].token_ids == [10] and engine.generate([], PARAMS) == []
    assert isinstance(engine, EngineReplica)  # what a rollout worker can hold


def test_generation_from_needs_sampled_logprobs() -> None:
    with pytest.raises(RuntimeError, match="no log-prob per sampled token"):
        generation_from(SimpleNamespace(token_ids=[1, 2], logprobs=None, finish_reason="stop"))


def test_weight_sync_goes_through_the_worker_extension() -> None:
    class _Model:
        def __init__(self) -> None:
            self.loaded: list[tuple[str, torch.Tensor]] = []

        def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
            self.loaded.extend(weights)

    worker = WeightLoader()
    worker.model_runner = SimpleNamespace(model=_Model())
    llm = _FakeLLM(worker=worker)
    engine = VLLMEngine(llm, eos_id=None, vllm_module=_VLLM)
    lm = torch.nn.Linear(2, 3)
    engine.update_weights(lm)
    assert llm.rpcs[0][0] == LOAD_METHOD and llm.resets == 1
    names = [n for n, _ in worker.model_runner.model.loaded]
    assert names == ["weight", "bias"]
    assert torch.equal(worker.model_runner.model.loaded[0][1], lm.weight.detach())
    with pytest.raises(ValueError, match="adapter name"):
        weight_items({"base_model.model.lora_A.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="needs the model"):
        engine.update_weights(None)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_says_how_to_get_it() -> None:
    with pytest.raises(VLLMMissingError, match=r"pip install 'spear\[vllm\]'"):
        VLLMEngine.from_path("/nonexistent", 0.5)


@pytest.mark.gpu
def test_vllm_engine_on_a_gpu(tmp_path: Any) -> None:
    """On a CUDA machine with vLLM: the built-in warm model samples, the returned log-probs are
    the HF model's own (temperature 1, no filtering), and pushed weights take effect.
    Not run in this repository's environment (no GPU)."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from spear.build import model_dir
    from spear.config import load_config
    from spear.policy import load_pretrained

    small = [
        "model.tiny.hidden_size=64",
        "model.tiny.intermediate_size=128",
        "model.warm_start.steps=5",
    ]
    path = model_dir(load_config(overrides=[*small, f"model.cache_dir={tmp_path}"]))
    engine = VLLMEngine.from_path(path, 0.3)
    plain = SamplingParams(
        temperature=1.0,
        top_p=1.0,
        top_k=None,
        max_new_tokens=6,
        stop_token_ids=None,
        stop_strings=None,
    )
    prompt = [1, 2, 3]
    gen = engine.generate([prompt], plain, generator=torch.Generator().manual_seed(0))[0]
    model, _ = load_pretrained(path, None, "float32")
    ids = torch.tensor([prompt + gen.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
    want = lp.gather(1, torch.tensor(gen.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(gen.logprobs), want, atol=2e-2, rtol=0)
    for param in model.parameters():
        param.data.mul_(0.0)  # an all-zero model: uniform next-token distribution
    engine.update_weights(model)
    uniform = engine.generate([prompt], plain, generator=torch.Generator().manual_seed(0))[0]
    vocab = model.config.vocab_size
    assert uniform.logprobs == pytest.approx(
        [-float(torch.log(torch.tensor(float(vocab))))] * len(uniform.logprobs), abs=1e-3
    )
