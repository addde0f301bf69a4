import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spear.registry import UnknownNameError
from spear.schedules import (
    SCHEDULES,
    Constant,
    CosineDown,
    CosineUp,
    Linear,
    ScheduleSpecError,
    schedule_from_spec,
)

# ---------------------------------------------------------------- worked values (§3, §6, §11)


@pytest.mark.parametrize(
    ("t", "expected", "tol"),
    [
        # lambda(t) = (1 - cos(pi t / 200)) / 2
        (0, 0.0, 1e-12),
        (1, 6.2e-5, 1e-6),  # (1 - cos(pi/200)) / 2 = (pi/200)^2 / 4 ~ 6.168e-5
        (50, 0.1464, 1e-4),  # (1 - cos(pi/4)) / 2 = (1 - 0.70711) / 2
        (100, 0.5, 1e-12),  # cos(pi/2) = 0
        (150, 0.8536, 1e-4),  # (1 + 0.70711) / 2
        (200, 1.0, 1e-12),
        (400, 1.0, 0.0),  # held at c after T
    ],
)
def test_cosine_up_sil_weight_worked_values(t: int, expected: float, tol: float) -> None:
    lam = schedule_from_spec({"kind": "cosine_up", "value": 1.0, "horizon": 200})
    assert lam(t) == pytest.approx(expected, abs=tol)


@pytest.mark.parametrize(
    ("t", "expected", "tol"),
    [
        (0, 1.0, 1e-12),  # (1 + cos 0) / 2
        (50, 0.854, 1e-3),  # (1 + 0.70711) / 2
        (100, 0.5, 1e-12),
        (150, 0.146, 1e-3),  # (1 - 0.70711) / 2
        (200, 0.0, 1e-12),
        (250, 0.0, 0.0),  # 0 after T
    ],
)
def test_cosine_down_tool_factor_worked_values(t: int, expected: float, tol: float) -> None:
    phi = schedule_from_spec({"kind": "cosine_down", "value": 1.0, "horizon": 200})
    assert phi(t) == pytest.approx(expected, abs=tol)


def test_constant_mode_is_one_after_horizon() -> None:
    # §11: phi at t=250 is 0 for cosine and 1 for constant.
    assert schedule_from_spec(1.0)(250) == 1.0
    assert schedule_from_spec({"kind": "constant", "value": 1.0})(250) == 1.0


def test_scaled_cosine_up_uses_c() -> None:
    # c = 2: lambda(100) = 2 * 0.5 = 1; lambda(300) = 2
    lam = CosineUp(value=2.0, horizon=200)
    assert lam(100) == pytest.approx(1.0)
    assert lam(300) == 2.0


def test_linear_interpolates_then_holds_end() -> None:
    lin = schedule_from_spec({"kind": "linear", "start": 1.0, "end": 0.0, "horizon": 4})
    # 1 + (0 - 1) * t / 4
    assert [lin(t) for t in range(7)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0])


def test_number_spec_is_constant() -> None:
    s = schedule_from_spec(3)
    assert isinstance(s, Constant)
    assert s(0) == 3.0 and s(10_000) == 3.0


def test_repr_is_readable() -> None:
    assert repr(CosineUp(value=1.0, horizon=200)) == "cosine_up(value=1.0, horizon=200)"
    assert repr(Linear(start=0.0, end=1.0, horizon=5)) == "linear(start=0.0, end=1.0, horizon=5)"
    assert repr(Constant(value=0.5)) == "constant(value=0.5)"


def test_integer_fields_are_stored_as_floats() -> None:
    # a YAML "value: 1" reads as an int; the schedule and its repr are the same as for 1.0
    s = CosineUp(value=1, horizon=200)  # type: ignore[arg-type]
    assert s.value == 1.0 and isinstance(s.value, float)
    assert repr(s) == "cosine_up(value=1.0, horizon=200)"
    assert repr(schedule_from_spec({"kind": "linear", "start": 0, "end": 2, "horizon": 4})) == (
        "linear(start=0.0, end=2.0, horizon=4)"
    )


def test_schedule_passes_through_and_numpy_steps() -> None:
    s = CosineDown(value=1.0, horizon=200)
    assert schedule_from_spec(s) is s
    assert s(np.int64(100)) == pytest.approx(0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step"):
        s(np.float64(1.0))  # type: ignore[arg-type]


def test_schedules_are_frozen_and_comparable() -> None:
    s = CosineDown(value=1.0, horizon=10)
    with pytest.raises(AttributeError):
        s.value = 2.0  # type: ignore[misc]
    assert s == schedule_from_spec({"kind": "cosine_down", "value": 1.0, "horizon": 10})


def test_registry_names() -> None:
    assert SCHEDULES.names() == ["constant", "cosine_down", "cosine_up", "linear"]


# ---------------------------------------------------------------- bad specs


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"kind": "cosine_up", "value": 1.0}, "'horizon'"),
        ({"kind": "cosine_up", "value": 1.0, "horizon": 0}, "'horizon'"),
        ({"kind": "cosine_up", "value": 1.0, "horizon": 2.5}, "'horizon'"),
        ({"kind": "cosine_up", "value": 1.0, "horizon": True}, "'horizon'"),
        ({"kind": "cosine_down", "value": "x", "horizon": 3}, "'value'"),
        ({"kind": "constant", "value": math.nan}, "'value'"),
        ({"kind": "constant", "value": True}, "'value'"),
        ({"kind": "linear", "start": 0.0, "end": 1.0, "horizon": 3, "slope": 2}, "'slope'"),
        ({"kind": "linear", "end": 1.0, "horizon": 3}, "'start'"),
        ({"value": 1.0}, "'kind'"),
        ({"kind": 3}, "'kind'"),
        (True, "number or a mapping"),
        ("cosine_up", "number or a mapping"),
    ],
)
def test_invalid_specs_name_the_field(spec: object, needle: str) -> None:
    with pytest.raises(ScheduleSpecError, match=needle):
        schedule_from_spec(spec)  # type: ignore[arg-type]


def test_unknown_kind_is_unknown_name_and_value_error() -> None:
    with pytest.raises(UnknownNameError, match="cosine_up"):
        schedule_from_spec({"kind": "cosineup", "value": 1.0, "horizon": 3})
    with pytest.raises(ValueError, match="Did you mean 'cosine_up'"):
        schedule_from_spec({"kind": "cosineup", "value": 1.0, "horizon": 3})


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_bad_step_rejected(step: object) -> None:
    with pytest.raises(ValueError, match="step"):
        Constant(value=1.0)(step)  # type: ignore[arg-type]


# ---------------------------------------------------------------- properties

values = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
horizons = st.integers(min_value=1, max_value=1000)
steps = st.integers(min_value=0, max_value=3000)


@settings(max_examples=100, deadline=None)
@given(c=values, horizon=horizons, t=steps)
def test_cosine_up_and_down_are_complementary_within_horizon(
    c: float, horizon: int, t: int
) -> None:
    up, down = CosineUp(c, horizon)(t), CosineDown(c, horizon)(t)
    assert 0.0 <= up <= c + 1e-12 and 0.0 <= down <= c + 1e-12
    if t <= horizon:
        assert up + down == pytest.approx(c, abs=1e-9)
    else:
        assert (up, down) == (c, 0.0)


@settings(max_examples=100, deadline=None)
@given(c=values, horizon=horizons, t=steps)
def test_cosine_up_monotone(c: float, horizon: int, t: int) -> None:
    s = CosineUp(c, horizon)
    assert s(t + 1) >= s(t) - 1e-12
    assert CosineDown(c, horizon)(t + 1) <= CosineDown(c, horizon)(t) + 1e-12


@settings(max_examples=100, deadline=None)
@given(
    a=st.floats(-10, 10, allow_nan=False),
    b=st.floats(-10, 10, allow_nan=False),
    horizon=horizons,
    t=steps,
)
def test_linear_stays_between_endpoints(a: float, b: float, horizon: int, t: int) -> None:
    v = Linear(a, b, horizon)(t)
    assert min(a, b) - 1e-9 <= v <= max(a, b) + 1e-9
    assert Linear(a, b, horizon)(0) == a
    assert Linear(a, b, horizon)(horizon + t) == b
