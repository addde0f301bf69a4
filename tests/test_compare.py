"""``spear compare``: fair configs, the sweep's choice on validation, resume, the report."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from spear.cli import main
from spear.compare import (
    CompareSpec,
    choose_values,
    method_config,
    plan_runs,
    run_comparison,
    run_plan,
)
from spear.compare_report import (
    CURVES,
    _gaps,
    band,
    bootstrap_ci,
    bootstrap_diff_ci,
    bootstrap_paired_ci,
    panels,
    summary_markdown,
)
from spear.config import ConfigError
from spear.trainer import Trainer
from tests.test_trainer import TINY

# the trainer tests' tiny model and budget (later overrides win), on the lookup task
TINY_LOOKUP = [*TINY, "trainer.steps=3", "trainer.save_every=1", "replay.capacity=1"]


def spec(tmp_path: Path, **over) -> CompareSpec:
    base = dict(
        base="lookup",
        methods=("grpo", "spear"),
        seeds=(0,),
        out=tmp_path / "cmp",
        overrides=(*TINY_LOOKUP, f"model.cache_dir={tmp_path / 'cache'}"),
    )
    return CompareSpec(**{**base, **over})


def test_every_method_gets_the_base_budget_and_its_own_algorithm(tmp_path) -> None:
    s = spec(tmp_path, overrides=("trainer.steps=40",))
    grpo = method_config(s, "grpo", [])
    drbot = method_config(s, "drbot", [])
    spear = method_config(s, "spear", [])
    for cfg in (grpo, drbot, spear):  # lookup.yaml's budget, for every method
        assert (cfg.task.name, cfg.rollout.tasks_per_step, cfg.rollout.group_size) == (
            "lookup",
            8,
            8,
        )
        assert (cfg.trainer.steps, cfg.optim.lr, cfg.model.warm_start.frac_tool) == (40, 1e-4, 0.05)
    assert grpo.advantage.norm_by_std and grpo.loss.aggregation == "token-mean"  # its preset
    assert not grpo.replay.enabled and grpo.reward.tool_bonus.mode == "none"
    assert not drbot.replay.enabled and drbot.reward.tool_bonus.mode == "none"
    assert drbot.loss.policy_loss == "vanilla" and spear.loss.policy_loss == "clip_cov"
    # SPEAR: lookup.yaml's replay sizing, curricula matched to the run (40 steps, not 150)
    assert spear.replay.enabled and spear.replay.capacity == 8
    assert spear.replay.loss_coef["horizon"] == 40 and spear.reward.tool_bonus.horizon == 40
    assert spear.reward.tool_bonus.mode == "cosine"


def test_horizons_can_be_kept(tmp_path) -> None:
    s = spec(tmp_path, overrides=("trainer.steps=40",), match_horizons=False)
    assert method_config(s, "spear", []).reward.tool_bonus.horizon == 150


def test_ablations_switch_one_piece_off(tmp_path) -> None:
    s = spec(tmp_path)
    assert method_config(s, "spear-no-tool", []).reward.tool_bonus.mode == "none"
    assert not method_config(s, "spear-no-sil", []).replay.enabled
    assert method_config(s, "spear-no-recal", []).replay.recalibration == "decay"
    nc = method_config(s, "spear-no-clipcov", [])
    assert (nc.loss.policy_loss, nc.replay.policy_loss) == ("vanilla", "vanilla")


def test_the_base_configs_algorithm_sections_never_reach_a_baseline(tmp_path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("preset: spear\nloss: {policy_loss: kl_cov}\ntrainer: {steps: 7}\n")
    cfg = method_config(spec(tmp_path, base=str(base), overrides=()), "grpo", [])
    assert (cfg.loss.policy_loss, cfg.trainer.steps, cfg.preset) == ("vanilla", 7, "grpo")


def test_bad_specs_are_refused_with_the_known_names(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'sper'.*spear-no-sil"):
        spec(tmp_path, methods=("sper",))
    with pytest.raises(ConfigError, match="sweep-seeds must differ"):
        spec(tmp_path, sweep={"optim.lr": ("1e-4",)}, sweep_seeds=(0,))
    with pytest.raises(ConfigError, match="needs --sweep-seeds"):
        spec(tmp_path, sweep={"optim.lr": ("1e-4",)})
    with pytest.raises(ConfigError, match="does not exist"):
        method_config(spec(tmp_path, base="no-such.yaml"), "grpo", [])
    for setting in ("eval.split=validation", " trainer.seed=3", "trainer.run_dir=x"):
        with pytest.raises(ConfigError, match="is set by compare for each run"):
            spec(tmp_path, overrides=(*TINY_LOOKUP, setting))


def test_the_sweep_runs_on_validation_and_the_main_runs_on_test(tmp_path) -> None:
    s = spec(tmp_path, sweep={"optim.lr": ("1e-4", "3e-4")}, sweep_seeds=(10, 11), seeds=(0, 1))
    sweep = plan_runs(s)
    assert len(sweep) == 2 * 2 * 2
    assert {p.config.eval.split for p in sweep} == {"validation"}
    assert {p.config.optim.lr for p in sweep} == {1e-4, 3e-4}
    assert {p.seed for p in sweep} == {10, 11}
    main_runs = plan_runs(s, {"grpo": "3e-4", "spear": "1e-4"})
    assert {p.config.eval.split for p in main_runs} == {"test"}
    assert {(p.method, p.config.optim.lr) for p in main_runs} == {("grpo", 3e-4), ("spear", 1e-4)}


def test_carried_over_choices_skip_the_sweep_and_are_checked(tmp_path, monkeypatch) -> None:
    import spear.compare as compare

    sweep = {"optim.lr": ("1e-4", "3e-4")}
    s = spec(tmp_path, sweep=sweep, chosen={"grpo": "3e-4", "spear": "1e-4"})  # no sweep seeds
    ran: list[tuple[str, str, float]] = []

    def fake_execute(plans, jobs, on_done):
        ran.extend((p.phase, p.method, p.config.optim.lr) for p in plans)
        return []

    monkeypatch.setattr(compare, "execute", fake_execute)
    monkeypatch.setattr("spear.compare_report.write_report", lambda *a: {"chosen": a[-1]})
    assert run_comparison(s) == {"chosen": {"grpo": "3e-4", "spear": "1e-4"}}
    assert ran == [("main", "grpo", 3e-4), ("main", "spear", 1e-4)]  # no sweep run at all
    with pytest.raises(ConfigError, match=r"no carried-over value for method\(s\) \['spear'\]"):
        spec(tmp_path, sweep=sweep, chosen={"grpo": "3e-4"})
    with pytest.raises(ConfigError, match=r"values \{'spear': '1e-3'\} are not in"):
        spec(tmp_path, sweep=sweep, chosen={"grpo": "3e-4", "spear": "1e-3"})
    with pytest.raises(ConfigError, match="need the swept setting"):
        spec(tmp_path, chosen={"grpo": "3e-4", "spear": "1e-4"})


def test_the_cli_reads_carried_over_choices_from_a_summary(tmp_path) -> None:
    from spear.cli_compare import _chosen_from

    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"sweep": {"chosen": {"grpo": "2e-4", "spear": "5e-5"}}}))
    assert _chosen_from(str(path)) == {"grpo": "2e-4", "spear": "5e-5"}
    assert _chosen_from(None) == {}
    path.write_text(json.dumps({"sweep": {"chosen": {}}}))
    with pytest.raises(ConfigError, match="ran no sweep"):
        _chosen_from(str(path))
    with pytest.raises(ConfigError, match=r"not a compare summary\.json"):
        _chosen_from(str(tmp_path / "missing.json"))


def _record(method: str, value: str, final: float) -> dict:
    return {
        "method": method,
        "value": value,
        "rows": [{"step": 0, "eval/success": 0.0}, {"step": 5, "eval/success": final}],
    }


def test_choice_is_the_best_mean_validation_success_first_on_ties(tmp_path) -> None:
    s = spec(tmp_path, sweep={"optim.lr": ("1e-4", "3e-4", "1e-3")}, sweep_seeds=(9,))
    records = [
        _record("grpo", "1e-4", 0.2), _record("grpo", "1e-4", 0.4),  # mean 0.3
        _record("grpo", "3e-4", 0.5), _record("grpo", "3e-4", 0.1),  # mean 0.3 (tie: 1e-4 wins)
        _record("grpo", "1e-3", 0.0),
        _record("spear", "1e-4", 0.1), _record("spear", "1e-3", 0.6),
    ]  # fmt: skip
    assert choose_values(s, records) == {"grpo": "1e-4", "spear": "1e-3"}


def test_bootstrap_interval_by_hand() -> None:
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    # two values: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5th and 97.5th percentiles are 0 and 1
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    lo, hi = bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.5])
    assert 0.1 < lo < 0.3 < hi < 0.5
    assert bootstrap_diff_ci([0.6, 0.6], [0.2, 0.2]) == pytest.approx((0.4, 0.4))
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    # paired: every seed differs by exactly 0.1, so every resample's mean difference is 0.1,
    # although each method's own values spread over 0.4 (unpaired, the interval is wide)
    a, b = [0.5, 0.9, 0.7], [0.4, 0.8, 0.6]
    assert bootstrap_paired_ci(a, b) == pytest.approx((0.1, 0.1))
    lo, hi = bootstrap_diff_ci(a, b)
    assert lo < 0.0 < 0.2 < hi


def test_gaps_pair_runs_by_seed() -> None:
    nan = float("nan")
    methods = {
        "spear": {"seeds": [0, 1, 2, 3], "final_heldout": [0.7, 0.6, 0.8, nan]},
        "grpo": {"seeds": [2, 0, 1, 3], "final_heldout": [0.7, 0.6, 0.5, 0.9]},  # other order
        "drbot": {"seeds": [0, 9], "final_heldout": [0.1, 0.2]},  # one seed in common
    }
    gaps = _gaps(methods)
    g = gaps["spear-grpo"]
    assert g["mean"] == pytest.approx(0.7 - 0.675)  # unpaired: spear's NaN seed dropped
    # paired over seeds 0, 1, 2 (seed 3 is NaN for spear): 0.7-0.6, 0.6-0.5, 0.8-0.7
    assert g["paired"]["mean"] == pytest.approx(0.1) and g["paired"]["seeds"] == 3
    assert g["paired"]["ci95"] == pytest.approx([0.1, 0.1])
    assert "paired" not in gaps["spear-drbot"]  # a single pair has no interval


def test_text_games_plot_inadmissible_actions_where_tool_tasks_plot_tool_calls() -> None:
    tool, game = dict(panels("arithmetic")), dict(panels("textworld"))
    assert "tool_calls" in tool and "invalid_actions" not in tool
    assert game["invalid_actions"] == "inadmissible actions / episode" and "tool_calls" not in game
    assert panels(None) == panels("arithmetic") and len(game) == len(tool) == 6
    assert CURVES["invalid_actions"]({"train/invalid_actions": 2.5}) == 2.5


def test_band_by_hand() -> None:
    assert band([{0: 0.0, 5: 0.5}, {0: 1.0, 5: 0.25, 10: 0.5}]) == {
        "step": [0.0, 5.0, 10.0],
        "mean": [0.5, 0.375, 0.5],
        "min": [0.0, 0.25, 0.5],
        "max": [1.0, 0.5, 0.5],
    }


def test_a_comparison_runs_resumes_and_reports(tmp_path) -> None:
    s = spec(tmp_path)
    summary = run_comparison(s)
    out = s.out
    on_disk = json.loads((out / "summary.json").read_text())
    for m in ("grpo", "spear"):
        ms = on_disk["methods"][m]
        assert ms["seeds"] == [0] and ms["steps"] == 3 and ms["lr"] == 1e-4
        assert len(ms["final_heldout"]) == 1 and 0.0 <= ms["final_heldout"][0] <= 1.0
        assert ms["curves"]["heldout"]["step"] == [0.0, 2.0, 3.0]
        assert len(ms["curves"]["entropy"]["step"]) == 3
        assert (out / "runs" / m / "s0" / "run.json").exists()
        assert not (out / "runs" / m / "s0" / "checkpoints").exists()
    assert on_disk["methods"]["grpo"]["sil_triggers_per_run"] == [0]
    rows = json.loads((out / "runs" / "spear" / "s0" / "run.json").read_text())["rows"]
    replayed = [r["replay/n_sampled"] for r in rows if "replay/n_sampled" in r]
    assert summary["methods"]["spear"]["sil_triggers_per_run"] == [len(replayed)]
    assert summary["methods"]["spear"]["replayed_rows_per_step"] == [sum(replayed) / 3]
    assert "spear-grpo" in on_disk["gaps"] and (out / "curves.png").stat().st_size > 0
    assert on_disk["task"] == "lookup"  # the base config's task
    assert "| grpo | 0.0001 |" in summary_markdown(on_disk)

    # a run killed after its step-2 checkpoint resumes and ends as an uninterrupted one did
    plan = next(p for p in plan_runs(s, {}) if p.method == "spear")
    finished = json.loads((plan.run_dir / "run.json").read_text())
    shutil.rmtree(plan.run_dir)
    plan.run_dir.mkdir(parents=True)
    first_two = plan.config.trainer.model_copy(update={"steps": 2})
    t = Trainer(plan.config.model_copy(update={"trainer": first_two}), plan.run_dir)
    t.fit()  # stops after step 2 with its checkpoint, as a kill after that checkpoint would
    t.close()
    resumed = run_plan(plan)
    assert resumed["resumed"] is True
    keys = ("train/success", "actor/entropy", "eval/success", "reward/score")
    strip = lambda rows: [{k: r.get(k) for k in ("step", *keys)} for r in rows]  # noqa: E731
    assert strip(resumed["rows"]) == strip(finished["rows"])


def test_the_cli_verb_refuses_a_bad_method_in_one_line(tmp_path, capsys) -> None:
    assert main(["compare", "lookup", "--methods", "grpoo", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'grpoo'" in err and not (tmp_path / "x").exists()
