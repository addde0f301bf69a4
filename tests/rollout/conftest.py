"""Fixtures of the rollout tests: a tiny byte-level BPE tokenizer with a Qwen/Hermes-like chat
template, a tiny random Llama model, a scripted engine and scripted environments."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from spear.envs.base import StepResult, Task
from spear.rollout.engine import Generation, SamplingParams
from spear.types import Message

# Qwen2.5-like: a system block listing the tools as JSON, consecutive tool results grouped into
# one user turn of <tool_response> blocks, <|im_end|> closing every turn.
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0].role == 'system' -%}{{- messages[0].content + '\\n\\n' -}}"
    "{%- else -%}{{- 'You are an agent.\\n\\n' -}}{%- endif -%}"
    "{{- 'Tools:\\n<tools>' -}}"
    "{%- for t in tools -%}{{- '\\n' + (t | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools><|im_end|>\\n' -}}"
    "{%- elif messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}"
    "{%- elif m.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Not prefix-stable (like Qwen3): reasoning is dropped from assistant turns before the last user turn.
UNSTABLE_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set c = m.content -%}"
    "{%- if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in c -%}"
    "{%- set c = c.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + c + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKUP = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
CORPUS = [
    "You are an agent. Use the calculator tool to compute the answer.",
    "What is 12 times 34 plus 5? Think step by step and answer as \\boxed{n}.",
    '{"name": "calculator", "arguments": {"expression": "12*34+5"}}',
    "The result is 413. The answer is \\boxed{413}.",
    "You see a room with a table, a key and a locked door. Take the key.",
    "Observation: you take the key. Action: open door. The door opens.",
] * 3


def build_tokenizer(template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = template
    return tok


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def unstable_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(UNSTABLE_TEMPLATE)


def build_model(vocab_size: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,  # peaked enough that sampling differs visibly from uniform
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


@pytest.fixture(scope="session")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return build_model(len(tokenizer), seed=0)


def sampling(max_new_tokens: int, **kw: Any) -> SamplingParams:
    args: dict[str, Any] = {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": None,
        "max_new_tokens": max_new_tokens,
        "stop_token_ids": None,
        "stop_strings": None,
    }
    args.update(kw)
    return SamplingParams(**args)


# ------------------------------------------------------------------------------ scripted engine


@dataclass
class ScriptedEngine:
    """Answers call c, prompt i with ``script(c, i, prompt)``; log-prob of token k is -(k+1)/10.

    Honours per-prompt budgets ("length") and stop ids ("stop", stop id kept) like an engine.
    Records every call's prompts and budgets.
    """

    script: Callable[[int, int, list[int]], list[int]]
    calls: list[tuple[list[list[int]], list[int]]] = field(default_factory=list)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        generator: torch.Generator | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        budgets = list(max_new_tokens or [params.max_new_tokens] * len(prompts))
        self.calls.append(([list(p) for p in prompts], budgets))
        stops = set(params.stop_token_ids or ())
        out = []
        for i, (p, budget) in enumerate(zip(prompts, budgets)):
            ids, reason = list(self.script(len(self.calls) - 1, i, list(p))), "length"
            for k, t in enumerate(ids):
                if t in stops:
                    ids, reason = ids[: k + 1], "stop"
                    break
            if len(ids) > budget:
                ids, reason = ids[:budget], "length"
            elif reason != "stop":
                reason = "length" if len(ids) == budget else "stop"
            out.append(Generation(ids, [-(k + 1) / 10 for k in range(len(ids))], reason))  # type: ignore[arg-type]
        return out

    def update_weights(self, model: Any = None) -> None:
        return None


# ------------------------------------------------------------------------------ scripted env


@dataclass
class EnvScript:
    """What a :class:`ScriptedEnv` does: it answers turn k (0-based) with a tool message
    ``f"result {k}"`` and reward ``rewards[k]``; it terminates after ``answer_turn`` turns with
    a final answer; ``raise_at`` / ``hang_at`` make step k raise / block, ``info_error_at`` report a crash; ``obs_chars`` pads
    observations; ``anchors`` adds ``info["anchor"]``."""

    answer_turn: int | None = 2
    rewards: tuple[float, ...] = (0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    raise_at: int | None = None
    info_error_at: int | None = None  # step k reports a crash in info["env_error"], terminated
    raise_on_reset: bool = False
    hang_at: int | None = None
    obs_chars: int = 0
    anchors: bool = False
    success: bool = True
    observation_role: str = "tool"
    penalties: tuple[float, ...] = ()  # info["penalty"] of turn k (none past the tuple)


class ScriptedEnv:
    def __init__(self, script: EnvScript, release: threading.Event, log: list[Any]) -> None:
        self.script, self.release, self.log = script, release, log
        self.turn, self.closed, self.seed, self.actions = 0, False, None, []
        self.hanging = False  # inside a hang_at step

    def reset(self, task: Task, *, seed: int | None = None) -> tuple[list[Message], dict[str, Any]]:
        if self.script.raise_on_reset:
            raise RuntimeError("reset exploded")
        self.turn, self.seed = 0, seed
        self.log.append(self)
        messages: list[Message] = [
            {"role": "system", "content": "You are an agent."},
            {"role": "user", "content": task.prompt},
        ]
        return messages, ({"anchor": f"start {task.task_id}"} if self.script.anchors else {})

    def step(self, action_text: str) -> StepResult:
        k, s = self.turn, self.script
        self.turn += 1
        self.actions.append(action_text)
        if s.raise_at == k:
            raise RuntimeError(f"step {k} exploded")
        if s.info_error_at == k:
            return StepResult([], 0.0, terminated=True, info={"env_error": "worker lost"})
        if s.hang_at == k:
            self.hanging = True
            self.release.wait(timeout=30)
            self.hanging = False
        info: dict[str, Any] = {"tool_calls": 1, "invalid_tool_calls": k % 2, "tool_errors": 0}
        if s.anchors:
            info["anchor"] = f"state {k + 1}"
        if k < len(s.penalties):
            info["penalty"] = s.penalties[k]
        if s.answer_turn is not None and k + 1 >= s.answer_turn:
            info.update(final_answer=f"answer {k}", success=s.success, tool_calls=0)
            return StepResult(messages=[], reward=s.rewards[k], terminated=True, info=info)
        content = f"result {k}" + "x" * s.obs_chars
        return StepResult(
            messages=[{"role": s.observation_role, "content": content}],
            reward=s.rewards[k],
            terminated=False,
            info=info,
        )

    def close(self) -> None:
        self.closed = True


@dataclass
class EnvFactory:
    """``make_env`` of the tests; a script callable returning None makes ``make_env`` raise."""

    script: EnvScript | Callable[[int], EnvScript | None]
    release: threading.Event = field(default_factory=threading.Event)
    envs: list[ScriptedEnv] = field(default_factory=list)  # in reset order
    made: int = 0

    def __call__(self) -> ScriptedEnv:
        script = self.script(self.made) if callable(self.script) else self.script
        self.made += 1
        if script is None:
            raise RuntimeError("cannot make env")
        return ScriptedEnv(script, self.release, self.envs)


@pytest.fixture
def env_factory() -> Callable[..., EnvFactory]:
    made: list[EnvFactory] = []

    def make(script: EnvScript | Callable[[int], EnvScript | None]) -> EnvFactory:
        made.append(EnvFactory(script))
        return made[-1]

    yield make
    for f in made:
        f.release.set()  # unblock hung env threads


@dataclass(frozen=True)
class CalcTool:
    name: str = "calculator"
    description: str = "Evaluate an arithmetic expression."
    parameters: dict[str, Any] = field(
        default_factory=lambda: {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        }
    )

    def __call__(self, **arguments: Any) -> str:
        return "0"
