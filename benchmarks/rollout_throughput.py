"""Rollout throughput: spear's agent loop + HFEngine vs a plain ``model.generate`` loop.

    python benchmarks/rollout_throughput.py --tasks 8 --group 8 --reps 5 --size small medium

Both sides play the same multi-turn tool task (B tasks x G rollouts, ``--turns`` turns each: every
turn the model answers, a calculator-style tool returns a number, the last turn ends the episode)
with the same tiny Llama model (the built-in tokenizer trained on calculator conversations over
the built-in arithmetic problems, which are also the tasks;
random weights whose end-of-turn logit is raised by ``--stop-bias`` so turns end after a
geometric number of tokens, capped at ``--max-new-tokens``), temperature 1, on one CPU thread.

* spear: :func:`spear.rollout.loop.run_episodes` with :class:`spear.rollout.engine.HFEngine`
  (one batched generation per turn, own sampling loop with KV cache, finished rows dropped,
  sampled ids kept verbatim, observation tokens appended as template deltas).
* baseline: per turn, re-render every conversation with the chat template, re-tokenise, left-pad,
  ``model.generate(do_sample=True, output_scores=True, return_dict_in_generate=True)``, log-probs
  from ``compute_transition_scores``, decode, step the envs one by one.

The two are interleaved (order alternating per repetition) to cancel drift in machine load;
reported: median response tokens/s (sampled tokens, stop token included) and episodes/s, and the
median of the per-repetition speed ratios. Prints one markdown block; results are recorded in
benchmarks/rollout_throughput.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast

from spear.envs.arithmetic import generate_tasks
from spear.envs.base import StepResult, Task
from spear.models.tiny import TinyModelParams, build_tiny_model
from spear.models.tokenizer import Conversation, TokenizerParams, train_tokenizer
from spear.rollout.engine import HFEngine, SamplingParams
from spear.rollout.loop import LoopParams, run_episodes
from spear.types import Message

SIZES = {  # hidden, intermediate, layers, heads
    "small": TinyModelParams(128, 384, 3, 4, 512),  # the built-in model's default size
    "medium": TinyModelParams(256, 768, 4, 4, 512),
}
SYSTEM = "Use the calculator. Answer as \\boxed{n}."
TOOL_SCHEMA = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
    },
}


@dataclass(frozen=True)
class CalculatorTool:
    name: str = "calculator"
    description: str = "Evaluate an arithmetic expression."
    parameters: Any = None

    def __call__(self, **arguments: Any) -> str:
        return "0"


class BenchEnv:
    """Answers ``turns - 1`` turns with a tool result, then ends the episode."""

    def __init__(self, turns: int) -> None:
        self.turns, self.k, self.rng = turns, 0, random.Random(0)

    def reset(self, task: Task, *, seed: int | None = None) -> tuple[list[Message], dict[str, Any]]:
        self.k, self.rng = 0, random.Random(seed)
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task.prompt}], {}

    def step(self, action_text: str) -> StepResult:
        self.k += 1
        if self.k >= self.turns:
            return StepResult([], 0.0, terminated=True, info={"final_answer": action_text[-8:]})
        result = str(self.rng.randrange(10**5, 10**7))
        return StepResult([{"role": "tool", "content": result}], 0.0, False, info={"tool_calls": 1})

    def close(self) -> None:
        return None


def build_tokenizer(seed: int) -> PreTrainedTokenizerFast:
    rng = random.Random(seed)
    convs = []
    for task in generate_tasks("train", 2000, seed, difficulty=3):
        q, n = task.prompt, rng.randrange(10**4, 10**6)
        call = f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{n}-7"}}}}</tool_call>'
        msgs: list[Message] = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": q},
            {"role": "assistant", "content": call},
            {"role": "tool", "content": str(n - 7)},
            {"role": "assistant", "content": f"The answer is \\boxed{{{n - 7}}}."},
        ]
        convs.append(Conversation(msgs, [TOOL_SCHEMA]))
    return train_tokenizer(convs, TokenizerParams(vocab_size=1024))


def build_model(size: str, tok: PreTrainedTokenizerFast, stop_bias: float) -> torch.nn.Module:
    model = build_tiny_model(SIZES[size], tok, seed=0)
    bias = torch.zeros(len(tok))
    bias[tok.convert_tokens_to_ids("<|im_end|>")] = stop_bias
    model.lm_head.register_forward_hook(lambda mod, args, out: out + bias)
    return model.eval()


@dataclass
class Result:
    seconds: float
    tokens: int
    episodes: int


def run_spear(model, tok, tasks, args, seed: int) -> Result:
    params = LoopParams(
        max_turns=args.turns,
        max_response_tokens=args.turns * args.max_new_tokens,
        max_context_tokens=512,
        layout="episode",
        history_length=0,
        sampling=SamplingParams(1.0, 1.0, None, args.max_new_tokens, None, None),
        env_step_timeout_s=30.0,
    )
    engine = HFEngine(model, tok)
    t0 = time.perf_counter()
    episodes = run_episodes(
        engine,
        tok,
        lambda: BenchEnv(args.turns),
        tasks,
        group_size=args.group,
        params=params,
        step=0,
        first_group_id=0,
        first_episode_id=0,
        generator=torch.Generator().manual_seed(seed),
        tools=[CalculatorTool(parameters=TOOL_SCHEMA["function"]["parameters"])],
    )
    seconds = time.perf_counter() - t0
    tokens = sum(s.num_response_tokens for e in episodes for s in e.samples)
    return Result(seconds, tokens, len(episodes))


def run_baseline(model, tok, tasks, args, seed: int) -> Result:
    torch.manual_seed(seed)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=stop,
        pad_token_id=tok.pad_token_id,
        return_dict_in_generate=True,
        output_scores=True,
    )  # top_k=0: no top-k filter (None would fall back to the library default of 50)
    tok.padding_side = "left"
    t0 = time.perf_counter()
    envs = [BenchEnv(args.turns) for _ in range(len(tasks) * args.group)]
    convs = [
        env.reset(tasks[i // args.group], seed=i // args.group)[0] for i, env in enumerate(envs)
    ]
    active, tokens = list(range(len(envs))), 0
    while active:
        texts = [
            tok.apply_chat_template(
                convs[i], tools=[TOOL_SCHEMA], add_generation_prompt=True, tokenize=False
            )
            for i in active
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=config)
            logprobs = model.compute_transition_scores(
                out.sequences, out.scores, normalize_logits=True
            )
        new = out.sequences[:, enc["input_ids"].shape[1] :]
        still = []
        for row, i in enumerate(active):
            ids = new[row].tolist()
            n = ids.index(stop) + 1 if stop in ids else len(ids)
            _ = logprobs[row, :n].tolist()  # what a trainer would keep
            tokens += n
            text = tok.decode(ids[:n], skip_special_tokens=True)
            res = envs[i].step(text)
            convs[i] = [*convs[i], {"role": "assistant", "content": text}, *res.messages]
            if not res.terminated:
                still.append(i)
        active = still
    return Result(time.perf_counter() - t0, tokens, len(envs))


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--stop-bias", type=float, default=3.5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--size", nargs="*", default=["small", "medium"], choices=sorted(SIZES))
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def bench(size: str, tok, args) -> list[str]:
    model = build_model(size, tok, args.stop_bias)
    n_params = sum(p.numel() for p in model.parameters())
    tasks = generate_tasks("test", args.tasks, seed=1, difficulty=3)
    runners: dict[str, Callable[..., Result]] = {"spear": run_spear, "baseline": run_baseline}
    runners["spear"](model, tok, tasks[:1], args, seed=0)  # warm-up both paths
    runners["baseline"](model, tok, tasks[:1], args, seed=0)
    results: dict[str, list[Result]] = {"spear": [], "baseline": []}
    for rep in range(args.reps):
        order = ["spear", "baseline"] if rep % 2 == 0 else ["baseline", "spear"]
        for name in order:
            results[name].append(runners[name](model, tok, tasks, args, seed=100 + rep))
    tps = {k: [r.tokens / r.seconds for r in v] for k, v in results.items()}
    eps = {k: [r.episodes / r.seconds for r in v] for k, v in results.items()}
    ratios = [a / b for a, b in zip(tps["spear"], tps["baseline"])]
    lines = []
    for name in ("spear", "baseline"):
        mean_tokens = statistics.mean(r.tokens / r.episodes for r in results[name])
        lines.append(
            f"| {size} ({n_params / 1e6:.2f}M) | {name} | {statistics.median(tps[name]):.0f} "
            f"| {statistics.median(eps[name]):.2f} | {mean_tokens:.1f} "
            f"| {statistics.median([r.seconds for r in results[name]]):.2f} |"
        )
    lines.append(
        f"| {size} | **ratio spear/baseline** | **{statistics.median(ratios):.2f}x** "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f}) | | | |"
    )
    return lines


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    tok = build_tokenizer(seed=0)
    print(
        f"B={args.tasks} tasks x G={args.group}, {args.turns} turns, max_new_tokens={args.max_new_tokens}, "
        f"stop_bias={args.stop_bias}, reps={args.reps}, torch threads={args.threads}\n"
    )
    print("| model | loop | response tokens/s | episodes/s | tokens/episode | s/rollout |")
    print("|---|---|---|---|---|---|")
    for size in args.size:
        for line in bench(size, tok, args):
            print(line)


if __name__ == "__main__":
    main()
