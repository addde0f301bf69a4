"""Host memory of the SIL replay buffer: 2,048 stored trajectories of 4,096 tokens each.

    python benchmarks/replay_memory.py --trajectories 2048 --tokens 4096 --steps 8

The acceptance bound (issue 4) is 200 MB of host memory for 2,048 x 4,096 tokens. The buffer is
filled the way the trainer fills it: ``--steps`` calls of ``ReplayBuffer.add`` (one per training
step), each with its own freshly made samples (int64 ids, bool loss mask with a 512-token
prompt, float32 behaviour log-probs, one group of 8 episodes per 8 samples, every sample with a
positive advantage so all are stored). Measured:

* ``storage``: bytes of the tensor storages the buffer holds (``ReplayBuffer.nbytes``);
* ``python``: bytes of Python objects the buffer keeps (tracemalloc: traced memory still
  allocated after the adds, minus before; tensor data is not traced, only the Python side);
* ``rss``: the process's resident-set growth over the adds (psutil), which counts everything
  the buffer holds (tensor data, Python objects, allocator slack); all inputs are made before
  the baseline and kept alive until after the measurement, so none of their memory is in it;
* ``state_dict``: bytes of ``torch.save(buffer.state_dict())`` (what a checkpoint adds);
* ``batch``: tensor bytes of the ``consume`` result (``sample_size`` = all samples; ids come
  back as int64, masks and log-probs are the stored tensors), the replay batch the SIL update
  reads, transient.

Prints one markdown block (recorded in benchmarks/replay_memory.md) and exits with status 1 if
the buffer's RSS growth or its storage exceeds ``--limit-mb`` (decimal megabytes).
"""

from __future__ import annotations

import argparse
import gc
import io
import platform
import sys
import time
import tracemalloc

import psutil
import torch

from spear.replay import ReplayBuffer, ReplayParams
from spear.types import Sample

PROMPT_TOKENS = 512
GROUP_SIZE = 8
VOCAB = 151_000  # Qwen-sized vocabulary: ids need more than 16 bits


def make_step(n: int, length: int, first_episode: int, gen: torch.Generator) -> list[Sample]:
    """``n`` distinct samples of ``length`` tokens, all with a positive advantage."""
    mask = torch.arange(length) >= PROMPT_TOKENS  # [T] bool
    out = []
    for i in range(n):
        e = first_episode + i
        ids = torch.randint(0, VOCAB, (length,), generator=gen)  # [T] int64
        lp = -torch.rand(length, generator=gen) * mask  # [T] float32, 0 outside the mask
        score = float(i % 2)  # half the episodes of each group succeed
        out.append(
            Sample(
                ids,
                mask.clone(),
                lp,
                group_id=e // GROUP_SIZE,
                episode_id=e,
                score=score,
                advantage=0.5,
            )
        )
    return out


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB ({n / 2**20:.1f} MiB)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trajectories", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8, help="add() calls the samples are spread over")
    ap.add_argument("--limit-mb", type=float, default=200.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.trajectories % args.steps:
        ap.error("--trajectories must be a multiple of --steps")
    torch.set_num_threads(1)
    n, length, per_step = args.trajectories, args.tokens, args.trajectories // args.steps
    params = ReplayParams(
        capacity=n,
        history_size=10_240,
        tolerate_steps=args.steps,
        trigger_ratio=1.5,
        sample_size=n,
        sampling="uniform",
        recalibration="decay",  # every stored sample stays eligible; the storage is the same
        normalize_by_std=False,
        std_eps=1e-6,
        keep="positive",
        decay_weight=1.0,
        consume="clear",
        staleness="current_step",
    )
    gen = torch.Generator().manual_seed(args.seed)
    # All inputs exist before the baseline and stay alive until the buffer is measured, so the
    # RSS growth is the buffer's alone (freed input memory cannot be reused by its copies).
    steps = [make_step(per_step, length, k * per_step, gen) for k in range(args.steps)]
    buf = ReplayBuffer(params, seed=args.seed)
    rss0 = rss()
    tracemalloc.start()
    py0 = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    for step, samples in enumerate(steps, start=1):
        buf.add(samples, step)
    add_s = time.perf_counter() - t0
    gc.collect()
    py_bytes = tracemalloc.get_traced_memory()[0] - py0
    tracemalloc.stop()
    rss_delta = rss() - rss0
    storage = buf.nbytes()
    del steps, samples
    assert len(buf) == n, f"expected {n} stored samples, got {len(buf)}"

    f = io.BytesIO()
    t0 = time.perf_counter()
    torch.save(buf.state_dict(), f)
    save_s = time.perf_counter() - t0
    state_bytes = f.getbuffer().nbytes
    del f

    t0 = time.perf_counter()
    batch = buf.consume(args.steps)
    consume_s = time.perf_counter() - t0
    n_sampled = batch.n_sampled
    batch_bytes = sum(
        getattr(s, name).untyped_storage().nbytes()
        for s in batch.samples
        for name in ("input_ids", "loss_mask", "behavior_logprobs")
    )
    del batch

    tokens = n * length
    ok = rss_delta < args.limit_mb * 1e6 and storage < args.limit_mb * 1e6
    lines = [
        f"{n} trajectories x {length} tokens = {tokens:,} tokens, "
        f"added over {args.steps} steps of {per_step}",
        "",
        "| measure | bytes | per token |",
        "|---|---|---|",
        f"| tensor storage (`ReplayBuffer.nbytes`) | {mb(storage)} | {storage / tokens:.2f} B |",
        f"| Python objects kept (tracemalloc) | {mb(py_bytes)} | {py_bytes / tokens:.3f} B |",
        f"| **RSS growth over the adds** | **{mb(rss_delta)}** | {rss_delta / tokens:.2f} B |",
        f"| `torch.save(state_dict())` | {mb(state_bytes)} | {state_bytes / tokens:.2f} B |",
        f"| tensors of the consumed replay batch ({n_sampled} samples, int64 ids) "
        f"| {mb(batch_bytes)} | {batch_bytes / tokens:.2f} B |",
        "",
        f"limit {args.limit_mb:.0f} MB: {'PASS' if ok else 'FAIL'}; "
        f"add {add_s:.2f} s, state_dict + torch.save {save_s:.2f} s, "
        f"consume {consume_s:.2f} s",
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}",
    ]
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
