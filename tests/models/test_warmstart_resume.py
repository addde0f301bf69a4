"""A warm-model build stopped by Ctrl-C keeps its progress, and the resumed build equals an
uninterrupted one bit for bit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import spear.models.warmstart as ws
from spear.config import load_config
from spear.interrupts import Interrupted
from spear.models.warmstart import WarmStartParams, ensure_warm_model
from tests.models.test_warmstart import SMALL, cache_listing


@pytest.fixture(scope="module")
def params() -> WarmStartParams:
    return dataclasses.replace(WarmStartParams.from_config(load_config(overrides=SMALL)), steps=6)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_an_interrupted_build_resumes_where_it_stopped(
    tmp_path: Path, params: WarmStartParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _weights(ensure_warm_model(tmp_path / "a", params, seed=0))
    monkeypatch.setattr(ws, "SNAPSHOT_EVERY_S", 0.0)  # a snapshot after every step
    real = ws.train_warm_start
    steps_run: list[int] = []

    def interrupted(*args, **kwargs):
        on_step = args[5]

        def stop_at_4(step: int, loss: float) -> None:
            steps_run.append(step)
            on_step(step, loss)
            if step == 3:
                raise KeyboardInterrupt

        return real(*args[:5], stop_at_4, *args[6:], **kwargs)

    monkeypatch.setattr(ws, "train_warm_start", interrupted)
    with pytest.raises(Interrupted, match="resumes it at step 4"):
        ensure_warm_model(tmp_path / "b", params, seed=0)
    assert cache_listing(tmp_path / "b") == [
        f".resume-warm-{params.cache_key(0)}.pt"
    ]  # no half-built model, only the snapshot
    monkeypatch.setattr(ws, "train_warm_start", real)
    counted: list[int] = []
    monkeypatch.setattr(ws, "_progress", lambda total: lambda s, _loss: counted.append(s))
    resumed = ensure_warm_model(tmp_path / "b", params, seed=0)
    assert steps_run == [0, 1, 2, 3] and counted == [4, 5]  # only the steps left were trained
    got = _weights(resumed)
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in reference)
    assert cache_listing(tmp_path / "b") == [resumed.name]  # snapshot removed


def test_an_interrupt_before_any_snapshot_says_nothing_was_kept(
    tmp_path: Path, params: WarmStartParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    def stop(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ws, "train_warm_start", stop)
    with pytest.raises(Interrupted, match="not cached yet"):
        ensure_warm_model(tmp_path, params, seed=0)
    assert cache_listing(tmp_path) == []


def test_a_snapshot_of_other_demonstrations_is_ignored(
    tmp_path: Path, params: WarmStartParams, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    # a build of other demonstrations under the same key (a code change) left a snapshot whose
    # tokenizer had another size: the build starts afresh instead of crashing on load_state_dict
    reference = _weights(ensure_warm_model(tmp_path / "a", params, seed=0))
    cache = tmp_path / "b"
    cache.mkdir()
    stale = {"step": 3, "model": {"w": torch.zeros(3)}, "examples": "another build"}
    torch.save(stale, cache / f".resume-warm-{params.cache_key(0)}.pt")
    with caplog.at_level("WARNING"):
        built = ensure_warm_model(cache, params, seed=0)
    assert "trained on other demonstrations" in caplog.text
    got = _weights(built)
    assert all(torch.equal(got[k], reference[k]) for k in reference)
