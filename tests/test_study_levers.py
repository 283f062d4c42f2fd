"""Levers on sparse momentum: their table against the study's rows, and the recipe end to end (runs, resume)."""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict

import pytest

from sparse_nlp.lm.study_levers import LEVERS_BY_NAME, format_levers, get_levers, lever_row
from sparse_nlp.lm.study_tables import aggregate
from test_study import ROOT, _flags, _row, count_trained_runs, study_lm


def _load_levers_recipe():
    spec = importlib.util.spec_from_file_location("study_levers", ROOT / "recipes" / "study_levers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


study_levers = _load_levers_recipe()


def test_lever_rows_are_compared_with_the_study_rows_at_their_density():
    study = [_row("dense", 1.0, 0, 100.0), _row("momentum", 0.1, 0, 110.0), _row("momentum", 0.1, 1, 114.0),
             _row("static", 0.1, 0, 120.0), _row("momentum", 0.2, 0, 90.0), _row("momentum", 0.1, 0, 130.0, 64)]
    groups = [asdict(g) for g in aggregate(study)]
    erk = lever_row(LEVERS_BY_NAME["erk"], [_row("momentum", 0.1, 0, 99.0)])
    table = format_levers([erk], groups, 0.1)
    momentum_line = next(line for line in table.splitlines() if line.startswith("| sparse momentum"))
    assert "112.00 ± 2.83" in momentum_line  # mean over the two fine-grained seeds; not the block run, not 0.2
    erk_line = next(line for line in table.splitlines() if "ERK" in line)
    # 99 vs 112 (momentum), 120 (static), 100 (dense); no SET row in this study
    assert "-11.6%" in erk_line and "-17.5%" in erk_line and "-1.0%" in erk_line and "| -" in erk_line
    with pytest.raises(ValueError, match="unknown lever 'lottery'; known levers: erk"):
        get_levers(["erk", "lottery"])


def test_the_lever_recipe_trains_each_lever_once_and_resumes(tmp_path, monkeypatch, capsys):
    flags = _flags(tmp_path)
    study_lm.main(flags)  # the baseline study: dense, small-dense and momentum at 0.5
    trained = count_trained_runs(monkeypatch)
    passed_on = [f for f in flags if f != str(tmp_path / "study")]
    passed_on.remove("--output_dir")
    levers = ["--levers", "erk", "regrown-keep", "--density", "0.5", "--output_dir", str(tmp_path / "levers"),
              "--baseline_dir", str(tmp_path / "study")]
    rows = study_levers.main(levers + passed_on)
    assert trained == ["momentum-d0.5-s0", "momentum-d0.5-s0"] and [r.lever for r in rows] == ["erk", "regrown-keep"]
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
