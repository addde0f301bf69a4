"""Probe the warm start: build (or load) the warm model and measure held-out behaviour.

Plays held-out arithmetic tasks with plain ``model.generate`` (sampling) and the task's ToolEnv,
up to ``--max-turns`` assistant turns, and reports success, the share of episodes that call the
tool, success when the tool was called / not called, and the build time.

    python benchmarks/warmstart_probe.py --cache /tmp/spear-cache --tasks 256 --temperature 1
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spear.config import load_config
from spear.envs.arithmetic import ArithmeticTasks
from spear.envs.base import Env, Task, tool_schema
from spear.models.warmstart import REPORT_FILE, WarmStartParams, ensure_warm_model
from spear.types import Message


@dataclass
class Episode:
    env: Env
    messages: list[Message]
    calls: int = 0
    done: bool = False
    success: bool = False
    turns: int = 0
    log: list[str] = field(default_factory=list)


def _prompt_ids(tok, messages: list[Message], tools) -> list[int]:
    text = tok.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _generate(model, tok, prompts: list[list[int]], temperature: float, max_new: int) -> list[str]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding for generation
        ids[i, width - len(p) :], attn[i, width - len(p) :] = torch.tensor(p), 1
    kw = (
        {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    )
    out = model.generate(
        input_ids=ids,
        attention_mask=attn,
        max_new_tokens=max_new,
        top_k=None,
        top_p=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kw,
    )
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=False)
    return [t.split(tok.eos_token)[0].replace(tok.pad_token, "") for t in texts]


def play(model, tok, source: ArithmeticTasks, tasks: list[Task], args) -> list[Episode]:
    tools = [tool_schema(t) for t in source.tools()]
    episodes = []
    for task in tasks:
        env = source.make_env()
        msgs, _ = env.reset(task)
        episodes.append(Episode(env, list(msgs)))
    for _turn in range(args.max_turns):
        live = [e for e in episodes if not e.done]
        if not live:
            break
        for i in range(0, len(live), args.batch):
            chunk = live[i : i + args.batch]
            texts = _generate(
                model,
                tok,
                [_prompt_ids(tok, e.messages, tools) for e in chunk],
                args.temperature,
                args.max_new_tokens,
            )
            for e, text in zip(chunk, texts):
                e.turns += 1
                e.calls += "<tool_call>" in text  # markup tokens survive decoding
                e.messages.append({"role": "assistant", "content": text})
                res = e.env.step(text)
                e.messages.extend(res.messages)
                e.done = res.terminated or res.truncated
                e.success = bool(res.info.get("success", False))
    return episodes


def summarize(episodes: list[Episode]) -> dict[str, float]:
    n = len(episodes)
    tool = [e for e in episodes if e.calls]
    plain = [e for e in episodes if not e.calls]

    def rate(es: list[Episode]) -> float:
        return sum(e.success for e in es) / len(es) if es else float("nan")

    return {
        "success": rate(episodes),
        "tool_call_fraction": len(tool) / n,
        "success_with_tool": rate(tool),
        "success_without_tool": rate(plain),
        "mean_turns": sum(e.turns for e in episodes) / n,
        "unfinished": sum(not e.done for e in episodes) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/spear-warm-cache")
    ap.add_argument("--tasks", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seed", type=int, default=1234)
    ap.add_argument("--show", type=int, default=0, help="print this many transcripts")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. model.warm_start.steps=300"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = load_config(overrides=args.overrides)
    params = WarmStartParams.from_config(cfg)
    t0 = time.perf_counter()
    path = ensure_warm_model(Path(args.cache), params, args.seed)
    ensure_s = time.perf_counter() - t0
    report = json.loads((path / REPORT_FILE).read_text())
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    source = ArithmeticTasks(params.task)
    tasks = source.tasks("test", args.tasks, args.eval_seed)
    torch.manual_seed(args.eval_seed)
    t1 = time.perf_counter()
    episodes = play(model, tok, source, tasks, args)
    result = summarize(episodes)
    result.update(
        eval_seconds=time.perf_counter() - t1,
        ensure_seconds=ensure_s,
        build_seconds=report["build_seconds"],
        final_loss=report["final_loss"],
        num_parameters=report["num_parameters"],
        vocab_size=report["vocab_size"],
        demo_tokens_mean=report["demo_tokens_mean"],
    )
    for e in episodes[: args.show]:
        print(
            " | ".join(f"{m['role']}: {m.get('content', '')}" for m in e.messages[1:]),
            "=>",
            e.success,
        )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
