"""The study's tables and plots (recipes/study/tables.py, plots.py): means and spreads over seeds, the references'
rows, speeds from quiet machines, and the PNGs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from study.grid import StudyResult
from study.tables import aggregate, format_study, format_summary, write_study
from study_helpers import study_row


def test_aggregation_gives_mean_and_spread_over_seeds(tmp_path):
    rows = [study_row("dense", 1.0, 0, 100.0), study_row("momentum", 0.1, 0, 110.0), study_row("momentum", 0.1, 1, 114.0),
            study_row("static", 0.1, 0, 120.0), study_row("momentum", 0.1, 0, 130.0, block_size=64)]
    groups = aggregate(rows)
    assert [(g.label, g.seeds) for g in groups] == [("dense", [0]), ("momentum", [0, 1]), ("static", [0]),
                                                      ("momentum (block 64)", [0])]
    momentum = groups[1]
    assert momentum.val_perplexity == 112.0 and momentum.val_perplexity_sd == pytest.approx(2 * 2**0.5)
    assert (momentum.val_perplexity_min, momentum.val_perplexity_max) == (110.0, 114.0)
    assert groups[2].val_perplexity_sd is None
    text = format_study(groups)
    assert "## Density 0.1" in text and "112.00 ± 2.83" in text and "+12.0%" in text and "momentum (block 64)" in text
    summary = [[cell.strip() for cell in line.split("|")[1:-1]] for line in format_summary(groups).splitlines()]
    assert summary[0] == ["validation perplexity", "density 0.1"]
    assert summary[2:6] == [["dense (density 1)", "100.00"], ["momentum", "112.00 ± 2.83 (2 seeds)"],
                            ["static", "120.00"], ["momentum (block 64)", "130.00"]]
    assert summary[-2:] == [["static", "-6.7%"], ["dense", "+12.0%"]]  # momentum 112 vs static 120, vs dense 100
    paths = write_study(rows, str(tmp_path), ["a note"])
    saved = json.loads(Path(paths[0]).read_text())
    assert len(saved["runs"]) == 5 and saved["groups"][1]["val_perplexity"] == 112.0
    csv_lines = Path(paths[1]).read_text().splitlines()
    assert csv_lines[0].startswith("name,method,density,seed,block_size") and len(csv_lines) == 6
    assert "history" not in csv_lines[0]


def test_tables_show_the_equal_size_references_with_their_total_and_average_parameters():
    rows = [study_row("dense", 1.0, 0, 100.0), study_row("small_dense", 0.1, 0, 140.0), study_row("small_dense_total", 0.1, 0, 125.0),
            study_row("momentum", 0.1, 0, 110.0), study_row("magnitude", 0.1, 0, 105.0), study_row("magnitude_average", 0.1, 0, 115.0)]
    groups = aggregate(rows)
    assert [g.label for g in groups] == ["dense", "small-dense", "small-dense (equal total)", "momentum", "magnitude",
                                         "magnitude (equal average)"]
    summary = [[cell.strip() for cell in line.split("|")[1:-1]] for line in format_summary(groups).splitlines()]
    versus = summary[summary.index(["sparse momentum vs", "density 0.1"]):]
    assert versus[2:] == [["small-dense", "-21.4%"], ["small-dense (equal total)", "-12.0%"], ["magnitude", "+4.8%"],
                          ["magnitude (equal average)", "-4.3%"], ["dense", "+10.0%"]]
    table = format_study(groups)
    assert "| total nonzeros |" in table and "| small-dense (equal total) |" in table


def test_a_group_speed_comes_from_runs_on_a_quiet_machine():
    def timed(seed, speed, load):
        row = study_row("momentum", 0.1, seed, 110.0)
        return StudyResult(**{**row.__dict__, "tokens_per_second": speed, "other_load": load})

    mixed = aggregate([timed(0, 50.0, 0.4), timed(1, 100.0, 0.01), timed(2, 120.0, None)])[0]
    assert mixed.tokens_per_second == 110.0 and not mixed.speed_on_busy_machine  # the busy run's 50 left out
    busy = aggregate([timed(0, 50.0, 0.4)])
    assert busy[0].tokens_per_second == 50.0 and busy[0].speed_on_busy_machine
    assert "50 (busy)" in format_study(busy)


# ---- plots ------------------------------------------------------------------------------------------------------------
def test_plots_are_written(tmp_path):
    from study.plots import write_study_plots

    history = [{"step": 0, "densities": {"transformer.h.0.attn.c_attn": 0.1, "transformer.h.0.mlp.c_fc": 0.1}},
               {"step": 5, "densities": {"transformer.h.0.attn.c_attn": 0.2, "transformer.h.0.mlp.c_fc": 0.05}}]
    rows = [study_row("dense", 1.0, 0, 100.0), study_row("small_dense", 0.1, 0, 140.0), study_row("momentum", 0.2, 0, 105.0),
            study_row("momentum", 0.1, 1, 114.0), study_row("momentum", 0.1, 0, 130.0, block_size=64)]
    rows.insert(3, StudyResult(**{**rows[3].__dict__, "seed": 0, "density_history": history,
                                  "loss_history": [[10, 3.0]]}))
    for path in write_study_plots(rows, str(tmp_path)):
        assert Path(path).read_bytes()[:4] == b"\x89PNG"
