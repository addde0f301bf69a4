"""The ``math`` task: competition problems solved with the ``code_interpreter`` tool (§8.4).

Problems and ground-truth answers come from local JSONL or Parquet files read with Hugging Face
``datasets`` (``load_dataset("json" | "parquet", data_files=...)``). Two column layouts work:

* verl's: ``prompt`` (a list of chat messages; the last ``user`` message is the problem) and
  ``reward_model`` (``{"ground_truth": ...}``), as in DAPO-Math-17k and the AIME parquet files;
* simple: ``problem`` or ``question``, and ``answer`` (or ``ground_truth`` / ``solution``).

Every prompt gets the reference's suffix :data:`ANSWER_SUFFIX`. ``test_files`` empty means the
held-out split is a fixed slice of the train files: a problem is held out when the SHA-256 of its
text falls in the held-out bucket, whatever the seed. Task ids are that hash, so they are stable
across runs and files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spear.envs.base import Env, Task, Tool
from spear.envs.sandbox import (
    DEFAULT_LIMITS,
    MATH_PREAMBLE,
    Backend,
    CodeInterpreter,
    LocalSandbox,
    SandboxFusionClient,
)
from spear.envs.symbolic import CheckLimits, SymbolicChecker
from spear.envs.tool_env import NATIVE_PARSER

if TYPE_CHECKING:
    from spear.config import Config

SPLITS = ("train", "test")
ANSWER_SUFFIX = "\nThe answer format must be: \\boxed{'The final answer goes here.'}"
SYSTEM_PROMPT = (
    "Solve the problem. You may call the code_interpreter tool to run Python code; put the final "
    "answer in \\boxed{}."
)
MAX_CALLS_PER_TURN = 1  # one tool call per assistant turn (§8.4)
SANDBOX_MARGIN_S = 0.5  # the sandbox's clock stops this much before the env's tool timeout
_PROBLEM_COLUMNS = ("problem", "question")
_ANSWER_COLUMNS = ("answer", "ground_truth", "solution")


class MathDataError(ValueError):
    """A data file cannot be read as math problems; the message names the file and columns."""


@dataclass(frozen=True, slots=True)
class MathParams:
    """Where the problems are and how the env runs its tool."""

    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    tool_timeout_s: float
    max_calls_per_turn: int
    max_observation_chars: int
    held_out_buckets: int  # without test files, 1 in this many train problems is held out
    sandbox: str  # "local" (LocalSandbox) or "fusion" (SandboxFusion HTTP at sandbox_url)
    sandbox_url: str | None
    sandbox_memory_mb: int
    sandbox_max_processes: int
    answer_check: CheckLimits  # symbolic answer checks
    sandbox_allow_unsafe: bool  # run code without isolation when none works here

    def __post_init__(self) -> None:
        if not self.train_files:
            raise ValueError("task.train_files must name at least one JSONL or Parquet file")
        if self.sandbox not in ("local", "fusion"):
            raise ValueError(f"sandbox must be 'local' or 'fusion', got {self.sandbox!r}")
        if self.sandbox == "fusion" and not self.sandbox_url:
            raise ValueError("sandbox='fusion' needs sandbox_url (the SandboxFusion server)")
        if not self.tool_timeout_s > 0:
            raise ValueError(f"tool_timeout_s must be > 0, got {self.tool_timeout_s}")
        if self.max_calls_per_turn < 1:
            raise ValueError(f"max_calls_per_turn must be >= 1, got {self.max_calls_per_turn}")
        if self.max_observation_chars < 1:
            raise ValueError(
                f"max_observation_chars must be >= 1, got {self.max_observation_chars}"
            )


def _format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "json"
    if suffix == ".parquet":
        return "parquet"
    raise MathDataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def _user_text(prompt: Any) -> str | None:
    """The problem text of a verl ``prompt``: the last user message (or a plain string)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1].get("content"), str):
            return str(users[-1]["content"])
    return None


def _ground_truth(row: dict[str, Any]) -> Any:
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and reward_model.get("ground_truth") is not None:
        return reward_model["ground_truth"]
    for column in _ANSWER_COLUMNS:
        if row.get(column) is not None:
            return row[column]
    return None


def _check_columns(path: str, columns: list[str]) -> None:
    has_problem = "prompt" in columns or any(c in columns for c in _PROBLEM_COLUMNS)
    has_answer = "reward_model" in columns or any(c in columns for c in _ANSWER_COLUMNS)
    if not (has_problem and has_answer):
        raise MathDataError(
            f"{path}: need a problem column ('prompt' (chat messages), 'problem' or 'question') "
            f"and an answer column ('reward_model' with 'ground_truth', or 'answer'); "
            f"found columns {sorted(columns)}"
        )


def _answer_text(value: Any) -> str:
    if isinstance(value, list | tuple) and len(value) == 1:
        value = value[0]
    return str(value).strip()


def load_problems(path: str) -> list[tuple[str, str]]:
    """``(problem, answer)`` pairs of one file, in file order; rows lacking either are errors."""
    from datasets import load_dataset

    if not Path(path).expanduser().is_file():
        raise MathDataError(f"{path}: no such file")
    try:
        data = load_dataset(_format(path), data_files=str(Path(path).expanduser()), split="train")
    except MathDataError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files
        raise MathDataError(f"{path}: cannot be read as {_format(path)}: {e}") from e
    _check_columns(path, list(data.column_names))
    problems: list[tuple[str, str]] = []
    for i, row in enumerate(data):
        text = _user_text(row.get("prompt")) if row.get("prompt") is not None else None
        text = text or next((row[c] for c in _PROBLEM_COLUMNS if isinstance(row.get(c), str)), None)
        truth = _ground_truth(row)
        if not text or truth is None or not _answer_text(truth):
            raise MathDataError(f"{path}: row {i} has no problem text or no ground-truth answer")
        problems.append((text.strip(), _answer_text(truth)))
    return problems


def problem_key(text: str) -> str:
    """The stable id of a problem: a SHA-256 prefix of its text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def held_out(text: str, buckets: int) -> bool:
    """Whether a train-file problem belongs to the held-out slice, 1 in ``buckets``
    (seed-independent)."""
    return int(problem_key(text), 16) % buckets == 0


def _to_task(text: str, answer: str, split: str, source: str) -> Task:
    meta = {"split": split, "source": source}
    return Task(
        task_id=f"math-{problem_key(text)}", prompt=text + ANSWER_SUFFIX, answer=answer, meta=meta
    )


class MathTasks:
    """The ``math`` :class:`~spear.envs.base.TaskSource` (see the module docstring)."""

    name = "math"

    def __init__(
        self, params: MathParams, tool: Tool | None = None, parser: str = NATIVE_PARSER
    ) -> None:
        self.params = params
        self.parser = parser  # a spear.rollout.parsers name: how make_env's env reads calls
        self._tool = tool
        self._pools: dict[str, list[Task]] = {}
        self.checker = SymbolicChecker(params.answer_check)  # shared by this source's envs

    @staticmethod
    def params_from_config(cfg: Config) -> MathParams:
        return MathParams(
            train_files=tuple(cfg.task.train_files),
            test_files=tuple(cfg.task.test_files),
            tool_timeout_s=cfg.rollout.tool_timeout_s,
            max_calls_per_turn=MAX_CALLS_PER_TURN,
            max_observation_chars=cfg.rollout.max_observation_chars,
            held_out_buckets=cfg.task.held_out_buckets,
            sandbox=cfg.task.sandbox,
            sandbox_url=cfg.task.sandbox_url,
            sandbox_memory_mb=cfg.task.sandbox_memory_mb,
            sandbox_max_processes=cfg.task.sandbox_max_processes,
            sandbox_allow_unsafe=cfg.task.sandbox_allow_unsafe,
            answer_check=CheckLimits(
                timeout_s=cfg.task.answer_check_timeout_s,
                memory_mb=cfg.task.answer_check_memory_mb,
            ),
        )

    @classmethod
    def from_config(cls, cfg: Config) -> MathTasks:
        return cls(cls.params_from_config(cfg), parser=cfg.rollout.parser or NATIVE_PARSER)

    def pool(self, split: str) -> list[Task]:
        """All tasks of ``split``, deduplicated by problem text, loaded once."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._pools:
            own_test = bool(self.params.test_files)
            files = (
                self.params.test_files if split == "test" and own_test else self.params.train_files
            )
            tasks: dict[str, Task] = {}
            for path in files:
                for text, answer in load_problems(path):
                    if not own_test and held_out(text, self.params.held_out_buckets) != (
                        split == "test"
                    ):
                        continue
                    task = _to_task(text, answer, split, path)
                    tasks.setdefault(task.task_id, task)
            if not tasks:
                raise MathDataError(f"no {split} problems in {list(files)}")
            self._pools[split] = list(tasks.values())
        return self._pools[split]

    def tasks(self, split: str, n: int, seed: int) -> list[Task]:
        """``n`` tasks of ``split`` drawn without replacement (cycling when ``n`` exceeds the
        pool), deterministic in ``seed``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        pool = self.pool(split)
        rng = random.Random(f"math:{split}:{seed}")
        out: list[Task] = []
        while len(out) < n:
            order = list(range(len(pool)))
            rng.shuffle(order)
            out.extend(pool[i] for i in order[: n - len(out)])
        return out

    def tools(self) -> list[Tool]:
        if self._tool is None:
            p = self.params
            wall = max(0.5, p.tool_timeout_s - SANDBOX_MARGIN_S)
            limits = dataclasses.replace(
                DEFAULT_LIMITS,
                wall_time_s=wall,
                cpu_time_s=wall,
                memory_mb=p.sandbox_memory_mb,
                max_processes=p.sandbox_max_processes,
            )
            backend: Backend = (
                SandboxFusionClient(p.sandbox_url, limits)
                if p.sandbox == "fusion" and p.sandbox_url is not None
                else LocalSandbox(limits, allow_unsafe=p.sandbox_allow_unsafe)
            )
            self._tool = CodeInterpreter(backend, preamble=MATH_PREAMBLE)
        return [self._tool]

    def make_env(self) -> Env:
        from spear.envs.answers import score_boxed_math
        from spear.envs.tool_env import ToolEnv
        from spear.rollout.parsers import PARSERS

        return ToolEnv(
            self.tools(),
            PARSERS.get(self.parser),
            functools.partial(score_boxed_math, checker=self.checker),
            system_prompt=SYSTEM_PROMPT,
            tool_timeout_s=self.params.tool_timeout_s,
            max_calls_per_turn=self.params.max_calls_per_turn,
            max_observation_chars=self.params.max_observation_chars,
        )
