"""Scalar schedules of the training step: small frozen objects, ``schedule(step) -> float``.

Used for the SIL loss weight lambda(t) (cosine-up, reference §3) and the intrinsic tool-reward
factor phi(t) (cosine-down, reference §6). ``t`` is the global training step (the first
training step is 1; step 0 is "before training" and is accepted).

- ``constant(value)``: ``value`` for every step.
- ``linear(start, end, horizon)``: ``start + (end - start) * t / T`` for ``t <= T``, then ``end``.
- ``cosine_up(value, horizon)``: ``value * (1 - cos(pi t / T)) / 2`` for ``t <= T``, then ``value``.
- ``cosine_down(value, horizon)``: ``value * (1 + cos(pi t / T)) / 2`` for ``t <= T``, then ``0``.

:func:`schedule_from_spec` builds one from a config value: a number means ``constant``; a mapping
has ``kind`` plus exactly that kind's fields, e.g. ``{"kind": "cosine_up", "value": 1.0,
"horizon": 200}``. Bad specs raise :class:`ScheduleSpecError` naming the offending field.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from spear.registry import Registry, UnknownNameError


class ScheduleSpecError(ValueError):
    """A schedule specification (or schedule argument) is invalid; the message names the field."""


class UnknownScheduleError(UnknownNameError, ScheduleSpecError):
    """An unknown schedule ``kind``: both an :class:`UnknownNameError` and a ``ValueError`` (so
    config validation reports it like any other bad value)."""


def _check_number(kind: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScheduleSpecError(
            f"schedule {kind!r}: field {name!r} must be a number, got {value!r}"
        )
    if not math.isfinite(value):
        raise ScheduleSpecError(f"schedule {kind!r}: field {name!r} must be finite, got {value!r}")
    return float(value)


def _check_horizon(kind: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScheduleSpecError(
            f"schedule {kind!r}: field 'horizon' must be an integer >= 1 (training steps), "
            f"got {value!r}"
        )
    return value


def _check_step(step: int) -> int:
    """``step`` as a Python int; any integer type (numpy's included) but bool, and >= 0."""
    if isinstance(step, bool):
        raise ValueError(f"schedule step must be an integer >= 0, got {step!r}")
    try:
        t = operator.index(step)
    except TypeError:
        raise ValueError(f"schedule step must be an integer >= 0, got {step!r}") from None
    if t < 0:
        raise ValueError(f"schedule step must be an integer >= 0, got {step!r}")
    return t


def _set_float(obj: Schedule, name: str) -> None:
    """Validate number field ``name`` of a frozen schedule and store it as a float."""
    object.__setattr__(obj, name, _check_number(obj.kind, name, getattr(obj, name)))


@dataclass(frozen=True, slots=True)
class Schedule:
    """Base class: a pure function of the training step."""

    kind: ClassVar[str] = ""

    def __call__(self, step: int) -> float:
        raise NotImplementedError(f"{type(self).__name__} does not define __call__")

    def __repr__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{self.kind}({args})"


SCHEDULES: Registry[type[Schedule]] = Registry("schedule")


@SCHEDULES.register("constant")
@dataclass(frozen=True, slots=True, repr=False)
class Constant(Schedule):
    value: float
    kind: ClassVar[str] = "constant"

    def __post_init__(self) -> None:
        _set_float(self, "value")

    def __call__(self, step: int) -> float:
        _check_step(step)
        return float(self.value)


@SCHEDULES.register("linear")
@dataclass(frozen=True, slots=True, repr=False)
class Linear(Schedule):
    start: float
    end: float
    horizon: int
    kind: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        _set_float(self, "start")
        _set_float(self, "end")
        _check_horizon(self.kind, self.horizon)

    def __call__(self, step: int) -> float:
        t = _check_step(step)
        if t >= self.horizon:
            return float(self.end)
        return self.start + (self.end - self.start) * t / self.horizon


@SCHEDULES.register("cosine_up")
@dataclass(frozen=True, slots=True, repr=False)
class CosineUp(Schedule):
    """The SIL weight lambda(t): rises from 0 to ``value`` over ``horizon`` steps, then holds."""

    value: float
    horizon: int
    kind: ClassVar[str] = "cosine_up"

    def __post_init__(self) -> None:
        _set_float(self, "value")
        _check_horizon(self.kind, self.horizon)

    def __call__(self, step: int) -> float:
        t = _check_step(step)
        if t >= self.horizon:
            return float(self.value)
        return self.value * (1.0 - math.cos(math.pi * t / self.horizon)) / 2.0


@SCHEDULES.register("cosine_down")
@dataclass(frozen=True, slots=True, repr=False)
class CosineDown(Schedule):
    """The tool-reward factor phi(t): falls from ``value`` to 0 over ``horizon`` steps, then 0."""

    value: float
    horizon: int
    kind: ClassVar[str] = "cosine_down"

    def __post_init__(self) -> None:
        _set_float(self, "value")
        _check_horizon(self.kind, self.horizon)

    def __call__(self, step: int) -> float:
        t = _check_step(step)
        if t >= self.horizon:
            return 0.0
        return self.value * (1.0 + math.cos(math.pi * t / self.horizon)) / 2.0


def schedule_from_spec(spec: float | int | Mapping[str, Any] | Schedule) -> Schedule:
    """Build a schedule from a number (constant) or a mapping with ``kind`` and its fields.

    A :class:`Schedule` is returned as it is, so code can pass either form along.
    """
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, bool):
        raise ScheduleSpecError(f"schedule spec must be a number or a mapping, got {spec!r}")
    if isinstance(spec, (int, float)):
        return Constant(value=float(spec))
    if not isinstance(spec, Mapping):
        raise ScheduleSpecError(
            f"schedule spec must be a number or a mapping with 'kind', got {type(spec).__name__}"
        )
    if "kind" not in spec:
        known = ", ".join(SCHEDULES.names())
        raise ScheduleSpecError(
            f"schedule spec {dict(spec)!r} has no field 'kind'; known kinds: {known}"
        )
    kind = spec["kind"]
    if not isinstance(kind, str):
        raise ScheduleSpecError(f"schedule field 'kind' must be a string, got {kind!r}")
    try:
        cls = SCHEDULES.get(kind)
    except UnknownNameError:
        raise UnknownScheduleError("schedule kind", kind, SCHEDULES.names()) from None
    expected = [f.name for f in fields(cls)]
    given = {k: v for k, v in spec.items() if k != "kind"}
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise ScheduleSpecError(
            f"schedule {kind!r}: unknown field {unknown[0]!r}; its fields are {', '.join(expected)}"
        )
    missing = [name for name in expected if name not in given]
    if missing:
        raise ScheduleSpecError(
            f"schedule {kind!r}: missing field {missing[0]!r}; its fields are {', '.join(expected)}"
        )
    return cls(**given)
