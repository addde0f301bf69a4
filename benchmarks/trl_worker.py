"""TRL ``GRPOTrainer`` side of ``benchmarks/trl_compare.py``; runs in TRL's own virtualenv.

    PYTHONPATH=. /work/trl-venv/bin/python benchmarks/trl_worker.py --model DIR --mode single|tools ...

Same protocol as the spear worker of ``speed_common.py``: one JSON line ``{"ready": ...}``, then
for every ``step`` line on stdin one optimizer step of ``GRPOTrainer`` and one JSON line with its
wall and process CPU seconds (callback ``on_step_begin`` -> ``on_step_end``: generation, tool
calls, rewards, log-probs, backward and optimizer step), the tokens it generated and the peak RSS.

Equal work with spear (see ``trl_compare.md``): the prompts are spear's own (``spear.envs``
imported read-only through ``PYTHONPATH``: system prompt, the train tasks spear draws at steps
1..N in that order, the ``calculator`` tool and the ``\\boxed{}`` scorer); 16 prompts x
``--group`` generations per optimizer step (micro-batch 32, gradient accumulation to the whole
generation batch), one pass (``num_iterations=1``), the same temperature / top-p / top-k, no KL.
The tiny model is a plain ``LlamaForCausalLM`` directory, loaded by ``from_pretrained``. Our
chat template is not one TRL knows, so its tool-call ``response_template`` (transformers >= 5.13
response parsing) is set by hand for the Hermes ``<tool_call>{json}</tool_call>`` format the
template renders.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from typing import Any

RESPONSE_TEMPLATE = {  # as TRL's qwen3 template, without the <think> field
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {
            "open": "<tool_call>",
            "close_pattern": r"</tool_call>\s*",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: the arithmetic expression to evaluate
    """
    from spear.envs.arithmetic import CALCULATOR_LIMITS, Calculator

    return Calculator(CALCULATOR_LIMITS)(expression=expression)


def tools_block() -> str:
    """The ``<tools>`` text the chat template renders for spear's calculator (single-turn prompts)."""
    return "<tools>calculator(expression): Evaluate an arithmetic expression.</tools>"


def build_dataset(
    steps: int, tasks_per_step: int, difficulty: int, seed: int, with_tools: bool
) -> Any:
    """The prompts spear's trainer draws at steps 1..steps (``Trainer._task_seed``), in order."""
    from datasets import Dataset

    from spear.envs.arithmetic import SYSTEM_PROMPT, generate_tasks

    rows = []
    system = SYSTEM_PROMPT if with_tools else f"{SYSTEM_PROMPT}\n{tools_block()}"
    for step in range(1, steps + 1):
        for t in generate_tasks(
            "train", tasks_per_step, (seed * 7_919 + step) % (2**31 - 1), difficulty
        ):
            prompt = [{"role": "system", "content": system}, {"role": "user", "content": t.prompt}]
            rows.append({"prompt": prompt, "answer": t.answer, "task_id": t.task_id})
    return Dataset.from_list(rows)


def boxed_reward(
    completions: list[Any], answer: list[str], task_id: list[str], **_: Any
) -> list[float]:
    """spear's arithmetic scorer on the last assistant message of each completion."""
    from spear.envs.answers import score_boxed_number
    from spear.envs.base import Task

    out = []
    for c, a, tid in zip(completions, answer, task_id):
        text = c[-1]["content"] if isinstance(c, list) else str(c)
        out.append(
            float(score_boxed_number(text or "", Task(task_id=tid, prompt="", answer=a)).reward)
        )
    return out


class StepStream:
    """Callback: waits for ``step`` on stdin before each optimizer step, reports after it."""

    def __init__(self, trainer_ref: list[Any]) -> None:
        self.trainer_ref = trainer_ref
        self.t0 = self.c0 = 0.0

    def hook(self) -> Any:
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                line = sys.stdin.readline().strip()
                if line != "step":
                    control.should_training_stop = True
                outer.t0, outer.c0 = time.perf_counter(), time.process_time()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                wall, cpu_s = time.perf_counter() - outer.t0, time.process_time() - outer.c0
                tr = outer.trainer_ref[0]
                m = getattr(tr, "_metrics", {}).get("train", {})
                last = {k: (v[-1] if isinstance(v, list) and v else v) for k, v in m.items()}
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(
                    json.dumps(
                        {
                            "wall_s": wall,
                            "cpu_s": cpu_s,
                            "metrics": _floats(last),
                            "peak_rss_mb": rss,
                        }
                    ),
                    flush=True,
                )

        return _CB()


def _floats(d: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--mode", choices=["single", "tools"], required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tasks-per-step", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-completion", type=int, default=48)
    p.add_argument("--max-tool-iterations", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--difficulty", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    with_tools = args.mode == "tools"
    if with_tools:
        tok.response_template = RESPONSE_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    n = args.tasks_per_step * args.group
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.01,
        max_grad_norm=1.0,
        seed=args.seed,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=n // args.micro_batch,
        num_generations=args.group,
        generation_batch_size=n,
        max_completion_length=args.max_completion,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        num_iterations=1,
        beta=0.0,
        loss_type="dr_grpo",
        scale_rewards="none",
        shuffle_dataset=False,
        dataloader_num_workers=0,
        max_tool_calling_iterations=args.max_tool_iterations if with_tools else None,
        disable_tqdm=True,
        log_completions=False,
        gradient_checkpointing=False,  # TRL's default is True; spear does not recompute activations
    )
    ref: list[Any] = []
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=boxed_reward,
        args=cfg,
        processing_class=tok,
        train_dataset=build_dataset(
            args.steps, args.tasks_per_step, args.difficulty, args.seed, with_tools
        ),
        tools=[calculator] if with_tools else None,
        callbacks=[StepStream(ref).hook()],
    )
    ref.append(trainer)
    print(json.dumps({"ready": True, "mode": args.mode}), flush=True)
    trainer.train()


if __name__ == "__main__":
    main()
