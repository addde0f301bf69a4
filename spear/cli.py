"""Command line: ``spear train | eval | plot | config``."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from spear.config import (
    DEFAULT_RUN_CONFIG,
    ConfigError,
    config_to_yaml,
    load_config,
    preset_names,
    run_config_names,
    run_config_path,
)

# piped output (a log file, CI) gets a wide line instead of rich's 80 columns, so the progress line is whole
console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)  # errors go to stderr, so piped results stay clean
log = logging.getLogger("spear")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)],
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would break the live display


def _run_dir(cfg_run_dir: str | None, preset: str | None) -> Path:
    if cfg_run_dir:
        return Path(cfg_run_dir)
    return Path("runs") / f"{preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"


def _fail(msg: str) -> int:
    err_console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)  # one line, as written
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    from spear.trainer import Trainer

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            return _fail(f"--resume {run_dir}: no config.yaml there; is it a spear run directory?")
        cfg = load_config(file=run_dir / "config.yaml", overrides=args.overrides)
    else:
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
    console.print(
        f"[bold]spear[/] training [cyan]{cfg.preset or 'custom'}[/] on task [cyan]{cfg.task.name}[/] for {cfg.trainer.steps} steps -> {run_dir}"
    )
    try:
        with console.status(
            "building the model (first run: tokenizer, tiny model and warm start, cached)..."
        ):
            trainer = Trainer(cfg, run_dir, resume=bool(args.resume))
    except BaseException:
        if not args.resume:  # a run that never started leaves no directory behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    progress = Progress(
        TextColumn("[bold]step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not cfg.logging.progress,
    )
    with progress:
        bar = progress.add_task(
            "train", total=cfg.trainer.steps, completed=trainer.step, info="evaluating..."
        )

        def on_step(step: int, m: dict[str, float]) -> None:
            info = (
                f"success {m.get('train/success', 0):.2f}  reward {m.get('reward/score', m.get('train/outcome_reward', 0)):.2f}  "
                f"entropy {m.get('actor/entropy', float('nan')):.3f}  tools {m.get('train/tool_calls', 0):.2f}  "
                f"replay {m.get('replay/size', 0):.0f}"
            )
            if "eval/success" in m:
                info += f"  held-out {m['eval/success']:.2f}"
            progress.update(bar, completed=step, info=info)

        try:
            final = trainer.fit(on_step=on_step)
        except KeyboardInterrupt:
            console.print(
                f"[yellow]interrupted[/]: checkpoint written; continue with `spear train --resume {run_dir}`"
            )
            trainer.close()
            return 130
    trainer.close()
    _print_result(run_dir, final)
    return 0


def _print_result(run_dir: Path, final: dict[str, float]) -> None:
    """Held-out success before -> after, and where the run's files are."""
    from spear.metrics import read_metrics
    from spear.plot import plot_run

    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r["eval/success"] for r in rows if r.get("eval/success") is not None]
    before = evals[0] if evals else None
    plot = plot_run(run_dir)
    after = final.get("eval/success")
    if before is not None and after is not None:
        console.print(
            f"held-out success: [bold]{before:.1%}[/] -> [bold green]{after:.1%}[/] ({(after - before) * 100:+.1f} points)"
        )
    console.print(f"run directory: {run_dir}\nplots: {plot}\nmetrics: {run_dir / 'metrics.jsonl'}")


def cmd_eval(args: argparse.Namespace) -> int:
    from spear.evaluate import evaluate_checkpoint

    ckpt = Path(args.checkpoint)
    m = evaluate_checkpoint(ckpt, overrides=args.overrides)
    for k, v in m.items():
        console.print(f"{k:32s} {v:.4f}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from spear.plot import plot_run

    console.print(f"wrote {plot_run(Path(args.run_dir))}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.name == "list":
        console.print("\n".join([*run_config_names(), *preset_names()]))
        return 0
    if args.name in run_config_names():  # a shipped run config: default, textworld
        cfg = load_config(file=run_config_path(args.name), overrides=args.overrides)
    else:
        cfg = load_config(preset=args.name, overrides=args.overrides)
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spear", description="Train tool-using multi-turn LLM agents with the SPEAR recipe."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    e = sub.add_parser("eval", help="held-out evaluation of a checkpoint directory")
    e.add_argument("checkpoint", help="a checkpoints/step_XXXXXX directory of a run")
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
