"""Training time on every log entry, so that a curve can be drawn against wall time as well as steps.

    clock = TrainingClock(); trainer.add_callback(clock)
    ...
    clock.sitting_seconds, clock.total_seconds                  # after training: evaluations left out
    validation_curve(trainer.state.log_history)   # [(step, train_seconds, validation perplexity), ...]

``TrainingClock`` writes ``train_seconds`` into each entry of ``trainer.state.log_history`` as it is logged: seconds
spent training since step 0, evaluations left out. The history is part of every checkpoint, so a resumed run goes on
from its checkpoint's last stamped entry (save at a logging step and nothing is lost; the interrupted sitting's time
after that entry is not counted, and the steps it trained after the checkpoint are trained and timed again).
"""
from __future__ import annotations

import math
import time
from typing import Optional

from transformers import TrainerCallback

CLOCK_KEY = "train_seconds"


class TrainingClock(TrainerCallback):
    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._started: Optional[float] = None
        self._offset = 0.0  # seconds of earlier sittings (from the resumed checkpoint's history)
        self._evaluating = 0.0  # seconds spent in evaluations in this sitting
        self.sitting_seconds: Optional[float] = None  # training seconds of the last sitting, set when it ends
        self.total_seconds: Optional[float] = None  # the same with earlier sittings' (a resumed run)

    def on_train_begin(self, args, state, control, **kwargs):
        self._offset = max((entry[CLOCK_KEY] for entry in state.log_history if CLOCK_KEY in entry), default=0.0)
        self._evaluating = 0.0
        self._started = self._clock()

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer appends a copy of `logs` to the history before the callbacks see it: stamp that entry. An
        # evaluation's entry is logged when it has finished and carries its own duration (eval_runtime).
        if self._started is None or not state.log_history:
            return
        if logs and "eval_runtime" in logs:
            self._evaluating += float(logs["eval_runtime"])
        elapsed = self._clock() - self._started - self._evaluating
        state.log_history[-1][CLOCK_KEY] = round(self._offset + max(0.0, elapsed), 3)

    def on_train_end(self, args, state, control, **kwargs):
        if self._started is not None:
            self.sitting_seconds = max(0.0, self._clock() - self._started - self._evaluating)
            self.total_seconds = self._offset + self.sitting_seconds
        self._started = None  # evaluations after training are not training time


def validation_curve(log_history: list[dict]) -> list[tuple[int, Optional[float], float]]:
    """(step, training seconds or None, validation perplexity) of each evaluation the Trainer logged, in step order;
    the perplexity is exp(eval_loss), the mean token loss over the validation split's packed sequences."""
    curve = {}
    for entry in log_history:
        if "eval_loss" in entry:
            curve[entry["step"]] = (entry["step"], entry.get(CLOCK_KEY), math.exp(entry["eval_loss"]))
    return [curve[step] for step in sorted(curve)]
