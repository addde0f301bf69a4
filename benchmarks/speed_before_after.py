"""Before / after the profiler-driven fixes, in the same run, interleaved.

    python benchmarks/speed_before_after.py --steps 8 --method spear   # -> results/speed/before_after_spear.json

"before" is a copy of this working tree's ``spear`` package with the fixed files
(:data:`FIXED_FILES`) taken from git ``HEAD`` (``git show``, read-only), imported through
``PYTHONPATH`` (or, with ``--base REV``, the whole package at revision ``REV``: ``git
archive``); "after" is the working tree. Both workers run the same method and seed with the
default run's budget and step alternately (order alternating per step). Reported: per-step ratio
after / before of process CPU time (``speed_common.CpuProbes``; wall time too) and of each
stage's CPU time (median, min, max), and the ratio of the totals.
The two runs sample the same first rollout; the fixes change floats at rounding level
(see ``profile.md``), so later steps' rollouts differ slightly: the per-token ratio is given too.

``--same-code --before-set KEY=VALUE`` compares one config switch instead (both workers run the
working tree; "before" with the override); ``--set`` overrides both, ``--trl-mode single|tools``
gives both ``trl_compare.py``'s settings of that mode.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import (
    DEFAULT_CACHE,
    REPO,
    RESULTS,
    Worker,
    machine,
    ratio_summary,
    spear_worker_cmd,
    write_result,
)
from trl_compare import EQUAL, MODES

FIXED_FILES = [
    "spear/policy.py",
    "spear/stages.py",
    "spear/algo/logprobs.py",
    "spear/rollout/engine.py",
]
STAGES = ["rollout", "old_logprobs", "update", "sil_update"]


def before_tree(dest: Path, fixed: list[str] | None = None, base: str | None = None) -> Path:
    """``dest/spear``: the package at git revision ``base`` if given, else the working tree's
    package with ``fixed`` (default :data:`FIXED_FILES`) taken from ``HEAD``."""
    if base is not None:
        archive = subprocess.run(
            ["git", "archive", base, "spear"], cwd=REPO, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return dest
    shutil.copytree(REPO / "spear", dest / "spear", ignore=shutil.ignore_patterns("__pycache__"))
    for f in fixed or FIXED_FILES:
        text = subprocess.run(
            ["git", "show", f"HEAD:{f}"], cwd=REPO, check=True, capture_output=True, text=True
        ).stdout
        (dest / f).write_text(text)
    return dest


def row(rec: dict[str, Any]) -> dict[str, float]:
    m = rec["metrics"]
    r = {s: float(m.get(f"cpu/{s}", 0.0)) for s in STAGES}
    r.update(
        wall=rec["wall_s"],
        cpu=rec["cpu_s"],
        tokens=float(m["tokens"]),
        peak_rss_mb=rec["peak_rss_mb"],
    )
    return r


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--method", default="spear")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--fixed", nargs="+", default=FIXED_FILES, help="files taken from HEAD for 'before'"
    )
    p.add_argument("--base", default=None, help="'before' = the whole package at this revision")
    p.add_argument(
        "--same-code",
        action="store_true",
        help="'before' runs the working tree too (with --before-set)",
    )
    p.add_argument("--set", action="append", default=[], help="config override of both (k=v)")
    p.add_argument(
        "--before-set", action="append", default=[], help="config override of 'before' only"
    )
    p.add_argument(
        "--trl-mode", choices=sorted(MODES), help="both run trl_compare.py's settings of this mode"
    )
    args = p.parse_args()
    out = args.out or RESULTS / f"before_after_{args.method}.json"
    load_before = machine()["loadavg"]
    with tempfile.TemporaryDirectory() as tmp:
        both = [*(EQUAL + MODES[args.trl_mode][0] if args.trl_mode else []), *args.set]
        cmd = spear_worker_cmd(args.method, both, args.cache_dir, args.threads)
        old = spear_worker_cmd(args.method, [*both, *args.before_set], args.cache_dir, args.threads)
        env = (
            None
            if args.same_code
            else {"PYTHONPATH": str(before_tree(Path(tmp), args.fixed, args.base))}
        )
        workers = {"before": Worker(old, env=env), "after": Worker(cmd)}
        rows: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        try:
            for k in range(args.steps):
                for name in ("before", "after") if k % 2 == 0 else ("after", "before"):
                    rows[name].append(row(workers[name].step()))
                    print(
                        k + 1, name, {a: round(b, 2) for a, b in rows[name][-1].items()}, flush=True
                    )
        finally:
            for w in workers.values():
                w.close()
    b, a = rows["before"], rows["after"]
    summary = {
        "cpu_after_over_before": ratio_summary([y["cpu"] / x["cpu"] for x, y in zip(b, a)]),
        "cpu_per_token_after_over_before": ratio_summary(
            [(y["cpu"] / y["tokens"]) / (x["cpu"] / x["tokens"]) for x, y in zip(b, a)]
        ),
        "total_cpu_after_over_before": sum(r["cpu"] for r in a) / sum(r["cpu"] for r in b),
        "wall_after_over_before": ratio_summary([y["wall"] / x["wall"] for x, y in zip(b, a)]),
        "wall_per_token_after_over_before": ratio_summary(
            [(y["wall"] / y["tokens"]) / (x["wall"] / x["tokens"]) for x, y in zip(b, a)]
        ),
        "total_after_over_before": sum(r["wall"] for r in a) / sum(r["wall"] for r in b),
        "cpu_stages_after_over_before": {  # stages that ran (> 0.05 s) before
            s: ratio_summary([y[s] / x[s] for x, y in zip(b, a) if x[s] > 0.05])
            for s in ("rollout", "old_logprobs", "update", "sil_update")
            if any(x[s] > 0.05 for x in b)
        },
        "median_cpu_s": {
            n: {s: statistics.median(r[s] for r in rs) for s in [*STAGES, "cpu", "wall"]}
            for n, rs in rows.items()
        },
        "peak_rss_mb": {n: max(r["peak_rss_mb"] for r in rs) for n, rs in rows.items()},
    }
    fixed = args.fixed if args.base is None else None
    write_result(out, summary, rows, load_before, extra={"base": args.base, "fixed_files": fixed})


if __name__ == "__main__":
    main()
