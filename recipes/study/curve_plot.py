"""Validation perplexity during training, against optimizer steps and against training time, one line per run.

    write_validation_curves(results, "runs/study_long/study_curves.png")   # StudyResults with a validation_history

The runs' ``validation_history`` comes from evaluations the Trainer ran during training (``--eval_strategy steps
--eval_steps N``): exp of the mean token loss over the validation split's packed sequences, so its last point sits
a little above the sliding-window perplexity the tables give. Time is training time on the machine that ran it
(evaluations left out; ``sparse_nlp.lm.training_clock``). matplotlib is imported here only.
"""
from __future__ import annotations

from typing import Sequence

CURVES_FILE = "study_curves.png"


def write_validation_curves(results: Sequence, path: str) -> str:
    """Draw every result that has a validation history; return ``path``. ValueError when none has one."""
    from matplotlib.figure import Figure
    runs = [r for r in results if r.validation_history]
    if not runs:
        raise ValueError("no run has a validation history: train with --eval_strategy steps --eval_steps N.")
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    by_step, by_time = figure.subplots(1, 2, sharey=True)
    for run in sorted(runs, key=lambda r: r.name):
        steps = [point[0] for point in run.validation_history]
        perplexities = [point[2] for point in run.validation_history]
        line, = by_step.plot(steps, perplexities, marker="o", markersize=3, label=run.name)
        timed = [(point[1], point[2]) for point in run.validation_history if point[1] is not None]
        if timed:
            by_time.plot([seconds / 60 for seconds, _ in timed], [p for _, p in timed], marker="o", markersize=3,
                         color=line.get_color(), label=run.name)
    low = min(point[2] for r in runs for point in r.validation_history)
    for axes in (by_step, by_time):
        axes.set_yscale("log")
        axes.set_ylim(low * 0.95, low * 3)  # the early, very high points are off the top
        axes.grid(alpha=0.3, which="both")
    by_step.set(title="Validation perplexity during training", xlabel="optimizer step",
                ylabel="validation perplexity (log scale)")
    by_time.set(title="... against training time on the machine that ran it", xlabel="training minutes")
    by_step.legend(fontsize="small")
    figure.savefig(path, dpi=110)
    return path
