"""spear vs TRL ``GRPOTrainer`` step time, single-turn and multi-turn with tools, one run, interleaved.

    python benchmarks/trl_compare.py --steps 6      # -> results/speed/trl_compare.{json,png}

Four worker processes stay alive for the whole run: spear single-turn, TRL single-turn, spear
multi-turn with the calculator tool, TRL multi-turn with ``tools=[calculator]`` (TRL in its own
virtualenv, ``--trl-python``; see ``trl_worker.py``). Every round steps each of them once, the
order rotating per round, so all four share the machine's load. One warm-up step each is run
first and dropped. Step ``k`` of every worker trains on the same 16 prompts (spear's train tasks
of step ``k``) x 8 generations.

Equal work: same model directory, tokenizer and chat template; same system prompt, tool and
prompts (single-turn TRL prompts carry the same ``<tools>`` line in the system message, so the
prompt tokens are identical); temperature 1, top-p 1, no top-k; micro-batch 32 and one optimizer
step per 128 generations, one pass, lr 1e-4, no KL, no gradient checkpointing. Single-turn: at
most 48 new tokens (spear ``max_turns=1``). Multi-turn: spear at most 4 turns x 48 new tokens,
192 sampled tokens per episode; TRL at most 3 tool-calling iterations (4 generations) and
``max_completion_length=192`` (TRL counts tool-result tokens in it, spear does not). spear runs
its full recipe (``spear`` preset: tool bonus, Clip-Cov, SIL replay when the buffer triggers)
with the group and response filters off so it trains every sequence, as TRL does. The work
actually done differs with sampling: tokens per step are recorded and the ratios are also given
per token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import (
    DEFAULT_CACHE,
    REPO,
    RESULTS,
    Worker,
    build_config,
    machine,
    ratio_summary,
    spear_worker_cmd,
    write_result,
)

EQUAL = [
    "filters.group_keep_ratio=1.0", "filters.overlong=false", "filters.incomplete=false",
    "filters.repetitive=false", "filters.unreadable=false", "rollout.temperature=1.0",
    "rollout.top_p=1.0", "rollout.top_k=0", "optim.micro_batch_size=32", "optim.ppo_epochs=1",
    "rollout.tasks_per_step=16", "rollout.group_size=8", "rollout.max_new_tokens=48",
]  # fmt: skip
MODES = {
    "single": (["rollout.max_turns=1", "rollout.max_response_tokens=48"], 48),
    "tools": (["rollout.max_turns=4", "rollout.max_response_tokens=192"], 192),
}


def model_dir(cache_dir: str) -> str:
    """The cached warm-started model directory spear itself loads (a plain LlamaForCausalLM)."""
    from spear.models.warmstart import WarmStartParams

    cfg = build_config("spear", [], cache_dir, 1)
    return str(
        Path(cache_dir).expanduser()
        / f"warm-{WarmStartParams.from_config(cfg).cache_key(cfg.trainer.seed)}"
    )


def trl_cmd(
    python: str, model: str, mode: str, steps: int, max_completion: int, threads: int
) -> list[str]:
    return [python, str(REPO / "benchmarks" / "trl_worker.py"), "--model", model, "--mode", mode,
            "--steps", str(steps), "--max-completion", str(max_completion), "--threads", str(threads),
            "--max-tool-iterations", "3"]  # fmt: skip


def spear_record(rec: dict[str, Any]) -> dict[str, float]:
    m = rec["metrics"]
    return {"wall": rec["wall_s"], "cpu": rec["cpu_s"], "tokens": float(m["tokens"]),
            "completion_tokens": float(m["train/response_tokens"]) * float(m["train/episodes"]),
            "tool_calls_per_episode": float(m["train/tool_calls"]), "turns": float(m["train/turns"]),
            "peak_rss_mb": rec["peak_rss_mb"]}  # fmt: skip


def trl_record(rec: dict[str, Any], prev_tokens: float, n: int) -> dict[str, float]:
    m = rec["metrics"]
    return {"wall": rec["wall_s"], "cpu": rec["cpu_s"], "tokens": m["num_tokens"] - prev_tokens,
            "completion_tokens": m["completions/mean_length"] * n,
            "tool_calls_per_episode": m.get("tools/call_frequency", 0.0), "peak_rss_mb": rec["peak_rss_mb"]}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    model = model_dir(args.cache_dir)
    n = 16 * 8
    workers: dict[str, Worker] = {}
    for mode in args.modes:
        extra, max_completion = MODES[mode]
        workers[f"spear-{mode}"] = Worker(
            spear_worker_cmd(
                "spear", [*EQUAL, *extra, *args.spear_override], args.cache_dir, args.threads
            )
        )
        workers[f"trl-{mode}"] = Worker(
            trl_cmd(args.trl_python, model, mode, args.steps + 1, max_completion, args.threads),
            env={
                "PYTHONPATH": str(REPO),
                "TRL_EXPERIMENTAL_SILENCE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                **dict(kv.split("=", 1) for kv in args.trl_env),
            },
        )
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in workers}
    prev = {k: 0.0 for k in workers}
    names = list(workers)
    try:
        for k in range(args.steps + 1):
            order = names[k % len(names) :] + names[: k % len(names)]
            for name in order:
                rec = workers[name].step()
                row = (
                    trl_record(rec, prev[name], n) if name.startswith("trl") else spear_record(rec)
                )
                prev[name] = rec["metrics"].get("num_tokens", 0.0)
                if k > 0:  # step 1 is the warm-up
                    rows[name].append(row)
                print(k + 1, name, {a: round(b, 2) for a, b in row.items()}, flush=True)
    finally:
        for w in workers.values():
            w.close()
    return rows


def summarise(rows: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in [m for m in MODES if f"spear-{m}" in rows]:
        s, t = rows[f"spear-{mode}"], rows[f"trl-{mode}"]
        out[mode] = {
            "spear_median_s": statistics.median(r["wall"] for r in s),
            "trl_median_s": statistics.median(r["wall"] for r in t),
            "spear_median_cpu_s": statistics.median(r["cpu"] for r in s),
            "trl_median_cpu_s": statistics.median(r["cpu"] for r in t),
            "cpu_ratio_spear_over_trl": ratio_summary([a["cpu"] / b["cpu"] for a, b in zip(s, t)]),
            "cpu_per_token_ratio_spear_over_trl": ratio_summary(
                [(a["cpu"] / a["tokens"]) / (b["cpu"] / b["tokens"]) for a, b in zip(s, t)]
            ),
            "wall_ratio_spear_over_trl": ratio_summary(
                [a["wall"] / b["wall"] for a, b in zip(s, t)]
            ),
            "wall_per_token_ratio_spear_over_trl": ratio_summary(
                [(a["wall"] / a["tokens"]) / (b["wall"] / b["tokens"]) for a, b in zip(s, t)]
            ),
            "spear_tokens_per_step": statistics.mean(r["tokens"] for r in s),
            "trl_tokens_per_step": statistics.mean(r["tokens"] for r in t),
            "spear_completion_tokens_per_step": statistics.mean(r["completion_tokens"] for r in s),
            "trl_completion_tokens_per_step": statistics.mean(r["completion_tokens"] for r in t),
            "spear_tool_calls_per_episode": statistics.mean(r["tool_calls_per_episode"] for r in s),
            "trl_tool_calls_per_episode": statistics.mean(r["tool_calls_per_episode"] for r in t),
            "spear_peak_rss_mb": max(r["peak_rss_mb"] for r in s),
            "trl_peak_rss_mb": max(r["peak_rss_mb"] for r in t),
            "bar": 0.5 if mode == "single" else 1 / 3,
        }
    return out


def plot(rows: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rs in rows.items():
        ax.plot(range(2, len(rs) + 2), [r["cpu"] for r in rs], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("process CPU seconds / optimizer step")
    ax.set_title("spear vs TRL GRPOTrainer (interleaved, same run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--steps", type=int, default=6, help="measured steps per worker (after 1 warm-up)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--spear-override", action="append", default=[], metavar="KEY=VALUE",
        help="extra spear config override (repeatable), e.g. rollout.recompute_old_logprobs=false",
    )  # fmt: skip
    p.add_argument(
        "--trl-env", action="append", default=[], metavar="NAME=VALUE",
        help="extra environment variable of the TRL workers (repeatable), e.g. glibc's "
        "MALLOC_MMAP_THRESHOLD_=33554432 to give TRL the allocator settings spear makes itself",
    )  # fmt: skip
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--trl-python", default="/work/trl-venv/bin/python")
    p.add_argument("--out", type=Path, default=RESULTS / "trl_compare.json")
    args = p.parse_args()
    load_before = machine()["loadavg"]
    rows = run(args)
    write_result(args.out, summarise(rows), rows, load_before, plot=lambda png: plot(rows, png))


if __name__ == "__main__":
    main()
