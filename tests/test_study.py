"""The NLP-gap study: grid, small-dense width rule, average parameters, aggregation, plots, and resume end to end."""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
from transformers import GPT2Config, TrainerCallback

from sparse_nlp.lm import training
from sparse_nlp.lm.reporting import RunResult
from study import runner
from study.grid import (
    RESULT_FILE,
    StudyResult,
    StudyRun,
    average_linear_nonzeros,
    load_result,
    plan_grid,
    study_result,
    write_result,
)
from study.small_dense import (
    linear_layer_sizes,
    linear_weight_count,
    parameter_count,
    small_dense_shape,
    sparse_nonzeros,
    with_width,
)
from study.tables import aggregate, format_study, format_summary, write_study

ROOT = Path(__file__).resolve().parent.parent


# ---- grid ------------------------------------------------------------------------------------------------------
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


# ---- small-dense width rule ----------------------------------------------------------------------------------------
STUDY_CONFIG = GPT2Config(vocab_size=2048, n_layer=4, n_embd=256, n_head=4, n_positions=128, bos_token_id=0,
                          eos_token_id=0)


def test_linear_weights_are_the_layers_sparsify_patches():
    assert linear_weight_count(STUDY_CONFIG) == 4 * 12 * 256 * 256  # c_attn 3d^2, c_proj d^2, MLP 8d^2; no LM head
    assert len(linear_layer_sizes(STUDY_CONFIG)) == 16


@pytest.mark.parametrize("density,width,heads", [(0.2, 112, 2), (0.1, 80, 1), (0.05, 56, 1)])
def test_small_dense_width_is_the_closest_multiple_of_8(density, width, heads):
    shape = small_dense_shape(STUDY_CONFIG, density)
    assert shape == {"n_embd": width, "n_head": heads}
    target = density * linear_weight_count(STUDY_CONFIG)
    gap = abs(linear_weight_count(with_width(STUDY_CONFIG, width)) - target)
    for other in range(8, 257, 8):  # no other multiple of 8 comes closer
        assert abs(linear_weight_count(with_width(STUDY_CONFIG, other)) - target) >= gap


@pytest.mark.parametrize("density,width,gap", [(0.2, 136, -0.0075), (0.1, 112, -0.038), (0.05, 104, 0.032)])
def test_small_dense_total_holds_as_many_parameters_as_the_sparse_models_nonzeros(density, width, gap):
    # The sparse model: density x 3.15M linear weights + 571K dense (embeddings, norms, biases); the linear-matched
    # small-dense model holds 1.41x / 1.82x / 2.64x fewer. The total-matched one: within half a width step of 8.
    target = sparse_nonzeros(STUDY_CONFIG, density)
    assert target == pytest.approx(density * 3_145_728 + 570_880)  # as the study rows count them
    narrow = small_dense_shape(STUDY_CONFIG, density)
    assert target / parameter_count(GPT2Config(**{**STUDY_CONFIG.to_dict(), **narrow})) == pytest.approx(
        {0.2: 1.41, 0.1: 1.82, 0.05: 2.64}[density], abs=0.005)
    shape = small_dense_shape(STUDY_CONFIG, density, match="total")
    assert shape == {"n_embd": width, "n_head": 2}
    total = parameter_count(with_width(STUDY_CONFIG, width))
    assert total / target - 1 == pytest.approx(gap, abs=0.001)
    step = (parameter_count(with_width(STUDY_CONFIG, width + 8)) - parameter_count(with_width(STUDY_CONFIG, width - 8)))
    assert abs(total - target) <= step / 4  # half of one width step (the mean of the steps either side)
    for other in range(8, 257, 8):
        assert abs(parameter_count(with_width(STUDY_CONFIG, other)) - target) >= abs(total - target)
    with pytest.raises(ValueError, match="choose linear or total"):
        small_dense_shape(STUDY_CONFIG, density, match="embeddings")


def test_small_dense_keeps_head_size_and_scales_a_fixed_mlp_width():
    config = GPT2Config(vocab_size=300, n_layer=2, n_embd=512, n_head=8, n_inner=1024, bos_token_id=0, eos_token_id=0)
    shape = small_dense_shape(config, 0.25)
    assert shape["n_embd"] % shape["n_head"] == 0 and shape["n_embd"] // shape["n_head"] == 64
    assert shape["n_inner"] == round(1024 * shape["n_embd"] / 512)
    narrow = GPT2Config(**{**config.to_dict(), **shape})
    assert linear_weight_count(narrow) == pytest.approx(0.25 * linear_weight_count(config), rel=0.1)


# ---- rows and aggregation ------------------------------------------------------------------------------------------
def test_average_parameters_integrate_the_density_history():
    sizes = {"a": 100, "b": 300}
    history = [{"step": 0, "densities": {"a": 1.0, "b": 1.0}}, {"step": 5, "densities": {"a": 0.5, "b": 0.1}}]
    assert average_linear_nonzeros(history, sizes, 10) == pytest.approx((400 * 5 + 80 * 5) / 10)
    with pytest.raises(ValueError, match="no b"):
        average_linear_nonzeros([{"step": 0, "densities": {"a": 1.0}}], sizes, 10)


def _run_result(ppl: float, density: float = 0.5, history=()) -> RunResult:
    return RunResult(run="x", method="magnitude", density=density, nonzero_params=200 + round(400 * density),
                     total_params=600, val_perplexity=ppl, test_perplexity=ppl + 1, train_tokens=1000,
                     tokens_per_second=100.0, train_seconds=10.0, density_history=list(history))


def test_study_result_splits_linear_and_other_parameters():
    sizes = {"a": 100, "b": 300}
    history = [{"step": 0, "densities": {"a": 1.0, "b": 1.0}}, {"step": 5, "densities": {"a": 0.5, "b": 0.5}}]
    row = study_result(StudyRun("magnitude", 0.5, 0), _run_result(50.0, history=history), sizes, total_steps=10,
                       width=32, precision="fp32", setup_seconds=2.0)
    assert (row.linear_nonzeros, row.linear_params, row.other_params, row.nonzero_params) == (200, 400, 200, 400)
    assert row.average_params == 200 + (400 * 5 + 200 * 5) / 10 and row.wall_seconds == 12.0
    resumed = study_result(StudyRun("magnitude", 0.5, 0), _run_result(50.0, history=history), sizes, total_steps=10,
                           width=32, precision="fp32", setup_seconds=2.0, resumed_from_step=4)
    assert resumed.train_seconds == 1000 / 100.0 and resumed.resumed_from_step == 4
    at_the_end = _run_result(50.0, history=history)  # resumed at its last step: nothing trained, nothing timed
    at_the_end.tokens_per_second, at_the_end.train_seconds = 0.0, 0.01
    unmeasured = study_result(StudyRun("magnitude", 0.5, 0), at_the_end, sizes, total_steps=10, width=32,
                              precision="fp32", setup_seconds=2.0, resumed_from_step=10)
    assert unmeasured.tokens_per_second is unmeasured.train_seconds is unmeasured.wall_seconds is None
    group = aggregate([unmeasured, row])[0]
    assert group.tokens_per_second == 100.0 and group.wall_seconds == 12.0
    assert aggregate([unmeasured])[0].tokens_per_second is None and "| - " in format_study(aggregate([unmeasured]))


def _row(method: str, density: float, seed: int, ppl: float, block_size: int = 1) -> StudyResult:
    run = StudyRun(method, density, seed, block_size)
    return study_result(run, _run_result(ppl, density), {"a": 100, "b": 300}, total_steps=10, width=32,
                        precision="bf16", setup_seconds=1.0)


def test_aggregation_gives_mean_and_spread_over_seeds(tmp_path):
    rows = [_row("dense", 1.0, 0, 100.0), _row("momentum", 0.1, 0, 110.0), _row("momentum", 0.1, 1, 114.0),
            _row("static", 0.1, 0, 120.0), _row("momentum", 0.1, 0, 130.0, block_size=64)]
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
    rows = [_row("dense", 1.0, 0, 100.0), _row("small_dense", 0.1, 0, 140.0), _row("small_dense_total", 0.1, 0, 125.0),
            _row("momentum", 0.1, 0, 110.0), _row("magnitude", 0.1, 0, 105.0), _row("magnitude_average", 0.1, 0, 115.0)]
    groups = aggregate(rows)
    assert [g.label for g in groups] == ["dense", "small-dense", "small-dense (equal total)", "momentum", "magnitude",
                                         "magnitude (equal average)"]
    summary = [[cell.strip() for cell in line.split("|")[1:-1]] for line in format_summary(groups).splitlines()]
    versus = summary[summary.index(["sparse momentum vs", "density 0.1"]):]
    assert versus[2:] == [["small-dense", "-21.4%"], ["small-dense (equal total)", "-12.0%"], ["magnitude", "+4.8%"],
                          ["magnitude (equal average)", "-4.3%"], ["dense", "+10.0%"]]
    table = format_study(groups)
    assert "| total nonzeros |" in table and "| small-dense (equal total) |" in table


def test_the_references_train_with_their_rules_and_the_committed_results_still_load():
    model_args, data_args, options, study, training_args = runner.parse_args(["--bf16", "true", "--use_cpu", "true"])

    def prepared(run):
        model_args_of_run, config, sparsity, args = runner.prepare_run(run, model_args, STUDY_CONFIG, options, study,
                                                                         training_args)
        return config, sparsity, runner.run_settings(run, model_args_of_run, data_args, sparsity, args)

    config, sparsity, settings = prepared(StudyRun("small_dense_total", 0.1, 0))
    assert (config.n_embd, config.n_head, sparsity.method, settings["sparsity"]) == (112, 2, "dense", None)
    assert settings["model"]["config_overrides"] == "n_embd=112,n_head=2"
    _, sparsity, settings = prepared(StudyRun("magnitude_average", 0.1, 0))
    assert (sparsity.method, round(sparsity.initial_density, 4), round(sparsity.density, 4)) == ("magnitude", 0.2825,
                                                                                                 0.0282)
    assert settings["sparsity"]["initial_density"] == sparsity.initial_density and settings["sparse_clip"] == "active"
    _, sparsity, _ = prepared(StudyRun("rigl_own", 0.1, 0))
    assert (sparsity.method, sparsity.prune_rate, sparsity.update_end_fraction, sparsity.distribution) == (
        "rigl", 0.3, 0.75, "erk")
    _, sparsity, _ = prepared(StudyRun("set_own", 0.1, 0))
    assert (sparsity.method, sparsity.prune_rate, sparsity.prune_rate_decay) == ("set", 0.3, "constant")
    # every committed result of the study (written before these references existed) loads with today's settings
    committed = sorted((ROOT / "docs" / "results" / "study").glob(f"*/{RESULT_FILE}"))
    assert len(committed) >= 31
    for path in committed:
        saved = json.loads(path.read_text())["result"]
        run = StudyRun(saved["method"], saved["density"], saved["seed"], saved["block_size"])
        assert load_result(str(path.parent), prepared(run)[2], runner.ADDED_SETTINGS).name == run.name


def test_plots_without_matplotlib_say_how_to_get_them(tmp_path, monkeypatch):
    from study.plots import write_study_plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[plot\]".*study_perplexity\.png'):
        write_study_plots([_row("dense", 1.0, 0, 100.0)], str(tmp_path))


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from study.plots import write_study_plots

    history = [{"step": 0, "densities": {"transformer.h.0.attn.c_attn": 0.1, "transformer.h.0.mlp.c_fc": 0.1}},
               {"step": 5, "densities": {"transformer.h.0.attn.c_attn": 0.2, "transformer.h.0.mlp.c_fc": 0.05}}]
    rows = [_row("dense", 1.0, 0, 100.0), _row("small_dense", 0.1, 0, 140.0), _row("momentum", 0.2, 0, 105.0),
            _row("momentum", 0.1, 1, 114.0), _row("momentum", 0.1, 0, 130.0, block_size=64)]
    rows.insert(3, StudyResult(**{**rows[3].__dict__, "seed": 0, "density_history": history,
                                  "loss_history": [[10, 3.0]]}))
    for path in write_study_plots(rows, str(tmp_path)):
        assert Path(path).read_bytes()[:4] == b"\x89PNG"


def test_a_result_from_other_settings_is_refused(tmp_path):
    row = _row("momentum", 0.1, 0, 110.0)
    write_result(str(tmp_path), row, {"training": {"max_steps": 10}})
    assert load_result(str(tmp_path), {"training": {"max_steps": 10}}) == row
    with pytest.raises(ValueError, match="max_steps"):
        load_result(str(tmp_path), {"training": {"max_steps": 20}})
    assert load_result(str(tmp_path / "missing"), {}) is None


def test_a_result_in_another_precision_names_the_flag_that_continues_it(tmp_path):
    row = _row("momentum", 0.1, 0, 110.0)
    write_result(str(tmp_path), row, {"training": {"precision": "bf16"}})
    with pytest.raises(ValueError, match="precision='bf16' but this study has training.precision='fp32'; to continue "
                                         "this study here add --bf16 true"):
        load_result(str(tmp_path), {"training": {"precision": "fp32"}})


def test_a_setting_added_later_is_read_at_its_old_value_from_older_files(tmp_path):
    row = _row("momentum", 0.1, 0, 110.0)
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


# ---- the recipe end to end: a killed study resumes without redoing finished runs ------------------------------------
WORDS = "the nation people congress year government states united new great war peace law public world".split()


def _write_text(path: Path, lines: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choices(WORDS, k=rng.randint(6, 14))) + "." for _ in range(lines)) + "\n")
    return path


class _Killed(Exception):
    pass


def _flags(tmp_path, *extra):
    train, valid = _write_text(tmp_path / "train.txt", 400, 0), _write_text(tmp_path / "valid.txt", 40, 1)
    return [
        "--output_dir", str(tmp_path / "study"), "--data_cache_dir", str(tmp_path / "cache"), "--train_file",
        str(train), "--validation_file", str(valid), "--config_overrides", "n_layer=1,n_embd=64,n_head=2",
        "--seq_length", "32", "--vocab_size", "300", "--max_steps", "4", "--update_interval", "2", "--save_steps", "2",
        "--logging_steps", "2", "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--bf16", "false",
        "--densities", "0.5", "--methods", "dense", "small_dense", "momentum", "--block_methods", "none",
        "--seeds", "0", *extra,
    ]


def count_trained_runs(monkeypatch) -> list[str]:
    """The names of the runs the recipe trains from now on (appended as each starts)."""
    trained, original_train_one = [], runner.train_one

    def counting_train_one(run, *args, **kwargs):
        trained.append(run)
        return original_train_one(run, *args, **kwargs)

    monkeypatch.setattr(runner, "train_one", counting_train_one)
    return trained


def test_a_killed_study_resumes_without_redoing_finished_runs(tmp_path, monkeypatch, capsys):
    trained = count_trained_runs(monkeypatch)

    class KillAtStep3(TrainerCallback):  # after the checkpoint at step 2, as a kill would
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3 and args.run_name.startswith("momentum"):
                raise _Killed()

    class KilledTrainer(training.SparseTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(KillAtStep3())

    monkeypatch.setattr(training, "SparseTrainer", KilledTrainer)
    flags = _flags(tmp_path)
    with pytest.raises(_Killed):
        runner.main(flags)
    study = tmp_path / "study"
    assert trained == ["dense-s0", "small_dense-d0.5-s0", "momentum-d0.5-s0"]
    finished = {name: (study / name / RESULT_FILE).stat().st_mtime_ns for name in ("dense-s0", "small_dense-d0.5-s0")}
    assert not (study / "momentum-d0.5-s0" / RESULT_FILE).exists()
    assert (study / "momentum-d0.5-s0" / "checkpoint-2").is_dir()
    (study / "study.md").unlink()
    tabulated = runner.main(flags + ["--tables_only", "true"])  # the finished runs' tables; nothing trains
    assert [r.name for r in tabulated] == list(finished) and trained == ["dense-s0", "small_dense-d0.5-s0",
                                                                          "momentum-d0.5-s0"]
    assert "small-dense" in (study / "study.md").read_text() and "left out of the tables" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no finished run of this grid"):
        runner.main(flags[:flags.index("--output_dir")] + ["--output_dir", str(tmp_path / "empty"), "--tables_only",
                                                             "true"] + flags[flags.index("--output_dir") + 2:])

    monkeypatch.setattr(training, "SparseTrainer", KilledTrainer.__mro__[1])  # no kill this time
    trained.clear()
    results = runner.main(flags)
    assert trained == ["momentum-d0.5-s0"]  # the finished runs were skipped, not retrained
    assert {name: (study / name / RESULT_FILE).stat().st_mtime_ns for name in finished} == finished
    momentum = results[-1]
    assert momentum.resumed_from_step == 2 and momentum.topology_updates == 1 and momentum.train_tokens == 4 * 4 * 32
    assert not list((study / "momentum-d0.5-s0").glob("checkpoint-*"))  # a finished run's checkpoints are removed
    small = results[1]
    assert small.width < 64 and small.linear_params == pytest.approx(0.5 * results[0].linear_params, rel=0.15)
    assert [r.name for r in results] == ["dense-s0", "small_dense-d0.5-s0", "momentum-d0.5-s0"]
    assert "## Density 0.5" in (study / "study.md").read_text()
    assert len((study / "study.csv").read_text().splitlines()) == 4

    trained.clear()  # a third start: nothing to do; without matplotlib it says how to get the plots
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    capsys.readouterr()
    runner.main(flags)
    printed = capsys.readouterr().out
    assert trained == [] and "dense-s0 (finished before, skipped): val ppl" in printed and 'pip install -e ".[plot]"' in printed
    with pytest.raises(SystemExit, match="training.max_steps=4 but this study has training.max_steps=6"):  # other settings: refused, not mixed into the table
        runner.main(flags + ["--max_steps", "6"])
    assert os.path.isfile(study / "study.json")


def test_the_equal_size_references_run_through_the_recipe(tmp_path):
    flags = _flags(tmp_path, "--methods", "momentum", "small_dense_total", "magnitude_average", "--densities", "0.25")
    momentum, total, magnitude = runner.main(flags)
    assert (total.name, magnitude.name) == ("small_dense_total-d0.25-s0", "magnitude_average-d0.25-s0")
    # n_layer=1, n_embd=64: the sparse model holds 12,288 linear + 22,208 other = 34,496 nonzeros; width 40 (the
    # closest multiple of 8: 32 holds 23,392, 48 holds 44,304) holds 33,080 in all
    assert (momentum.nonzero_params, total.width, total.nonzero_params, total.density) == (34_496, 40, 33_080, 0.25)
    # 4 steps, updates at 2 and 4: linear weights averaged over training equal 0.25 x the full model's, the final ones
    # fewer; the rows keep the density they match
    assert magnitude.average_params - magnitude.other_params == pytest.approx(0.25 * magnitude.linear_params, rel=1e-3)
    assert magnitude.linear_nonzeros < 0.25 * magnitude.linear_params and magnitude.density == 0.25
    table = (tmp_path / "study" / "study.md").read_text()
    assert "small-dense (equal total)" in table and "magnitude (equal average)" in table


def test_a_group_speed_comes_from_runs_on_a_quiet_machine():
    def timed(seed, speed, load):
        row = _row("momentum", 0.1, seed, 110.0)
        return StudyResult(**{**row.__dict__, "tokens_per_second": speed, "other_load": load})

    mixed = aggregate([timed(0, 50.0, 0.4), timed(1, 100.0, 0.01), timed(2, 120.0, None)])[0]
    assert mixed.tokens_per_second == 110.0 and not mixed.speed_on_busy_machine  # the busy run's 50 left out
    busy = aggregate([timed(0, 50.0, 0.4)])
    assert busy[0].tokens_per_second == 50.0 and busy[0].speed_on_busy_machine
    assert "50 (busy)" in format_study(busy)


def test_none_leaves_out_the_fine_grained_or_the_block_runs():
    *_, study, _ = runner.parse_args(["--methods", "none", "--block_methods", "momentum", "--output_dir", "x"])
    assert study.methods == [] and study.block_methods == ["momentum"]
    grid = plan_grid([0.2, 0.1], study.methods, [0], block_methods=study.block_methods, block_size=64)
    assert [run.name for run in grid] == ["momentum-b64-d0.2-s0", "momentum-b64-d0.1-s0"]
