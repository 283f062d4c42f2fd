"""The study's recipe (recipes/study_lm.py, recipes/study/runner.py): each reference trains with its own rule, the
committed results still load, and a killed study resumes without redoing finished runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import TrainerCallback

from sparse_nlp.lm import training
from study import runner
from study.grid import RESULT_FILE, StudyRun, load_result
from study_helpers import STUDY_CONFIG, count_trained_runs, study_flags

ROOT = Path(__file__).resolve().parent.parent


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


# ---- the recipe end to end: a killed study resumes without redoing finished runs --------------------------------------
class _Killed(Exception):
    pass


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
    flags = study_flags(tmp_path)
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

    trained.clear()  # a third start: nothing to do
    capsys.readouterr()
    runner.main(flags)
    printed = capsys.readouterr().out
    assert trained == [] and "dense-s0 (finished before, skipped): val ppl" in printed
    with pytest.raises(SystemExit, match="training.max_steps=4 but this study has training.max_steps=6"):  # other settings: refused, not mixed into the table
        runner.main(flags + ["--max_steps", "6"])
    assert os.path.isfile(study / "study.json")


def test_the_equal_size_references_run_through_the_recipe(tmp_path):
    flags = study_flags(tmp_path, "--methods", "momentum", "small_dense_total", "magnitude_average", "--densities", "0.25")
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
