"""What ``spear train`` shows while it runs: one console for progress bars and log lines.

On a terminal the setup (model load or warm-start build) and the training steps are live rich
progress bars with elapsed time and ETA, and log lines print above them through the same
console, so the two never overwrite each other. Anywhere else (a log file, ``tee``, CI) nothing
is redrawn: every update is one plain, complete line (no bar, no cut at the console width).

What a step's line shows depends on the task (:data:`PROGRESS_STYLES`): tool tasks show success
and tool calls; text games show wins and inadmissible actions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

StepCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True, slots=True)
class ProgressField:
    """One ``label value`` pair of a step's line: the first of ``keys`` present in the metrics."""

    label: str
    keys: tuple[str, ...]
    fmt: str = ".2f"

    def render(self, m: dict[str, float]) -> str | None:
        value = next((m[k] for k in self.keys if k in m), None)
        return None if value is None else f"{self.label} {value:{self.fmt}}"


@dataclass(frozen=True, slots=True)
class ProgressStyle:
    """The fields of a task family's step line and the name of its held-out metric."""

    fields: tuple[ProgressField, ...]
    heldout: str  # label of eval/success on the step line
    result: str = "held-out success"  # label of eval/success, before -> after, when a run ends


_REWARD = ProgressField("reward", ("reward/score", "train/outcome_reward"))
_ENTROPY = ProgressField("entropy", ("actor/entropy",), ".3f")
# samples that would pass recalibration: SIL runs once this exceeds replay/trigger_at (the buffer's
# size is not shown: it may exceed replay.capacity, which is a trigger unit, not a storage limit)
_REPLAY = ProgressField("sil-eligible", ("replay/eligible",), ".0f")

TOOL_TASK_STYLE = ProgressStyle(
    fields=(
        ProgressField("success", ("train/success",)),
        _REWARD,
        _ENTROPY,
        ProgressField("tools", ("train/tool_calls",)),
        _REPLAY,
    ),
    heldout="held-out",
)
GAME_STYLE = ProgressStyle(
    fields=(
        ProgressField("wins", ("train/success",)),
        _REWARD,
        _ENTROPY,
        ProgressField("inadmissible", ("train/invalid_actions",)),
        ProgressField("turns", ("train/turns",), ".1f"),
        _REPLAY,
    ),
    heldout="held-out wins",
    result="held-out win rate",
)

#: task name -> its step line; a task without an entry is a tool task (:data:`TOOL_TASK_STYLE`)
PROGRESS_STYLES: dict[str, ProgressStyle] = {"textworld": GAME_STYLE}


def progress_style(task_name: str) -> ProgressStyle:
    return PROGRESS_STYLES.get(task_name, TOOL_TASK_STYLE)


def step_info(m: dict[str, float], style: ProgressStyle, before: float | None) -> str:
    """The metrics part of a step's line; ``before`` is the step-0 held-out value, shown as
    ``held-out 0.20 -> 0.45`` once a later evaluation exists (alone before that)."""
    parts = [text for f in style.fields if (text := f.render(m)) is not None]
    now = m.get("eval/success")
    if before is not None and now is not None and parts:
        parts.append(f"{style.heldout} {before:.2f} -> {now:.2f}")
    elif before is not None:
        parts.append(f"{style.heldout} {before:.2f} (before training)")
    return "  ".join(parts)


def clock(seconds: float) -> str:
    """``H:MM:SS`` of a duration (``-:--:--`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "-:--:--"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def eta_seconds(done: int, total: int, elapsed: float, start: int = 0) -> float:
    """Seconds left at the mean pace so far of ``done - start`` units; inf before the first."""
    if done <= start:
        return math.inf
    return (total - done) * elapsed / (done - start)


class Pace:
    """The ETA of a loop measured from its first report on, so that what ran before it (games
    generated, demonstrations played, the evaluation before training) does not count as
    progress time. ``eta`` inf until a second report."""

    def __init__(self) -> None:
        self._first: tuple[int, float] | None = None  # (units done, time) at the first report

    def eta(self, done: int, total: int, now: float) -> float:
        """Seconds left at ``now`` (a ``time.perf_counter()`` reading) with ``done`` of ``total``."""
        if self._first is None:
            self._first = (done, now)
        start, since = self._first
        return eta_seconds(done, total, now - since, start=start)

    def elapsed(self, now: float) -> float:
        """Seconds from the first report to ``now`` (0 before it)."""
        return 0.0 if self._first is None else now - self._first[1]


class PlainLineHandler(logging.Handler):
    """Log records as plain complete lines through ``console`` (``WARNING: ...`` above INFO)."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if record.levelno > logging.INFO:
                msg = f"{record.levelname}: {msg}"
            self.console.print(escape(msg), soft_wrap=True, highlight=False, markup=True)
        except Exception:  # a logging handler never raises into the program
            self.handleError(record)


def log_handler(console: Console) -> logging.Handler:
    """Rich's handler on a terminal (it prints above live bars), plain lines elsewhere."""
    if console.is_terminal:
        return RichHandler(console=console, show_path=False, show_time=False)
    return PlainLineHandler(console)


class RunDisplay:
    """The setup phase and the training steps of one run on ``console``.

    ``live`` (default: the console is a terminal) draws rich progress bars; otherwise every
    update is a plain line. ``show_steps=False`` (``logging.progress: false``) shows no per-step
    output at all.
    """

    def __init__(
        self,
        console: Console,
        style: ProgressStyle,
        *,
        live: bool | None = None,
        show_steps: bool = True,
        plain_every: float = 0.1,
    ) -> None:
        self.console, self.style, self.show_steps = console, style, show_steps
        self.live = console.is_terminal if live is None else live
        self.plain_every = plain_every  # plain mode: a warm-start line every this share

    def _line(self, text: str) -> None:
        self.console.print(escape(text), soft_wrap=True, highlight=False)

    @contextmanager
    def preparing(self, text: str) -> Iterator[None]:
        """The block that loads or builds the model; a warm-start build inside it gets a
        progress bar (live) or a line every ``plain_every`` of its steps (plain)."""
        from spear.models.warmstart import report_build_progress  # torch: only when training

        if not self.live:
            self._line(text)
            with report_build_progress(self._plain_build_report()):
                yield
            return
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        ) as progress:
            progress.add_task(text, total=None, info="")
            bar: list[TaskID] = []

            def report(done: int, total: int, loss: float) -> None:
                if not bar:
                    bar.append(progress.add_task("warm start", total=total, info=""))
                progress.update(bar[0], completed=done, info=f"{done}/{total}  loss {loss:.3f}")

            with report_build_progress(report):
                yield

    def _plain_build_report(self) -> Callable[[int, int, float], None]:
        pace = Pace()

        def report(done: int, total: int, loss: float) -> None:
            now = time.perf_counter()
            eta = pace.eta(done, total, now)
            every = max(1, round(total * self.plain_every))
            if done % every and done != total:
                return
            self._line(
                f"warm start {done}/{total}  loss {loss:.3f}  elapsed {clock(pace.elapsed(now))}  "
                f"eta {clock(eta)}"
            )

        return report

    @contextmanager
    def training(
        self, total: int, completed: int, before: float | None = None
    ) -> Iterator[StepCallback]:
        """The training loop; yields the ``on_step(step, metrics)`` callback of ``fit`` (step 0
        is the evaluation before training; ``before`` is its held-out value when the run
        resumes and has no step 0)."""
        before_: list[float] = [] if before is None else [before]
        latest: dict[str, float] = {}  # the last held-out value, shown until the next one

        def info(step: int, m: dict[str, float]) -> str:
            if step == 0 and "eval/success" in m:
                before_[:] = [m["eval/success"]]
            elif "eval/success" in m:
                latest["eval/success"] = m["eval/success"]
            return step_info({**m, **latest}, self.style, before_[0] if before_ else None)

        if not self.show_steps:
            yield lambda step, m: None
        elif self.live:
            with Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            ) as progress:
                bar = progress.add_task(
                    "train", total=total, completed=completed, info="evaluating..."
                )
                yield lambda step, m: progress.update(bar, completed=step, info=info(step, m))
        else:
            start = time.perf_counter()
            pace = Pace()

            def plain(step: int, m: dict[str, float]) -> None:
                now = time.perf_counter()
                eta, elapsed = pace.eta(step, total, now), now - start
                self._line(
                    f"step {step}/{total}  {info(step, m)}  elapsed {clock(elapsed)}  "
                    f"eta {clock(eta)}"
                )

            yield plain
