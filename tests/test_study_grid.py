"""The study's grid (recipes/study/grid.py): which runs, their rows, their result files, and which are done."""
from __future__ import annotations

import pytest

from study import runner
from study.grid import StudyRun, average_linear_nonzeros, load_result, plan_grid, study_result, write_result
from study.tables import aggregate, format_study
from study_helpers import run_result, study_row


def test_default_grid_has_every_method_density_and_the_extra_seeds():
    args = runner.StudyArguments()
    grid = plan_grid(args.densities, args.methods, args.seeds, args.seeded_methods, args.seeded_densities,
                     args.block_methods, args.study_block_size)
    names = [run.name for run in grid]
    assert len(grid) == 43 and len(set(names)) == 43
    assert names[:4] == ["dense-s0", "small_dense-d0.2-s0", "small_dense_total-d0.2-s0", "momentum-d0.2-s0"]
    assert "momentum-b64-d0.05-s0" in names and "magnitude-d0.05-s0" in names and "rigl-d0.1-s0" in names
    assert "magnitude_average-d0.1-s0" in names  # the equal-size references: one seed at every density
    assert "rigl_own-d0.05-s0" in names and "set_own-d0.2-s0" in names  # the baselines at their own settings
    second = [run for run in grid if run.seed == 1]
    assert grid[-len(second):] == second  # every first-seed run comes first
    assert {(r.method, r.density) for r in second} == {("dense", 1.0)} | {
        (m, d) for m in ("small_dense", "momentum", "static", "set") for d in (0.1, 0.05)}


def test_grid_rejects_dense_densities_and_duplicates():
    with pytest.raises(ValueError, match="densities must be in"):
        plan_grid([1.0], ["momentum"], [0])
    with pytest.raises(ValueError, match="twice"):
        plan_grid([0.1], ["momentum", "momentum"], [0])
    assert [r.name for r in plan_grid([0.1], ["static"], [0, 1], ["static-b64"], [0.1], ["static"], 64)] == [
        "static-d0.1-s0", "static-b64-d0.1-s0", "static-b64-d0.1-s1"]


def test_none_leaves_out_the_fine_grained_or_the_block_runs():
    *_, study, _ = runner.parse_args(["--methods", "none", "--block_methods", "momentum", "--output_dir", "x"])
    assert study.methods == [] and study.block_methods == ["momentum"]
    grid = plan_grid([0.2, 0.1], study.methods, [0], block_methods=study.block_methods, block_size=64)
    assert [run.name for run in grid] == ["momentum-b64-d0.2-s0", "momentum-b64-d0.1-s0"]


# ---- rows -------------------------------------------------------------------------------------------------------------
def test_average_parameters_integrate_the_density_history():
    sizes = {"a": 100, "b": 300}
    history = [{"step": 0, "densities": {"a": 1.0, "b": 1.0}}, {"step": 5, "densities": {"a": 0.5, "b": 0.1}}]
    assert average_linear_nonzeros(history, sizes, 10) == pytest.approx((400 * 5 + 80 * 5) / 10)
    with pytest.raises(ValueError, match="no b"):
        average_linear_nonzeros([{"step": 0, "densities": {"a": 1.0}}], sizes, 10)


def test_study_result_splits_linear_and_other_parameters():
    sizes = {"a": 100, "b": 300}
    history = [{"step": 0, "densities": {"a": 1.0, "b": 1.0}}, {"step": 5, "densities": {"a": 0.5, "b": 0.5}}]
    row = study_result(StudyRun("magnitude", 0.5, 0), run_result(50.0, history=history), sizes, total_steps=10,
                       width=32, precision="fp32", setup_seconds=2.0)
    assert (row.linear_nonzeros, row.linear_params, row.other_params, row.nonzero_params) == (200, 400, 200, 400)
    assert row.average_params == 200 + (400 * 5 + 200 * 5) / 10 and row.wall_seconds == 12.0
    resumed = study_result(StudyRun("magnitude", 0.5, 0), run_result(50.0, history=history), sizes, total_steps=10,
                           width=32, precision="fp32", setup_seconds=2.0, resumed_from_step=4)
    assert resumed.train_seconds == 1000 / 100.0 and resumed.resumed_from_step == 4
    at_the_end = run_result(50.0, history=history)  # resumed at its last step: nothing trained, nothing timed
    at_the_end.tokens_per_second, at_the_end.train_seconds = 0.0, 0.01
    unmeasured = study_result(StudyRun("magnitude", 0.5, 0), at_the_end, sizes, total_steps=10, width=32,
                              precision="fp32", setup_seconds=2.0, resumed_from_step=10)
    assert unmeasured.tokens_per_second is unmeasured.train_seconds is unmeasured.wall_seconds is None
    group = aggregate([unmeasured, row])[0]
    assert group.tokens_per_second == 100.0 and group.wall_seconds == 12.0
    assert aggregate([unmeasured])[0].tokens_per_second is None and "| - " in format_study(aggregate([unmeasured]))


# ---- result files -----------------------------------------------------------------------------------------------------
def test_a_result_from_other_settings_is_refused(tmp_path):
    row = study_row("momentum", 0.1, 0, 110.0)
    write_result(str(tmp_path), row, {"training": {"max_steps": 10}})
    assert load_result(str(tmp_path), {"training": {"max_steps": 10}}) == row
    with pytest.raises(ValueError, match="max_steps"):
        load_result(str(tmp_path), {"training": {"max_steps": 20}})
    assert load_result(str(tmp_path / "missing"), {}) is None


def test_a_result_in_another_precision_names_the_flag_that_continues_it(tmp_path):
    row = study_row("momentum", 0.1, 0, 110.0)
    write_result(str(tmp_path), row, {"training": {"precision": "bf16"}})
    with pytest.raises(ValueError, match="precision='bf16' but this study has training.precision='fp32'; to continue "
                                         "this study here add --bf16 true"):
        load_result(str(tmp_path), {"training": {"precision": "fp32"}})


def test_a_setting_added_later_is_read_at_its_old_value_from_older_files(tmp_path):
    row = study_row("momentum", 0.1, 0, 110.0)
    write_result(str(tmp_path), row, {"sparsity": {"density": 0.1}, "training": {"max_steps": 10}})
    added = {"sparsity.regrown_state": "reset"}
    ours = {"sparsity": {"density": 0.1, "regrown_state": "reset"}, "training": {"max_steps": 10}}
    assert load_result(str(tmp_path), ours, added) == row
    with pytest.raises(ValueError, match="regrown_state"):  # the old file was trained with the old value
        load_result(str(tmp_path), {**ours, "sparsity": {"density": 0.1, "regrown_state": "keep"}}, added)
    with pytest.raises(ValueError, match="regrown_state"):  # without being told, a missing key is a difference
        load_result(str(tmp_path), ours)
    write_result(str(tmp_path), row, {"sparsity": None, "training": {"max_steps": 10}})  # dense: no sparsity section
    assert load_result(str(tmp_path), {"sparsity": None, "training": {"max_steps": 10}}, added) == row
    top = {"new_setting": None}  # a top-level setting: None for the runs it does not concern
    assert load_result(str(tmp_path), {"sparsity": None, "training": {"max_steps": 10}, "new_setting": None}, top) == row
    with pytest.raises(ValueError, match="new_setting=None but this study has new_setting='on'"):
        load_result(str(tmp_path), {"sparsity": None, "training": {"max_steps": 10}, "new_setting": "on"}, top)
