"""A task from data plus Python functions: :class:`FunctionTask`.

.. code-block:: python

    task = FunctionTask(
        name="shop",
        data="shop.jsonl",                    # JSONL / JSON / Parquet / CSV, or a datasets.Dataset
        tools=[lookup_price, calculator],     # plain functions (or Tool objects)
        rewards={"correct": correct_answer, "used_both": used_both_tools},
        reward_weights={"correct": 1.0, "used_both": 0.2},
        system_prompt="Use the tools. Answer as \\\\boxed{n}.",
    )

Rows: the prompt comes from ``prompt_column`` (or ``prompt_template.format(**row)``), the ground
truth from ``answer_column`` (optional), a stable id from ``id_column`` (default: a hash of the
prompt); every other column lands in ``Task.meta``.

Splits: ``test_data`` (a second data source), else ``split_column`` (rows whose value is in
``test_values`` are held out), else a fixed ``held_out_fraction`` of rows chosen by the SHA-256
of the task id, so train and test never share a row whatever the seed.

Rewards: each reward function is ``(task, episode) -> float`` with ``episode`` an
:class:`EpisodeTrace` (the conversation, the final response and its ``\\boxed{}`` answer, and a
:class:`~spear.envs.tool_env.CallRecord` per tool call). The episode's reward is the weighted sum;
each term is reported in ``info["reward_terms"]`` and logged as ``train/reward_<name>`` /
``eval/reward_<name>``. ``success`` defaults to "the boxed answer matches the answer column"
(numbers compare exactly, text after normalisation), or a positive reward without an answer
column. Rewards are computed when the model answers (a turn without a tool call); an episode cut
off by ``rollout.max_turns`` or the token budget gets 0.

Episodes are multi-turn: the env is a :class:`~spear.envs.tool_env.ToolEnv`, parsing tool calls
with the registered parser ``parser`` (``hermes``, ``action``, ``python``) like the built-in
tasks. ``demonstration(task) -> [assistant turn texts]`` (a scripted correct solution) lets the
built-in tiny model warm start on the task (:mod:`spear.models.warmstart`).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spear.envs.answers import Score, answers_match, extract_boxed
from spear.envs.base import Env, StepResult, Task, Tool
from spear.envs.function_tool import as_tools
from spear.envs.tool_env import CallRecord, ToolEnv
from spear.rollout.parsers import PARSERS
from spear.types import Message

if TYPE_CHECKING:
    from spear.config import Config

SPLITS = ("train", "test")
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class TaskDataError(ValueError):
    """The task's data or definition is unusable; the message names the file, column or row."""


@dataclass(frozen=True, slots=True)
class EpisodeTrace:
    """What a reward function sees of one finished episode."""

    messages: tuple[Message, ...]  # system, user, assistant and tool messages in order
    final_response: str  # the model's last turn (its answer)
    final_answer: str | None  # the last ``\\boxed{}`` of it, or None
    calls: tuple[CallRecord, ...]  # every attempted tool call
    turns: int  # assistant turns, the answer included

    @property
    def tools_used(self) -> set[str]:
        """Names of the tools that ran and returned at least once."""
        return {c.name for c in self.calls if c.ok}


RewardFn = Callable[[Task, EpisodeTrace], float]
SuccessFn = Callable[[Task, EpisodeTrace], bool]
Demonstration = Callable[[Task], Sequence[str]]


def correct_answer(task: Task, episode: EpisodeTrace) -> float:
    """1.0 when the boxed answer matches ``task.answer`` (numerically or normalised), else 0."""
    if episode.final_answer is None or task.answer is None:
        return 0.0
    return 1.0 if answers_match(episode.final_answer, str(task.answer)) else 0.0


# ----------------------------------------------------------------------------------------------
# Data


def load_rows(data: Any) -> list[dict[str, Any]]:
    """Rows of ``data``: a path or list of paths (``.jsonl`` / ``.json`` / ``.parquet`` /
    ``.csv``, read with ``datasets``), a ``datasets.Dataset``, or a list of dicts."""
    if isinstance(data, str | Path):
        data = [data]
    if hasattr(data, "to_list") and hasattr(data, "column_names"):  # a datasets.Dataset
        return [dict(r) for r in data.to_list()]
    if isinstance(data, Sequence) and all(isinstance(r, Mapping) for r in data):
        return [dict(r) for r in data]
    if not (isinstance(data, Sequence) and all(isinstance(p, str | Path) for p in data)):
        raise TaskDataError(
            f"data must be file path(s), a datasets.Dataset or a list of dicts, got {type(data).__name__}"
        )
    rows: list[dict[str, Any]] = []
    for path in map(str, data):
        fmt = _FORMATS.get(Path(path).suffix.lower())
        if fmt is None:
            raise TaskDataError(f"{path}: unsupported file type; use {', '.join(_FORMATS)}")
        if not Path(path).is_file():
            raise TaskDataError(f"{path}: no such file")
        rows.extend(_read_file(path, fmt))
    return rows


def _read_file(path: str, fmt: str) -> list[dict[str, Any]]:
    from datasets import load_dataset
    from datasets.utils import logging as ds_logging

    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # no "Generating train split" bar in the run's output
    try:
        ds = load_dataset(fmt, data_files=path, split="train")
    except Exception as e:
        raise TaskDataError(f"{path}: cannot read it as {fmt}: {e}") from None
    finally:
        if bars:
            ds_logging.enable_progress_bar()
    return [dict(r) for r in ds.to_list()]


@dataclass(frozen=True, slots=True)
class RowFormat:
    """How rows become tasks (see the module docstring)."""

    prompt_column: str
    prompt_template: str | None
    answer_column: str | None
    id_column: str | None
    name: str

    def task(self, row: dict[str, Any], where: str) -> Task:
        if self.prompt_template is not None:
            try:
                prompt = self.prompt_template.format(**row)
            except (KeyError, IndexError, ValueError) as e:
                raise TaskDataError(f"{where}: prompt_template cannot be filled: {e!r}") from None
        elif self.prompt_column in row:
            prompt = str(row[self.prompt_column])
        else:
            raise TaskDataError(
                f"{where}: no column {self.prompt_column!r} (columns: {', '.join(row)}); set "
                "prompt_column or prompt_template"
            )
        answer = row.get(self.answer_column) if self.answer_column else None
        if self.id_column is not None and row.get(self.id_column) is not None:
            task_id = str(row[self.id_column])
        else:
            task_id = f"{self.name}-{hashlib.sha256(prompt.encode()).hexdigest()[:12]}"
        skip = {self.prompt_column, self.answer_column, self.id_column}
        meta = {k: v for k, v in row.items() if k not in skip}
        return Task(task_id, prompt, None if answer is None else str(answer), meta)


def held_out(task_id: str, fraction: float) -> bool:
    """Whether ``task_id`` belongs to the held-out split: the first 8 bytes of its SHA-256, as a
    fraction of 2**64, fall below ``fraction``."""
    digest = hashlib.sha256(task_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _named_rewards(
    rewards: RewardFn | Sequence[RewardFn] | Mapping[str, RewardFn],
    weights: Sequence[float] | Mapping[str, float] | None,
) -> tuple[tuple[str, RewardFn, float], ...]:
    if callable(rewards):
        rewards = [rewards]
    if isinstance(rewards, Mapping):
        named = list(rewards.items())
    else:
        named = [(getattr(fn, "__name__", f"reward_{i}"), fn) for i, fn in enumerate(rewards)]
    names = [n for n, _ in named]
    if not named or len(set(names)) != len(names):
        raise TaskDataError(f"rewards need at least one function and distinct names, got {names}")
    if weights is None:
        ws = [1.0] * len(named)
    elif isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise TaskDataError(f"reward_weights names {unknown}, not among the rewards {names}")
        ws = [float(weights.get(n, 1.0)) for n in names]
    else:
        ws = [float(w) for w in weights]
        if len(ws) != len(named):
            raise TaskDataError(f"{len(ws)} reward_weights for {len(named)} reward functions")
    if not all(math.isfinite(w) for w in ws):
        raise TaskDataError(f"reward_weights must be finite, got {ws}")
    return tuple((n, fn, w) for (n, fn), w in zip(named, ws))


# ----------------------------------------------------------------------------------------------
# Env


class RewardFunctionError(RuntimeError):
    """A reward or success function raised or returned a non-number (the episode fails)."""


class FunctionTaskEnv(ToolEnv):
    """A :class:`ToolEnv` whose final answer is scored by the task's reward functions."""

    def __init__(self, source: FunctionTask) -> None:
        super().__init__(
            source.tools(),
            PARSERS.get(source.parser),
            self._score,
            system_prompt=source.system_prompt,
            tool_timeout_s=source.tool_timeout_s,
            max_calls_per_turn=source.max_calls_per_turn,
            max_observation_chars=source.max_observation_chars,
        )
        self.source = source
        self._messages: list[Message] = []
        self._terms: dict[str, float] = {}

    def reset(self, task: Task, *, seed: int | None = None) -> tuple[list[Message], dict[str, Any]]:
        messages, info = super().reset(task, seed=seed)
        self._messages, self._terms = list(messages), {}
        return messages, info

    def step(self, action_text: str) -> StepResult:
        self._messages.append({"role": "assistant", "content": action_text})
        result = super().step(action_text)
        self._messages.extend(result.messages)
        if result.terminated:
            result.info["reward_terms"] = dict(self._terms)
        return result

    def _score(self, text: str, task: Task) -> Score:
        trace = EpisodeTrace(
            messages=tuple(self._messages),
            final_response=text,
            final_answer=extract_boxed(text),
            calls=tuple(self.calls),
            turns=sum(m.get("role") == "assistant" for m in self._messages),
        )
        total, self._terms = 0.0, {}
        for name, fn, weight in self.source.rewards:
            value = _call_user(fn, task, trace, f"reward function {name!r}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RewardFunctionError(
                    f"reward function {name!r} returned {type(value).__name__}, not a float"
                )
            self._terms[name] = float(value)
            total += weight * float(value)
        if self.source.success_fn is not None:
            ok = bool(_call_user(self.source.success_fn, task, trace, "the success function"))
        else:  # default: a right answer, or a positive reward when there is no answer
            ok = correct_answer(task, trace) > 0 if task.answer is not None else total > 0
        return Score(total, ok, trace.final_answer)


def _call_user(fn: Callable[..., Any], task: Task, trace: EpisodeTrace, what: str) -> Any:
    try:
        return fn(task, trace)
    except Exception as e:
        raise RewardFunctionError(f"{what} raised {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Task source


class FunctionTask:
    """A :class:`~spear.envs.base.TaskSource` from data plus functions (module docstring).

    ``config``: when given, the run's ``rollout.tool_timeout_s``, ``rollout.max_observation_chars``
    and (when set) ``rollout.parser`` replace ``tool_timeout_s``, ``max_observation_chars`` and
    ``parser``.
    """

    def __init__(
        self,
        *,
        name: str,
        data: Any,
        tools: Sequence[Tool | Callable[..., Any]],
        rewards: RewardFn | Sequence[RewardFn] | Mapping[str, RewardFn] = correct_answer,
        reward_weights: Sequence[float] | Mapping[str, float] | None = None,
        success: SuccessFn | None = None,
        system_prompt: str | None = None,
        prompt_column: str = "prompt",
        prompt_template: str | None = None,
        answer_column: str | None = "answer",
        id_column: str | None = None,
        test_data: Any = None,
        split_column: str | None = None,
        test_values: Sequence[str] = ("test",),
        held_out_fraction: float = 0.1,
        parser: str = "hermes",
        demonstration: Demonstration | None = None,
        max_calls_per_turn: int = 1,
        tool_timeout_s: float = 5.0,
        max_observation_chars: int = 512,
        config: Config | None = None,
    ) -> None:
        if config is not None:  # the run's settings win
            parser = config.rollout.parser or parser
            tool_timeout_s = config.rollout.tool_timeout_s
            max_observation_chars = config.rollout.max_observation_chars
        PARSERS.get(parser)  # an unknown parser is an error now, naming the known ones
        if not 0 < held_out_fraction < 1:
            raise TaskDataError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
        if max_calls_per_turn < 1:
            raise TaskDataError(f"max_calls_per_turn must be >= 1, got {max_calls_per_turn}")
        self.name, self.parser, self.system_prompt = name, parser, system_prompt
        self._tools = as_tools(tools)
        self.rewards = _named_rewards(rewards, reward_weights)
        self.success_fn = success
        self.demonstration = demonstration
        self.max_calls_per_turn, self.tool_timeout_s = max_calls_per_turn, tool_timeout_s
        self.max_observation_chars = max_observation_chars
        fmt = RowFormat(prompt_column, prompt_template, answer_column, id_column, name)
        self._pools = _split_pools(
            fmt, load_rows(data), None if test_data is None else load_rows(test_data),
            split_column, tuple(test_values), held_out_fraction,
        )  # fmt: skip

    def pool(self, split: str) -> list[Task]:
        """Every task of ``split``, in data order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._pools[split]

    def tasks(self, split: str, n: int, seed: int) -> list[Task]:
        """``n`` tasks of ``split`` drawn without replacement, deterministic in ``seed``; the
        train split cycles when ``n`` exceeds it, the test split gives at most all its tasks
        (each once, so held-out metrics never count a task twice)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        pool = self.pool(split)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        n = min(n, len(pool)) if split == "test" else n
        out: list[Task] = []
        while len(out) < n:
            order = list(range(len(pool)))
            rng.shuffle(order)
            out.extend(pool[i] for i in order[: n - len(out)])
        return out

    def tools(self) -> list[Tool]:
        return list(self._tools)

    def make_env(self) -> Env:
        return FunctionTaskEnv(self)

    def __repr__(self) -> str:
        sizes = {s: len(p) for s, p in self._pools.items()}
        return f"FunctionTask({self.name!r}, tools={[t.name for t in self._tools]}, {sizes})"


def _split_pools(
    fmt: RowFormat,
    rows: list[dict[str, Any]],
    test_rows: list[dict[str, Any]] | None,
    split_column: str | None,
    test_values: tuple[str, ...],
    fraction: float,
) -> dict[str, list[Task]]:
    pools: dict[str, list[Task]] = {"train": [], "test": []}
    for i, row in enumerate(rows):
        task = fmt.task(row, f"{fmt.name} row {i}")
        if test_rows is not None:
            split = "train"
        elif split_column is not None:
            if split_column not in row:
                raise TaskDataError(f"{fmt.name} row {i}: no split column {split_column!r}")
            split = "test" if str(row[split_column]) in test_values else "train"
        else:
            split = "test" if held_out(task.task_id, fraction) else "train"
        pools[split].append(task)
    for i, row in enumerate(test_rows or []):
        pools["test"].append(fmt.task(row, f"{fmt.name} test row {i}"))
    for split, pool in pools.items():
        if not pool:
            raise TaskDataError(f"task {fmt.name!r} has no {split} rows ({len(rows)} rows in all)")
    return pools
