"""Profile a few SPEAR training steps with torch.profiler (operator table) and, separately,
with py-spy (run this script under ``py-spy record``), see ``benchmarks/profile.md``.

    python benchmarks/speed_profile.py --steps 3 --warmup 1 --out benchmarks/results/speed/torch_profile.txt
    py-spy record -r 50 --format raw -o benchmarks/results/speed/pyspy.txt -- \\
        python benchmarks/speed_profile.py --steps 3 --warmup 1 --no-torch-profiler
    python benchmarks/speed_profile.py --fold benchmarks/results/speed/pyspy.txt   # % tables
    python benchmarks/speed_profile.py --trl-mode tools --by-shape --warmup 3 --steps 2 \
        --out benchmarks/results/speed/torch_profile_shapes.txt

The folded-stack summary (``--fold``) prints inclusive and self time per function for the
samples inside ``Trainer.train_step``. ``--by-shape`` records input shapes and lists operators
per shape (how the fifth round of ``profile.md`` found its slow copies); ``--trl-mode`` runs
``trl_compare.py``'s settings of that mode.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import DEFAULT_CACHE, build_config


def fold_summary(path: Path, within: str, top: int) -> str:
    """Inclusive / self percentages per function of a py-spy raw (folded) file."""
    incl: collections.Counter[str] = collections.Counter()
    self_t: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if within and not any(within in f for f in frames):
            continue
        total += int(n)
        self_t[frames[-1]] += int(n)
        for f in set(frames):
            incl[f] += int(n)
    out = [f"samples inside {within!r}: {total}", "", "inclusive:"]
    out += [f"{100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    out += ["", "self:"] + [f"{100 * c / total:5.1f}%  {f}" for f, c in self_t.most_common(top)]
    return "\n".join(out)


def run_steps(args: argparse.Namespace) -> None:
    import torch
    from trl_compare import EQUAL, MODES

    from spear.trainer import Trainer

    mode = [*EQUAL, *MODES[args.trl_mode][0]] if args.trl_mode else []
    cfg = build_config(args.method, [*mode, *(args.set or [])], args.cache_dir, 1)
    torch.set_num_threads(1)
    trainer = Trainer(cfg, Path(tempfile.mkdtemp()))
    for _ in range(args.warmup):
        trainer.train_step()
    if args.no_torch_profiler:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            m = trainer.train_step()
            print(
                json.dumps(
                    {
                        "wall_s": time.perf_counter() - t0,
                        **{k: v for k, v in m.items() if k.startswith("time/")},
                    }
                )
            )
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        for _ in range(args.steps):
            trainer.train_step()
    events = prof.key_averages(group_by_input_shape=args.by_shape)
    table = events.table(
        sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--method", default="spear")
    p.add_argument("--set", action="append", help="config override key=value (repeatable)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--no-torch-profiler", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/speed/torch_profile.txt"))
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--fold", type=Path, help="summarise a py-spy raw file instead of running")
    p.add_argument("--within", default="Trainer.train_step")
    p.add_argument("--by-shape", action="store_true", help="operators per input shape")
    p.add_argument("--trl-mode", choices=["single", "tools"], help="trl_compare.py's settings")
    args = p.parse_args()
    if args.fold:
        print(fold_summary(args.fold, args.within, args.top))
    else:
        run_steps(args)


if __name__ == "__main__":
    main()
