"""Command line: ``spear train | eval | plot | config | compare``."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from spear import __version__
from spear.config import (
    DEFAULT_RUN_CONFIG,
    Config,
    ConfigError,
    config_differences,
    config_to_yaml,
    load_config,
    preset_names,
    run_config_names,
    run_config_path,
    unknown_config_error,
)
from spear.resume import latest_step, record_resume, resume_overrides

if TYPE_CHECKING:
    from spear.display import RunDisplay
    from spear.trainer import Trainer

# One console for the live display and the log lines (they print above the bars, never into
# them); errors go to stderr, so piped results stay clean. Messages are never wrapped or cut at
# the console's width (soft_wrap): in a log file every line is whole.
console = Console(stderr=False, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("spear")


def _setup_logging(verbose: bool) -> None:
    """spear's own INFO lines (DEBUG with -v) on the shared console; other libraries' only from
    WARNING up (matplotlib's "generated new fontManager", transformers' notes)."""
    from spear.display import log_handler

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = log_handler(console)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would break the live display


def _run_dir(cfg_run_dir: str | None, preset: str | None) -> Path:
    if cfg_run_dir:
        return Path(cfg_run_dir)
    return Path("runs") / f"{preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"


def _fail(msg: str) -> int:
    err_console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)  # one line, as written
    return 2


def _open_run(args: argparse.Namespace) -> tuple[Path, Config] | int:
    """The run directory and config of ``spear train``: a new run (its directory made and its
    config written) or the run ``--resume`` names; an exit code when there is nothing to run."""
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            return _fail(f"--resume {run_dir}: no config.yaml there; is it a spear run directory?")
        earlier = resume_overrides(run_dir)  # each resume's overrides apply to the later ones
        cfg = load_config(file=run_dir / "config.yaml", overrides=[*earlier, *args.overrides])
        done = _completed_step(run_dir, cfg.trainer.steps)
        if done is not None:  # nothing to train: say so, show the result, write nothing
            from spear.display import progress_style

            console.print(
                f"run {run_dir} is complete (step {done}, trainer.steps={cfg.trainer.steps}); "
                "nothing to train"
            )
            _print_result(run_dir, progress_style(cfg.task.name).result, plot=False)
            return 0
        return run_dir, cfg
    if args.config and not run_config_path(args.config).exists():
        raise unknown_config_error(args.config, shows=False)
    file = (
        run_config_path(args.config)
        if args.config
        else (None if args.preset else DEFAULT_RUN_CONFIG)
    )
    cfg = load_config(preset=args.preset, file=file, overrides=args.overrides)
    run_dir = _run_dir(cfg.trainer.run_dir, cfg.preset)
    if run_dir.exists():
        return _fail(
            f"run directory {run_dir} exists; continue it with `spear train --resume {run_dir}` or set trainer.run_dir=<new dir>"
        )
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    return run_dir, cfg


def _build_trainer(cfg: Config, run_dir: Path, resume: bool, display: RunDisplay) -> Trainer | int:
    """The trainer (model built, warm start run or read from its cache, checkpoint restored),
    or 130 after a Ctrl-C, which keeps no directory of a new run (a long warm start keeps its
    progress in the model cache)."""
    from spear.build import describe_model
    from spear.interrupts import Interrupted
    from spear.trainer import Trainer

    try:
        with display.preparing(describe_model(cfg)):
            return Trainer(cfg, run_dir, resume=resume)
    except BaseException as e:
        if not resume:  # a run that never started leaves no directory behind
            shutil.rmtree(run_dir, ignore_errors=True)
        if not isinstance(e, KeyboardInterrupt):
            raise
        built = e.kept if isinstance(e, Interrupted) else "nothing of the build was kept"
    kept = "the run is as it was" if resume else "no run directory was kept"
    console.print(f"[yellow]interrupted[/] while building the model: {escape(built)}; {kept}")
    return 130


def _first_before(run_dir: Path) -> float | None:
    """The step-0 held-out success of a run directory's metrics (for a resumed run's display)."""
    from spear.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.exists() else []
    return next((r["eval/success"] for r in rows if r.get("eval/success") is not None), None)


def cmd_train(args: argparse.Namespace) -> int:
    from spear.display import RunDisplay, progress_style
    from spear.interrupts import TrainingInterrupted

    opened = _open_run(args)
    if isinstance(opened, int):
        return opened
    run_dir, cfg = opened
    console.print(
        f"[bold]spear[/] training [cyan]{cfg.preset or 'custom'}[/] on task [cyan]{cfg.task.name}[/] for {cfg.trainer.steps} steps -> {run_dir}"
    )
    display = RunDisplay(console, progress_style(cfg.task.name), show_steps=cfg.logging.progress)
    trainer = _build_trainer(cfg, run_dir, bool(args.resume), display)
    if isinstance(trainer, int):
        return trainer
    if args.resume:
        record_resume(run_dir, args.overrides, latest_step(run_dir))
    before = _first_before(run_dir) if args.resume else None
    with display.training(cfg.trainer.steps, trainer.step, before) as on_step:
        try:
            trainer.fit(on_step=on_step)
        except KeyboardInterrupt as e:
            kept = e.kept if isinstance(e, TrainingInterrupted) else "stopped"
            console.print(
                f"[yellow]interrupted[/]: {escape(kept)}; continue with `spear train --resume {run_dir}`"
            )
            trainer.close()
            return 130
    trainer.close()
    try:
        _print_result(run_dir, progress_style(cfg.task.name).result, plot=True)
    except KeyboardInterrupt:  # training is over and saved: nothing is lost
        console.print(
            f"[yellow]interrupted[/] while plotting; the run is complete and saved "
            f"(`spear plot {run_dir}` draws the curves)"
        )
    return 0


def _completed_step(run_dir: Path, steps: int) -> int | None:
    """The step of ``run_dir``'s latest checkpoint when it ends the run (nothing left to train
    or evaluate for ``trainer.steps=steps``), else None."""
    from spear.checkpoint import checkpoint_progress, latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    progress = checkpoint_progress(ckpt)
    return progress.step if progress.step >= steps and not progress.row_pending else None


def _print_result(run_dir: Path, label: str, *, plot: bool) -> None:
    """``label`` (held-out success, or a text game's win rate) before -> after (the first and
    last evaluation rows), and where the run's files are; ``plot`` also (re)writes the curves."""
    from spear.metrics import read_metrics
    from spear.plot import plot_run

    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r["eval/success"] for r in rows if r.get("eval/success") is not None]
    plots = plot_run(run_dir) if plot else run_dir / "plots" / "curves.png"
    if len(evals) >= 2:
        before, after = evals[0], evals[-1]
        console.print(
            f"{label}: [bold]{before:.1%}[/] -> [bold green]{after:.1%}[/] ({(after - before) * 100:+.1f} points)"
        )
    console.print(f"run directory: {run_dir}\nplots: {plots}\nmetrics: {run_dir / 'metrics.jsonl'}")


def cmd_eval(args: argparse.Namespace) -> int:
    from spear.evaluate import evaluate_checkpoint

    res = evaluate_checkpoint(Path(args.checkpoint), overrides=args.overrides)
    console.print(f"checkpoint {escape(str(res.checkpoint))} (step {res.step})")
    for k, v in res.metrics.items():
        console.print(f"{k:32s} {v:.4f}")
    console.print(f"metrics appended to {escape(str(res.metrics_file))}")
    console.print(f"results: {escape(str(res.results_file))}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from spear.plot import plot_run

    console.print(f"wrote {plot_run(Path(args.run_dir))}")
    return 0


def _show_header(name: str, cfg: Config) -> str:
    """YAML comment lines above ``spear config show NAME``: what runs this config, and for the
    default run's preset, how ``spear train`` with no arguments differs from it."""
    if name in run_config_names():
        how = "`spear train` with no arguments" if name == "default" else f"`spear train {name}`"
        lines = [f"{how} runs this: the {cfg.preset} preset + spear/configs/{name}.yaml"]
    else:
        lines = [f"`spear train --preset {name}` runs this: the {name} preset on spear's defaults"]
        default = load_config(file=DEFAULT_RUN_CONFIG)
        if name == default.preset:
            lines.append(
                "note: `spear train` with no arguments runs `default` (this preset + "
                "spear/configs/default.yaml; `spear config show default`), which differs in:"
            )
            lines += [f"  {k}: {a} -> {b}" for k, a, b in config_differences(cfg, default)]
    return "".join(f"# {line}\n" for line in lines)


def cmd_config(args: argparse.Namespace) -> int:
    if args.name == "list":
        console.print("\n".join([*run_config_names(), *preset_names()]))
        return 0
    if args.name in run_config_names():  # a shipped run config: default, textworld
        cfg = load_config(file=run_config_path(args.name), overrides=args.overrides)
    elif args.name in preset_names():
        cfg = load_config(preset=args.name, overrides=args.overrides)
    else:
        raise unknown_config_error(args.name, shows=True)
    sys.stdout.write(_show_header(args.name, cfg) + config_to_yaml(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spear", description="Train tool-using multi-turn LLM agents with the SPEAR recipe."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"spear {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train (no arguments: SPEAR on the built-in tool task, CPU, minutes)",
        description="Train. Layers: defaults <- --preset <- CONFIG file <- section.key=value overrides.",
    )
    t.add_argument(
        "config",
        nargs="?",
        help="YAML config file or a shipped run config name (default, textworld); default: the embedded default run",
    )
    t.add_argument(
        "overrides", nargs="*", help="section.key=value, e.g. trainer.steps=10 optim.lr=1e-5"
    )
    t.add_argument("--preset", choices=preset_names(), help="algorithm preset")
    t.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint"
    )
    t.set_defaults(func=cmd_train)
    e = sub.add_parser(
        "eval",
        help="held-out evaluation of a checkpoint (metrics appended to <checkpoint>/eval/metrics.jsonl)",
    )
    e.add_argument(
        "checkpoint",
        help="a run directory or its checkpoints/latest (the latest checkpoint), or a checkpoints/step_XXXXXX directory",
    )
    e.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.num_tasks=500")
    e.set_defaults(func=cmd_eval)
    pl = sub.add_parser("plot", help="write PNG curves of a run directory")
    pl.add_argument("run_dir")
    pl.set_defaults(func=cmd_plot)
    c = sub.add_parser(
        "config",
        help="show a resolved config: `spear config show PRESET|default`, `spear config show list`",
    )
    c.add_argument("action", choices=["show"])
    c.add_argument(
        "name", help="a preset name, a shipped run config (default, textworld) or 'list'"
    )
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=cmd_config)
    from spear.cli_compare import add_compare_parser

    add_compare_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    # A first positional that looks like an override belongs to the overrides.
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *args.overrides]
        args.config = None
    try:
        return int(args.func(args))
    except ConfigError as e:
        return _fail(str(e))
    except (OSError, RuntimeError) as e:  # e.g. a config path that is a directory
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == "__main__":
    sys.exit(main())
