"""The record of a run's resumes: ``<run_dir>/resumes.jsonl``, one row per ``--resume``.

Each row holds when the resume started, the step it continued from (None: no checkpoint yet)
and the ``section.key=value`` overrides it was given. A resume applies the overrides of every
earlier resume before its own, so a run continued with ``trainer.steps=20`` keeps 20 steps
when it is continued again without overrides. ``config.yaml`` stays the first run's config.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

RESUMES = "resumes.jsonl"


def resume_overrides(run_dir: Path) -> list[str]:
    """The overrides of all earlier resumes of ``run_dir``, oldest first."""
    path = run_dir / RESUMES
    if not path.exists():
        return []
    out: list[str] = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a row cut short by a killed process
            continue
        out.extend(str(o) for o in row.get("overrides", []))
    return out


def record_resume(run_dir: Path, overrides: Sequence[str], from_step: int | None) -> None:
    """Append this resume's row to ``run_dir/resumes.jsonl``."""
    row = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "from_step": from_step,
        "overrides": list(overrides),
    }
    with (run_dir / RESUMES).open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def latest_step(run_dir: Path) -> int | None:
    """The step of the checkpoint ``checkpoints/latest`` names, read from its name."""
    pointer = run_dir / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().removeprefix("step_"))
    except (OSError, ValueError):
        return None
