"""Runs of different studies side by side, one row each, against the first."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest

from study.compare import load_runs, main, write_comparison
from study.grid import write_result
from study_helpers import study_row


def test_each_run_is_a_row_against_the_first_even_where_names_repeat(tmp_path):
    dense = replace(study_row("dense", 1.0, 0, 40.0), loss_history=[[1600, 3.0]])
    longer = replace(study_row("dense", 1.0, 0, 36.0), loss_history=[[6400, 2.5]],
                     validation_history=[[3200, 100.0, 38.0], [6400, 200.0, 36.5]])
    wide = replace(study_row("momentum", 0.25, 0, 44.0, block_size=64), width=512, other_load=0.5)
    write_result(str(tmp_path / "study" / dense.name), dense, {})
    write_result(str(tmp_path / "study_long" / longer.name), longer, {})
    write_result(str(tmp_path / "study_wide" / wide.name), wide, {})
    runs = load_runs([str(tmp_path / "study" / "dense-s0"), str(tmp_path / "study_long"), str(tmp_path / "study_wide")])
    assert [(study, r.name) for study, r in runs] == [("study", "dense-s0"), ("study_long", "dense-s0"),
                                                      ("study_wide", "momentum-b64-d0.25-s0")]
    paths = write_comparison(runs, str(tmp_path / "out"), "Compared", ["a note"])
    table = (tmp_path / "out" / "comparison.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]  # the header left out
    assert "| 1,600 |" in lines[0] and "+0.0%" in lines[0]
    assert "| 6,400 |" in lines[1] and "-10.0%" in lines[1]
    assert "| 512   |" in lines[2] and "+10.0%" in lines[2] and "(busy)" in lines[2]
    assert "a note" in table
    # the plots: every run against its time, the longer run's curve
    assert [os.path.basename(p) for p in paths[2:]] == ["comparison.png", "study_curves.png"]
    assert all(os.path.getsize(p) > 0 for p in paths[2:])


def test_the_time_plot_needs_a_timed_run(tmp_path):
    from study.time_plot import write_time_plot

    untimed = replace(study_row("dense", 1.0, 0, 40.0), train_seconds=None)
    with pytest.raises(ValueError, match="no run has a training time"):
        write_time_plot([("study", untimed)], str(tmp_path / "comparison.png"))
    busy = replace(study_row("momentum", 0.1, 0, 50.0), train_seconds=600.0, other_load=0.5)
    assert write_time_plot([("study", busy), ("study", untimed)], str(tmp_path / "comparison.png")).endswith(".png")
    assert (tmp_path / "comparison.png").stat().st_size > 0


def test_a_folder_without_finished_runs_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no finished run at"):
        main([str(tmp_path), "--output_dir", str(tmp_path / "out")])
