"""Levers: their table against the study's rows, the baselines' own schedules, the recipe end to end (runs, resume)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Sequence

import pytest
from transformers import HfArgumentParser

import study_levers  # recipes/study_levers.py (pytest's pythonpath: recipes/)
from sparse_nlp import SparsityConfig
from sparse_nlp.methods import get_method
from sparse_nlp.topology.schedule import TopologySchedule
from study import runner
from study.grid import StudyRun
from study.levers import LEVERS_BY_NAME, format_levers, get_levers, lever_row
from study.tables import aggregate
from study_helpers import STUDY_CONFIG, count_trained_runs, study_flags, study_row


def test_lever_rows_are_compared_with_the_study_rows_at_their_density():
    study = [study_row("dense", 1.0, 0, 100.0), study_row("momentum", 0.1, 0, 110.0), study_row("momentum", 0.1, 1, 114.0),
             study_row("static", 0.1, 0, 120.0), study_row("momentum", 0.2, 0, 90.0), study_row("momentum", 0.1, 0, 130.0, 64)]
    groups = [asdict(g) for g in aggregate(study)]
    erk = lever_row(LEVERS_BY_NAME["erk"], [study_row("momentum", 0.1, 0, 99.0)])
    table = format_levers([erk], groups, 0.1)
    momentum_line = next(line for line in table.splitlines() if line.startswith("| sparse momentum"))
    assert "112.00 ± 2.83" in momentum_line  # mean over the two fine-grained seeds; not the block run, not 0.2
    erk_line = next(line for line in table.splitlines() if "ERK" in line)
    # 99 vs 112 (momentum), 120 (static), 100 (dense); no SET row in this study
    assert "-11.6%" in erk_line and "-17.5%" in erk_line and "-1.0%" in erk_line and "| -" in erk_line
    with pytest.raises(ValueError, match="unknown lever 'lottery'; known levers: erk"):
        get_levers(["erk", "lottery"])


def _cells(table: str, start: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {start}"))
    return [cell.strip() for cell in line.split("|")[1:-1]]


def test_a_baseline_at_its_own_settings_is_compared_with_its_study_row_and_with_momentum():
    study = [study_row("dense", 1.0, 0, 100.0), study_row("momentum", 0.1, 0, 110.0), study_row("rigl", 0.1, 0, 125.0),
             study_row("set", 0.1, 0, 115.0), study_row("static", 0.1, 0, 120.0)]
    groups = [asdict(g) for g in aggregate(study)]
    rigl = lever_row(LEVERS_BY_NAME["rigl-own"], [study_row("rigl", 0.1, 0, 120.0)])
    lr = lever_row(LEVERS_BY_NAME["lr-x2"], [study_row("momentum", 0.1, 0, 104.5)])
    assert rigl.method == "rigl" and lr.method == "momentum"
    table = format_levers([rigl, lr], groups, 0.1)
    header = _cells(table, "setting")
    assert header[3:9] == ["vs own method", "vs momentum", "vs RigL", "vs static", "vs SET", "vs dense"]
    # 120 vs RigL's study row 125 (its own method), momentum 110, RigL 125, static 120, SET 115, dense 100
    assert _cells(table, "RigL, its paper's settings")[3:9] == ["-4.0%", "+9.1%", "-4.0%", "+0.0%", "+4.3%", "+20.0%"]
    assert _cells(table, "momentum, peak learning rate 2e-3")[3:5] == ["-5.0%", "-5.0%"]  # own method: momentum
    assert _cells(table, "RigL (study settings)")[2:5] == ["125.00", "-", "+13.6%"]


def _sparsity(lever_name: str, method: str) -> SparsityConfig:
    """The SparsityConfig a lever's run trains with: the study's defaults (interval 100) with the lever's flags."""
    flags = ["--update_interval", "100", *LEVERS_BY_NAME[lever_name].flags, "--method", method, "--density", "0.1"]
    (config,) = HfArgumentParser(SparsityConfig).parse_args_into_dataclasses(args=flags)
    return config


def _schedule(config: SparsityConfig, total_steps: int = 1600) -> TopologySchedule:
    return TopologySchedule(total_steps, config.update_interval, config.prune_rate, config.prune_rate_decay,
                            config.update_end_fraction, skip_zero_rate=get_method(config.method).prunes_by_rate)


def test_rigl_and_set_at_their_papers_settings_schedule_as_the_papers_do():
    rigl = _sparsity("rigl-own", LEVERS_BY_NAME["rigl-own"].method)
    assert (rigl.method, rigl.distribution, rigl.prune_rate, rigl.prune_rate_decay) == ("rigl", "erk", 0.3, "cosine")
    schedule = _schedule(rigl)  # cosine to 0 at step 1,200 (75%); that zero-rate update is not scheduled
    assert (schedule.num_updates, schedule.last_update_step) == (11, 1100) and not schedule.is_update_step(1200)
    assert schedule.prune_rate_at(100) == pytest.approx(0.15 * (1 + math.cos(math.pi / 12)))

    set_own = _sparsity("set-own", LEVERS_BY_NAME["set-own"].method)
    assert (set_own.method, set_own.distribution, set_own.prune_rate_decay) == ("set", "erk", "constant")
    schedule = _schedule(set_own)  # zeta 0.3 at every update, the last at 1,500 as the study's SET, not at 1,600
    assert (schedule.num_updates, schedule.last_update_step) == (15, 1500) and not schedule.is_update_step(1600)
    assert {schedule.prune_rate_at(step) for step in range(100, 1600, 100)} == {0.3}
    study_set = _schedule(SparsityConfig(method="set", density=0.1, update_interval=100))
    assert [s for s in range(1, 1601) if study_set.is_update_step(s)] == [
        s for s in range(1, 1601) if schedule.is_update_step(s)]


def test_the_lever_recipe_trains_each_lever_once_and_resumes(tmp_path, monkeypatch, capsys):
    flags = study_flags(tmp_path)
    runner.main(flags)  # the baseline study: dense, small-dense and momentum at 0.5
    trained = count_trained_runs(monkeypatch)
    passed_on = [f for f in flags if f != str(tmp_path / "study")]
    passed_on.remove("--output_dir")
    levers = ["--levers", "erk", "regrown-keep", "set-own", "--density", "0.5", "--output_dir",
              str(tmp_path / "levers"), "--baseline_dir", str(tmp_path / "study")]
    rows = study_levers.main(levers + passed_on)
    assert trained == ["momentum-d0.5-s0", "momentum-d0.5-s0", "set-d0.5-s0"]
    assert [r.lever for r in rows] == ["erk", "regrown-keep", "set-own"]
    set_settings = json.loads((tmp_path / "levers" / "set-own" / "set-d0.5-s0" / "study_result.json").read_text())
    assert set_settings["settings"]["sparsity"]["prune_rate_decay"] == "constant"
    settings = json.loads((tmp_path / "levers" / "regrown-keep" / "momentum-d0.5-s0" / "study_result.json").read_text())
    assert settings["settings"]["sparsity"]["regrown_state"] == "keep"
    assert settings["settings"]["sparsity"]["distribution"] == "uniform"
    table = (tmp_path / "levers" / "levers.md").read_text()
    assert "| sparse momentum (study default)" in table and "| momentum, regrown weights keep" in table
    assert json.loads((tmp_path / "levers" / "levers.json").read_text())["levers"][0]["flags"] == [
        "--distribution", "erk"]

    trained.clear()  # again: every lever has finished, nothing is trained
    assert [r.val_perplexity for r in study_levers.main(levers + passed_on)] == [r.val_perplexity for r in rows]
    assert trained == []
    with pytest.raises(SystemExit, match="no study results at"):
        study_levers.main(["--baseline_dir", str(tmp_path / "nowhere")])


# What each lever changes, against the study's run of its method: the exact SparsityConfig / TrainingArguments values
# its documented change names (Lever.change), written out here rather than read back from the lever's flags.
LEVER_CHANGES = {
    "erk": {"sparsity.distribution": "erk"},
    "end-0.75": {"sparsity.update_end_fraction": 0.75},
    "prune-0.3": {"sparsity.prune_rate": 0.3},
    "interval-200": {"sparsity.update_interval": 200},
    "adam-raw": {"sparsity.adam_momentum": "raw"},
    "regrown-keep": {"sparsity.regrown_state": "keep"},
    "regrown-fresh": {"sparsity.regrown_state": "fresh"},
    "lr-x0.5": {"training.learning_rate": 5e-4},
    "lr-x2": {"training.learning_rate": 2e-3},
    "rigl-own": {"sparsity.prune_rate": 0.3, "sparsity.update_end_fraction": 0.75, "sparsity.distribution": "erk"},
    "set-own": {"sparsity.prune_rate": 0.3, "sparsity.prune_rate_decay": "constant", "sparsity.distribution": "erk",
                "sparsity.update_end_fraction": 0.9375},
}


def _trained_settings(method: str, flags: Sequence[str] = ()) -> dict:
    """The sparsity and training settings the study recipe trains a run of ``method`` at 0.05 with, given ``flags``
    (parsed by the recipe's HfArgumentParser, then prepared as the grid prepares its runs)."""
    model_args, _, options, study, training_args = runner.parse_args(
        [*flags, "--methods", method, "--densities", "0.05", "--bf16", "false", "--output_dir", "unused"])
    _, _, sparsity, args = runner.prepare_run(StudyRun(method, 0.05, 0), model_args, STUDY_CONFIG, options, study,
                                              training_args)
    training = {k: v for k, v in args.to_dict().items() if k != "logging_dir"}
    return {**{f"sparsity.{k}": v for k, v in sparsity.to_dict().items()},
            **{f"training.{k}": v for k, v in training.items()}}


def test_each_lever_trains_exactly_the_change_it_names():
    assert set(LEVER_CHANGES) == set(LEVERS_BY_NAME)  # a new lever needs its line above
    for name, lever in LEVERS_BY_NAME.items():
        study_run = _trained_settings(lever.method)
        lever_run = _trained_settings(lever.method, lever.flags)
        changed = {key: value for key, value in lever_run.items() if study_run[key] != value}
        assert changed == LEVER_CHANGES[name], name


def test_the_own_settings_levers_train_as_the_studys_own_settings_references():
    # rigl-own / set-own (levers: RigL or SET with flags) and rigl_own / set_own (the study's references: OWN_SETTINGS
    # applied by the grid) are two routes to one configuration; only the run's name differs
    for lever, reference in (("rigl-own", "rigl_own"), ("set-own", "set_own")):
        assert _trained_settings(LEVERS_BY_NAME[lever].method, LEVERS_BY_NAME[lever].flags) == _trained_settings(
            reference)
