"""Ctrl-C during training: finish the step in flight, or discard it, never save half of it.

A training step changes the weights, the optimizer, the LR schedule and the replay buffer one
after the other, so a checkpoint written from the middle of a step would hold a state no
uninterrupted run ever had. :func:`finish_step_on_sigint` makes the first Ctrl-C (SIGINT) a
request: the step in flight finishes, its metrics row is written, a checkpoint is saved at that
step boundary and training stops. A second Ctrl-C raises :class:`KeyboardInterrupt` at once; the
trainer then discards the step in flight (nothing of it is saved) and the run resumes from its
last checkpoint. :class:`TrainingInterrupted` carries one line saying what was kept.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """Work stopped on Ctrl-C; ``kept`` says (one line) what is on disk and what is lost."""

    def __init__(self, kept: str) -> None:
        super().__init__(kept)
        self.kept = kept


class TrainingInterrupted(Interrupted):
    """Training stopped on Ctrl-C (see the module docstring)."""


@dataclass
class StopRequest:
    """Set by the first Ctrl-C inside :func:`finish_step_on_sigint`."""

    requested: bool = False


@contextmanager
def finish_step_on_sigint(what: str = "the step in flight") -> Iterator[StopRequest]:
    """Within the block the first SIGINT sets ``requested`` (and logs one line); the second
    raises :class:`KeyboardInterrupt` where the main thread is. Outside the main thread, where no
    signal handler can be installed, SIGINT keeps its usual behaviour."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        log.warning(
            "Ctrl-C: finishing %s, then saving a checkpoint (Ctrl-C again to stop now and lose it)",
            what,
        )

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
