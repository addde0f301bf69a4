"""``spear compare``: methods x seeds at identical budgets, with an optional fair sweep.

A comparison trains every method of :data:`METHODS` it is given on the same task, model and
budget, once per seed, and summarises the runs (:mod:`spear.compare_report`). What each method's
config is made of, later layers winning:

1. the method's preset (``grpo``, ``drbot``, ``spear``, ...: the algorithm);
2. the base run config (a YAML file or a shipped name such as ``lookup``) without its ``preset``
   and without the algorithm sections ``advantage``, ``loss`` and ``filters`` (those are the
   method's); its ``replay`` and ``reward`` sections size self-imitation and the tool bonus for
   the methods that use them;
3. the shared overrides (the same for every method);
4. the curriculum horizons matched to the run: ``replay.loss_coef.horizon`` and
   ``reward.tool_bonus.horizon`` are set to ``trainer.steps`` (``match_horizons``);
5. the method's own switches (the baselines turn replay and the tool bonus off; ablations turn
   one piece of SPEAR off);
6. the run's seed, swept value, evaluation split and bookkeeping (no progress bar, checkpoints).

A sweep (``sweep={"optim.lr": [...]}``) first trains every method at every swept value on the
``sweep_seeds``, evaluating on the **validation** split, and picks per method the value with the
highest mean final validation success (ties: the first listed); the main runs then use it on the
held-out ``test`` split. The held-out split is never used to choose anything. ``chosen`` gives
those choices instead, carried over from another comparison's sweep (the sweep is not run).

Every run lives in its own directory under ``out`` and checkpoints every ``trainer.save_every``
steps; a finished run has a ``run.json``. Running the same comparison again skips finished runs,
resumes interrupted ones from their latest checkpoint (a resumed run equals an uninterrupted
one) and restarts those killed before their first checkpoint, so a comparison survives kills.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

from spear.config import Config, ConfigError, config_to_yaml, load_config, run_config_path
from spear.registry import Registry

log = logging.getLogger(__name__)

ALGORITHM_SECTIONS = ("advantage", "loss", "filters")
_OFF = ("replay.enabled=false", "reward.tool_bonus.mode=none")


@dataclass(frozen=True, slots=True)
class Method:
    """A recipe to compare: a preset plus the switches that make it this method."""

    preset: str
    switches: tuple[str, ...] = ()
    description: str = ""


METHODS: Registry[Method] = Registry("method")
for _name, _method in {
    "grpo": Method("grpo", _OFF, "GRPO: std-normalised group advantages, PPO clip 0.2"),
    "drbot": Method("drbot", _OFF, "Dr.BoT: GRPO with the Dr.BoT tricks"),
    "spear": Method("spear", (), "SPEAR: Dr.BoT + SIL + tool bonus + Clip-Cov"),
    "spear-no-tool": Method("spear", ("reward.tool_bonus.mode=none",), "SPEAR without tool bonus"),
    "spear-no-sil": Method("spear", ("replay.enabled=false",), "SPEAR without self-imitation"),
    "spear-no-recal": Method(
        "spear",
        ("replay.recalibration=decay", "replay.decay_weight=1.0"),
        "SPEAR replaying collected advantages (no median recalibration)",
    ),
    "spear-no-clipcov": Method(
        "spear",
        ("loss.policy_loss=vanilla", "replay.policy_loss=vanilla"),
        "SPEAR with plain PPO clipping (no Clip-Cov)",
    ),
    "gigpo": Method("gigpo", _OFF, "GiGPO (per-turn samples)"),
    "drbot-gigpo": Method("drbot-gigpo", _OFF, "Dr.BoT on GiGPO"),
    "spear-gigpo": Method("spear-gigpo", (), "SPEAR on GiGPO"),
}.items():
    METHODS.register(_name)(_method)


#: settings compare gives each run itself (:func:`_bookkeeping`), so a shared override of one is
#: refused instead of silently replaced
SET_PER_RUN = frozenset({"trainer.seed", "eval.split", "trainer.run_dir"})


@dataclass(frozen=True, slots=True)
class CompareSpec:
    """What to compare and how (see the module docstring)."""

    base: str | None  # a run config (file or shipped name); None = the defaults
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    out: Path
    overrides: tuple[str, ...] = ()
    sweep: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sweep_seeds: tuple[int, ...] = ()
    match_horizons: bool = True
    jobs: int = 1
    #: per method, the swept setting's value to use *without* running the sweep: a choice
    #: carried over from another comparison's validation sweep (its summary.json's
    #: ``sweep.chosen``), e.g. for a harder variant of the same task
    chosen: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("compare: give at least one method")
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(
                    f"compare: unknown method {m!r}; known: {', '.join(METHODS.names())}"
                )
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("compare: a method is listed twice")
        for o in self.overrides:
            if o.split("=", 1)[0].strip() in SET_PER_RUN:
                raise ConfigError(
                    f"compare: {o!r} is set by compare for each run (seeds from --seeds, sweeps "
                    "evaluate on the validation split and main runs on the held-out one, each "
                    "run in its own directory under --out); drop it"
                )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("compare: give one or more distinct seeds")
        if len(self.sweep) > 1:
            raise ConfigError("compare: sweep one setting at a time (e.g. optim.lr)")
        if self.chosen:
            self._check_chosen()
        elif self.sweep and not self.sweep_seeds:
            raise ConfigError("compare: a sweep needs --sweep-seeds (distinct from --seeds)")
        if set(self.sweep_seeds) & set(self.seeds):
            raise ConfigError("compare: --sweep-seeds must differ from --seeds")
        if self.jobs < 1:
            raise ConfigError(f"compare: jobs must be >= 1, got {self.jobs}")

    def _check_chosen(self) -> None:
        if len(self.sweep) != 1:
            raise ConfigError("compare: carried-over choices need the swept setting (--sweep)")
        missing = [m for m in self.methods if m not in self.chosen]
        if missing:
            raise ConfigError(f"compare: no carried-over value for method(s) {missing}")
        ((key, values),) = self.sweep.items()
        odd = {m: v for m, v in self.chosen.items() if v not in values}
        if odd:
            raise ConfigError(f"compare: carried-over {key} values {odd} are not in {values}")


@dataclass(frozen=True, slots=True)
class RunPlan:
    """One run of a comparison: its method, seed, swept value (or None) and config."""

    phase: str  # "sweep" or "main"
    method: str
    seed: int
    value: str | None
    run_dir: Path
    config: Config


def _base_layer(base: str | None) -> dict[str, Any]:
    if base is None:
        return {}
    path = run_config_path(base)
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"compare: base config {base!r} does not exist") from None
    return {k: v for k, v in data.items() if k not in ("preset", *ALGORITHM_SECTIONS)}


def method_config(spec: CompareSpec, method: str, extra: Sequence[str]) -> Config:
    """The config of ``method`` under ``spec`` with the run-specific ``extra`` overrides."""
    m = METHODS.get(method)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.yaml"
        path.write_text(yaml.safe_dump(_base_layer(spec.base), sort_keys=False))
        cfg = load_config(preset=m.preset, file=path, overrides=[*spec.overrides, *extra])
        horizons = _horizon_overrides(cfg) if spec.match_horizons else []
        return load_config(
            preset=m.preset,
            file=path,
            overrides=[*spec.overrides, *horizons, *m.switches, *extra],
        )


def _horizon_overrides(cfg: Config) -> list[str]:
    steps = cfg.trainer.steps
    out = [f"reward.tool_bonus.horizon={steps}"]
    if isinstance(cfg.replay.loss_coef, dict) and "horizon" in cfg.replay.loss_coef:
        schedule = {**cfg.replay.loss_coef, "horizon": steps}
        out.append(f"replay.loss_coef={json.dumps(schedule)}")
    return out


def _bookkeeping(seed: int, split: str, run_dir: Path, threads: int | None) -> list[str]:
    out = [
        f"trainer.seed={seed}",
        f"eval.split={split}",
        f"trainer.run_dir={run_dir}",
        "logging.progress=false",
    ]
    return out + ([f"trainer.num_threads={threads}"] if threads else [])


def _value_tag(key: str, value: str) -> str:
    return f"{key.rsplit('.', 1)[-1]}{value}".replace("/", "_")


def plan_runs(spec: CompareSpec, chosen: dict[str, str] | None = None) -> list[RunPlan]:
    """The sweep's runs (``chosen`` None) or the main runs (``chosen``: method -> value)."""
    threads = 1 if spec.jobs > 1 else None
    key, values = next(iter(spec.sweep.items())) if spec.sweep else (None, ())
    plans: list[RunPlan] = []
    for method in spec.methods:
        if chosen is None:
            for value in values if key is not None else ():
                for seed in spec.sweep_seeds:
                    d = spec.out / "sweep" / method / f"{_value_tag(str(key), value)}-s{seed}"
                    extra = [f"{key}={value}", *_bookkeeping(seed, "validation", d, threads)]
                    cfg = method_config(spec, method, extra)
                    plans.append(RunPlan("sweep", method, seed, value, d, cfg))
            continue
        picked = chosen.get(method)
        for seed in spec.seeds:
            d = spec.out / "runs" / method / f"s{seed}"
            extra = [f"{key}={picked}"] if key is not None and picked is not None else []
            cfg = method_config(spec, method, [*extra, *_bookkeeping(seed, "test", d, threads)])
            plans.append(RunPlan("main", method, seed, picked, d, cfg))
    return plans


# ------------------------------------------------------------------------------ running


def run_plan(plan: RunPlan) -> dict[str, Any]:
    """Train (or resume, or skip) one run; return its record (also its ``run.json``)."""
    from spear.checkpoint import latest_checkpoint
    from spear.metrics import read_metrics
    from spear.trainer import Trainer

    marker = plan.run_dir / "run.json"
    if marker.exists():
        return dict(json.loads(marker.read_text()))
    resume = plan.run_dir.exists() and latest_checkpoint(plan.run_dir) is not None
    if plan.run_dir.exists() and not resume:
        shutil.rmtree(plan.run_dir)  # killed before its first checkpoint: nothing to keep
    if not resume:
        plan.run_dir.mkdir(parents=True)
        (plan.run_dir / "config.yaml").write_text(config_to_yaml(plan.config))
    t0 = time.perf_counter()
    trainer = Trainer(plan.config, plan.run_dir, resume=resume)
    try:
        trainer.fit()
    finally:
        trainer.close()
    record = {
        "phase": plan.phase,
        "method": plan.method,
        "seed": plan.seed,
        "value": plan.value,
        "steps": plan.config.trainer.steps,
        "split": plan.config.eval.split,
        "wall_s": time.perf_counter() - t0,
        "resumed": resume,
        "rows": read_metrics(plan.run_dir / "metrics.jsonl"),
    }
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(marker)
    shutil.rmtree(plan.run_dir / "checkpoints", ignore_errors=True)  # done: keep metrics only
    return record


def execute(
    plans: Sequence[RunPlan], jobs: int, on_done: Callable[[RunPlan, dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """Run ``plans`` (``jobs`` at a time, each in its own process when ``jobs > 1``)."""
    records: list[dict[str, Any]] = []
    if jobs == 1:
        for plan in plans:
            records.append(run_plan(plan))
            on_done(plan, records[-1])
        return records
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_plan, p): p for p in plans}
        for fut in as_completed(futures):
            records.append(fut.result())
            on_done(futures[fut], records[-1])
    return records


def final_success(record: dict[str, Any]) -> float:
    """The run's last evaluation success (at its final step)."""
    rows = [r for r in record["rows"] if "eval/success" in r]
    return float(rows[-1]["eval/success"]) if rows else math.nan


def choose_values(spec: CompareSpec, sweep_records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Per method, the swept value with the highest mean final validation success (ties: the
    first listed value)."""
    ((_, values),) = spec.sweep.items()
    chosen: dict[str, str] = {}
    for method in spec.methods:
        best, best_score = values[0], -math.inf
        for value in values:
            scores = [
                final_success(r)
                for r in sweep_records
                if r["method"] == method and r["value"] == value
            ]
            score = sum(scores) / len(scores) if scores else -math.inf
            if score > best_score:
                best, best_score = value, score
        chosen[method] = best
    return chosen


def run_comparison(
    spec: CompareSpec, on_done: Callable[[RunPlan, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run the sweep (if any) and the main runs, then write the report; returns the summary."""
    from spear.compare_report import write_report

    spec.out.mkdir(parents=True, exist_ok=True)
    (spec.out / "compare.json").write_text(json.dumps(_spec_record(spec), indent=1))
    done = on_done or (lambda plan, record: None)
    sweep_records: list[dict[str, Any]] = []
    chosen: dict[str, str] = {}
    if spec.chosen:
        chosen = dict(spec.chosen)
        log.info("using the carried-over choices %s (no sweep)", chosen)
    elif spec.sweep:
        sweep_records = execute(plan_runs(spec), spec.jobs, done)
        chosen = choose_values(spec, sweep_records)
        log.info("sweep chose %s", chosen)
    main = plan_runs(spec, chosen)
    records = execute(main, spec.jobs, done)
    return write_report(spec, main, records, sweep_records, chosen)


def _spec_record(spec: CompareSpec) -> dict[str, Any]:
    out = asdict(spec)
    out["out"] = str(spec.out)
    out["sweep"] = {k: list(v) for k, v in spec.sweep.items()}
    return out
