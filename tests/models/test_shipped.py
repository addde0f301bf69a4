"""The warm model shipped inside the package: still what the defaults would build, used by the
default run without a build, and out of the way of every other setting."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

import spear.models.warmstart as ws
from spear.build import describe_model
from spear.config import DEFAULT_RUN_CONFIG, load_config
from spear.models.shipped import (
    FINGERPRINT_FILE,
    SHIPPED_RUN_CONFIGS,
    build_fingerprint,
    check_shipped,
    fingerprint_differences,
    shipped_params,
    stale_dirs,
    weight_distance,
)
from spear.models.warmstart import SHIPPED_DIR, ensure_warm_model, find_warm_model

ROOT = Path(__file__).resolve().parents[2]


def _default_dir() -> Path:
    params, seed = shipped_params("default")
    return SHIPPED_DIR / f"warm-{params.cache_key(seed)}"


def test_the_shipped_model_is_what_the_defaults_would_build() -> None:
    # same key (every parameter, the seed, the cache version), same report params, and the same
    # build inputs: demonstrations, tokenizer, encoded sample, initial weights (a few seconds)
    assert check_shipped() == []
    assert stale_dirs() == []


def test_the_default_run_loads_the_shipped_model_without_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: Any) -> Any:
        raise AssertionError("the default run built a warm model")

    monkeypatch.setattr(ws, "build_warm_model", refuse)
    cfg = load_config(file=DEFAULT_RUN_CONFIG, overrides=[f"model.cache_dir={tmp_path}/cache"])
    params = ws.WarmStartParams.from_config(cfg)
    cache = tmp_path / "cache"
    # what the display says before loading: no "first run", no build
    assert describe_model(cfg) == "loading the shipped warm model and preparing the task"
    assert ensure_warm_model(cache, params, cfg.model.warm_start.seed) == _default_dir()
    assert not cache.exists()  # nothing written to the cache
    # a cached model of the same key (built on this machine) does not win over the shipped one
    (cache / _default_dir().name).mkdir(parents=True)
    (cache / _default_dir().name / ws.REPORT_FILE).write_text("{}")
    assert find_warm_model(cache, params, cfg.model.warm_start.seed) == _default_dir()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(_default_dir())
    tok = AutoTokenizer.from_pretrained(_default_dir())
    assert model.config.hidden_size == cfg.model.tiny.hidden_size and tok.chat_template


def test_other_settings_still_build_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Path] = []

    def fake_build(out_dir: Path, *_: Any) -> dict[str, Any]:
        built.append(out_dir)
        (out_dir / ws.REPORT_FILE).write_text("{}")
        return {}

    monkeypatch.setattr(ws, "build_warm_model", fake_build)
    cfg = load_config(file=DEFAULT_RUN_CONFIG, overrides=["model.warm_start.steps=899"])
    params = ws.WarmStartParams.from_config(cfg)
    assert find_warm_model(tmp_path, params, 0) is None
    path = ensure_warm_model(tmp_path, params, 0)
    assert path.parent == tmp_path and len(built) == 1
    other_seed = ws.WarmStartParams.from_config(load_config(file=DEFAULT_RUN_CONFIG))
    assert ensure_warm_model(tmp_path, other_seed, 1).parent == tmp_path and len(built) == 2


def test_the_shipped_files_are_package_data() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["spear"]
    files = [p for p in _default_dir().rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "tokenizer.json", "config.json", ws.REPORT_FILE} <= names
    assert FINGERPRINT_FILE in names
    # setuptools globs each pattern inside the package (``*`` does not cross a ``/``)
    packaged = {p for pattern in patterns for p in (ROOT / "spear").glob(pattern) if p.is_file()}
    assert set(files) <= packaged, f"not package data: {sorted(set(files) - packaged)}"
    assert sum(f.stat().st_size for f in files) < 8 * 2**20  # a few MB


def test_fingerprint_differences() -> None:
    shipped = {
        "demos_sha256": "a",
        "tokenizer_sha256": "b",
        "encoded_sample_sha256": "c",
        "init_weight_stats": {"w": [1.0, 2.0], "v": [-3.0, 4.0]},
    }
    assert fingerprint_differences(shipped, copy.deepcopy(shipped)) == []
    rounded = copy.deepcopy(shipped)
    rounded["init_weight_stats"]["w"] = [1.0 + 1e-9, 2.0 - 1e-9]  # float rounding: the same
    assert fingerprint_differences(shipped, rounded) == []
    changed = copy.deepcopy(shipped)
    changed["demos_sha256"] = "z"
    changed["init_weight_stats"]["v"] = [-3.0, 4.01]
    assert fingerprint_differences(shipped, changed) == [
        "demos_sha256 differs",
        "initial weights of v differ (4 vs 4.01)",
    ]
    fewer = copy.deepcopy(shipped)
    del fewer["init_weight_stats"]["v"]
    assert fingerprint_differences(shipped, fewer) == ["initial weights have different tensors"]


def test_a_changed_default_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # another demo mix gives other demonstrations (and another key): the fingerprint differs
    params, seed = shipped_params("default")
    shipped = json.loads((_default_dir() / FINGERPRINT_FILE).read_text())
    other = dataclasses.replace(params, num_demos=params.num_demos - 1)
    diffs = fingerprint_differences(shipped, build_fingerprint(other, seed))
    assert "demos_sha256 differs" in diffs
    assert SHIPPED_RUN_CONFIGS == ("default", "lookup", "lookup-sparse")


@pytest.mark.slow
def test_a_rebuild_matches_the_shipped_weights_up_to_rounding(tmp_path: Path) -> None:
    """The full build (about 5 minutes on 2 cores, more on fewer threads): weights within 5% in
    relative norm per tensor and the final loss within 0.02 (float rounding differs between
    CPUs and thread counts and grows over 900 steps)."""
    params, seed = shipped_params("default")
    report = ws.build_warm_model(tmp_path, params, seed)
    assert weight_distance(tmp_path, _default_dir()) < 0.05
    shipped_report = json.loads((_default_dir() / ws.REPORT_FILE).read_text())
    assert abs(report["final_loss"] - shipped_report["final_loss"]) < 0.02


def test_only_builds_the_named_models(monkeypatch: pytest.MonkeyPatch) -> None:
    import spear.models.shipped as shipped

    built: list[str] = []
    monkeypatch.setattr(shipped, "build_shipped", lambda name: built.append(name) or Path(name))
    monkeypatch.setattr(shipped, "check_shipped", lambda: [])
    monkeypatch.setattr(shipped, "stale_dirs", lambda: [])  # never touch the real package
    assert shipped.main(["--only", SHIPPED_RUN_CONFIGS[-1]]) == 0
    assert built == [SHIPPED_RUN_CONFIGS[-1]]
    with pytest.raises(SystemExit):
        shipped.main(["--only", "no-such-config"])


@pytest.mark.parametrize("name", ["lookup", "lookup-sparse"])
def test_the_lookup_benchmark_loads_its_shipped_model(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the hard-exploration benchmark starts from the same weights on every machine (issue 17):
    # its warm build sits near the point where copying emerges, so a rebuild is not the same
    from spear.config import run_config_path

    monkeypatch.setattr(ws, "build_warm_model", lambda *_: pytest.fail("built a warm model"))
    cfg = load_config(file=run_config_path(name), overrides=[f"model.cache_dir={tmp_path}"])
    params, seed = shipped_params(name)
    assert ws.WarmStartParams.from_config(cfg) == params
    assert ensure_warm_model(tmp_path, params, seed).parent == SHIPPED_DIR
