"""The hard-exploration benchmark: SPEAR vs GRPO vs Dr.BoT (and SPEAR's ablations) on ``lookup``.

Every run is a ``spear compare`` run (:mod:`spear.compare`) on the shipped ``lookup`` config
(150 steps of 8 tasks x 8 rollouts, curricula over the whole run), so the benchmark is exactly
what a user gets from the CLI:

    # the main comparison: a learning-rate sweep on the validation split, then 5 seeds held out
    nice -n 10 python benchmarks/hard_exploration.py main
    # the four ablations of SPEAR at SPEAR's chosen learning rate, 5 seeds
    nice -n 10 python benchmarks/hard_exploration.py ablations
    # grpo, drbot, spear on lookup-sparse (0.4% early success), the main sweep's choices, 5 seeds
    nice -n 10 python benchmarks/hard_exploration.py sparse
    # lookup-sparse with half the rollouts a step (4 tasks x 8): its own sweep, then 5 seeds
    nice -n 10 python benchmarks/hard_exploration.py small-batch
    # a probe, not a tuned method: SPEAR on lookup-sparse with the SIL weight at 1 from step 0
    nice -n 10 python benchmarks/hard_exploration.py sil-from-start

Equal tuning: grpo, drbot and spear each get the same sweep of ``optim.lr`` (``LRS``) on the
sweep seeds, evaluated greedily on the **validation** split (items disjoint from the held-out
ones); each method's best value is then used for its main runs, which are evaluated on the
held-out ``test`` split. The ablations reuse SPEAR's chosen value (they are not re-tuned: they
ask what removing one piece does to the tuned recipe). The ``sparse`` part runs the main
methods on ``lookup-sparse`` (the same task from a warm start whose early successes are rarer)
with the learning rates the main sweep chose on validation, carried over for every method alike.
The ``small-batch`` part is ``lookup-sparse`` with 4 tasks a step instead of 8 (about one
success in eight steps at the start), where a GRPO step most often has no gradient at all and
replaying a past success is what the paper says helps; it runs its own sweep.
Results go to ``benchmarks/results/hard_exploration/`` (``summary.json``, ``summary.md``,
``curves.png``; the ablations in ``ablations/``, the sparse variant in ``sparse/``, the smaller
batch in ``small_batch/``). ``sil-from-start`` asks whether the SIL weight's cosine fade-in is
what keeps self-imitation out of the short exploration phase: SPEAR as in ``sparse`` and
``small-batch`` (same learning rate) but with ``replay.loss_coef=1.0`` from the first step, in
``sil_from_start/{sparse,small_batch}/``. It is a diagnostic: the baselines have no such knob,
so it is not entered in the comparison. Kill it any time: running the same command again
resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from spear.compare import CompareSpec, run_comparison

OUT = Path(__file__).resolve().parent / "results" / "hard_exploration"
MAIN = ("grpo", "drbot", "spear")
ABLATIONS = ("spear-no-tool", "spear-no-sil", "spear-no-recal", "spear-no-clipcov")
SEEDS = (0, 1, 2, 3, 4)
SWEEP_SEEDS = (100, 101)
LRS = ("5e-5", "1e-4", "2e-4")
SHARED = ("logging.tensorboard=false",)
SMALL_BATCH = ("rollout.tasks_per_step=4",)  # the small-batch variant: half the tasks a step


def specs(part: str, out: Path, jobs: int) -> list[CompareSpec]:
    """The comparisons one part of the benchmark runs, in order."""
    swept = {"sweep": {"optim.lr": LRS}, "sweep_seeds": SWEEP_SEEDS, "jobs": jobs}
    if part == "main":
        return [CompareSpec("lookup", MAIN, SEEDS, out, overrides=SHARED, **swept)]
    if part == "small-batch":
        small = (*SHARED, *SMALL_BATCH)
        return [CompareSpec("lookup-sparse", MAIN, SEEDS, out / "small_batch", small, **swept)]
    if part in ("ablations", "sparse"):  # both use the main sweep's choices
        chosen = json.loads((out / "summary.json").read_text())["sweep"]["chosen"]
    if part == "ablations":
        lr = f"optim.lr={chosen['spear']}"
        return [
            CompareSpec("lookup", ABLATIONS, SEEDS, out / "ablations", (*SHARED, lr), jobs=jobs)
        ]
    if part == "sparse":
        d = out / "sparse"  # the choices carried over: no sweep runs
        lrs = {"optim.lr": LRS}
        return [CompareSpec("lookup-sparse", MAIN, SEEDS, d, SHARED, lrs, chosen=chosen, jobs=jobs)]
    runs = []
    for name, extra in (("sparse", ()), ("small_batch", SMALL_BATCH)):
        lr = json.loads((out / name / "summary.json").read_text())["methods"]["spear"]["lr"]
        overrides = (*SHARED, *extra, f"optim.lr={lr}", "replay.loss_coef=1.0")
        d = out / "sil_from_start" / name
        runs.append(CompareSpec("lookup-sparse", ("spear",), SEEDS, d, overrides, jobs=jobs))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parts = ["main", "ablations", "sparse", "small-batch", "sil-from-start"]
    ap.add_argument("part", choices=parts)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (1 thread each)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    def report(plan, record) -> None:  # one line a finished run
        from spear.compare import final_success

        logging.info(
            "%s %s seed %d %s: final %s success %.3f (%.0f s)",
            plan.phase, plan.method, plan.seed, plan.value or "", plan.config.eval.split,
            final_success(record), record.get("wall_s") or 0.0,
        )  # fmt: skip

    for spec in specs(args.part, args.out, args.jobs):
        run_comparison(spec, report)


if __name__ == "__main__":
    main()
