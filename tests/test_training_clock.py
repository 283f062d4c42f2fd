"""TrainingClock: training seconds on each log entry, evaluations left out, carried across a resume."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from sparse_nlp.lm.training_clock import TrainingClock, validation_curve


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _log(clock_callback, state, entry):
    state.log_history.append(dict(entry))  # as Trainer.log: the history gets a copy, then the callbacks run
    clock_callback.on_log(None, state, None, logs=dict(entry))


def test_entries_get_training_seconds_without_the_evaluations():
    time, state = FakeClock(), SimpleNamespace(log_history=[])
    clock = TrainingClock(clock=time)
    clock.on_train_begin(None, state, None)
    time.now += 10
    _log(clock, state, {"loss": 3.0, "step": 50})
    time.now += 10 + 4  # 10 s of training, then an evaluation of 4 s logged when it has finished
    _log(clock, state, {"eval_loss": 2.0, "eval_runtime": 4.0, "step": 100})
    time.now += 10
    _log(clock, state, {"loss": 2.5, "step": 150})
    assert [entry["train_seconds"] for entry in state.log_history] == [10.0, 20.0, 30.0]
    clock.on_train_end(None, state, None)
    _log(clock, state, {"eval_loss": 1.0, "eval_runtime": 1.0, "step": 150})  # after training: not stamped
    assert "train_seconds" not in state.log_history[-1]


def test_a_resumed_run_goes_on_from_its_checkpoints_last_stamp():
    time = FakeClock()
    state = SimpleNamespace(log_history=[{"loss": 3.0, "step": 50, "train_seconds": 12.5},
                                         {"eval_loss": 2.0, "step": 50, "train_seconds": 12.5}])
    clock = TrainingClock(clock=time)
    clock.on_train_begin(None, state, None)
    time.now += 7
    _log(clock, state, {"loss": 2.0, "step": 100})
    assert state.log_history[-1]["train_seconds"] == pytest.approx(19.5)


def test_validation_curve_is_the_evaluations_in_step_order_as_perplexity():
    history = [{"loss": 3.0, "step": 50}, {"eval_loss": 2.0, "step": 100, "train_seconds": 9.0},
               {"eval_loss": 1.0, "step": 50, "train_seconds": 4.0}]
    assert validation_curve(history) == [(50, 4.0, math.exp(1.0)), (100, 9.0, math.exp(2.0))]
    assert validation_curve([{"eval_loss": 1.5, "step": 3}]) == [(3, None, math.exp(1.5))]


def test_study_plots_add_the_curves_when_runs_were_evaluated_during_training(tmp_path):
    from dataclasses import replace

    from study.curve_plot import write_validation_curves
    from study.plots import write_study_plots
    from study_helpers import study_row

    plain = [study_row("dense", 1.0, 0, 100.0), study_row("momentum", 0.1, 0, 120.0)]
    (tmp_path / "plain").mkdir()
    (tmp_path / "evaluated").mkdir()
    assert not any(p.endswith("study_curves.png") for p in write_study_plots(plain, str(tmp_path / "plain")))
    with pytest.raises(ValueError, match="--eval_strategy steps"):
        write_validation_curves(plain, str(tmp_path / "none.png"))
    evaluated = [replace(plain[0], validation_history=[[400, 60.0, 150.0], [800, 121.0, 110.0]]),
                 replace(plain[1], validation_history=[[400, None, 170.0], [800, None, 130.0]])]
    paths = write_study_plots(evaluated, str(tmp_path / "evaluated"))
    assert paths[-1].endswith("study_curves.png") and open(paths[-1], "rb").read(4) == b"\x89PNG"
