"""Each compared run as one point: its final validation perplexity against its training time.

    write_time_plot(runs, "docs/results/study_wider/comparison.png")   # runs: (study, StudyResult) pairs

This is the equal-compute picture of a comparison: a run that sits lower at the same minutes is better for the same
training time on the machine that ran it. The perplexity is the tables' sliding-window one; the time is training
time (evaluations left out). A run timed while other work shared the machine (``other_load`` above 5% of the
cores) is drawn hollow, because its time is not its own. matplotlib is imported here only.
"""
from __future__ import annotations

from typing import Sequence

from sparse_nlp.lm.machine_load import is_quiet

TIME_PLOT_FILE = "comparison.png"


def write_time_plot(runs: Sequence, path: str) -> str:
    """Draw every (study, result) with a training time; return ``path``. ValueError when none has one."""
    from matplotlib.figure import Figure
    timed = [(study, run) for study, run in runs if run.train_seconds is not None]
    if not timed:
        raise ValueError("no run has a training time to plot.")
    figure = Figure(figsize=(9, 5.4), layout="constrained")
    axes = figure.subplots()
    colours = {study: f"C{i}" for i, study in enumerate(dict.fromkeys(s for s, _ in timed))}  # in the order given
    for index, (study, run) in enumerate(timed):
        minutes, perplexity = run.train_seconds / 60, run.val_perplexity
        busy = is_quiet(run.other_load) is False
        colour = colours[study]
        axes.plot([minutes], [perplexity], marker="o", markersize=7, linestyle="none", color=colour,
                  fillstyle="none" if busy else "full")
        # Labels alternate above and below their points, so that runs close together stay readable.
        axes.annotate(run.name + (" (busy)" if busy else ""), (minutes, perplexity), fontsize="small", color=colour,
                      xytext=(6, 4 if index % 2 == 0 else -11), textcoords="offset points")
    for study, colour in colours.items():
        axes.plot([], [], marker="o", linestyle="none", color=colour, label=study)
    axes.legend(title="study", fontsize="small")
    axes.set_yscale("log")
    axes.margins(x=0.25, y=0.08)  # room for the labels right of the points
    axes.grid(alpha=0.3, which="both")
    axes.set(title="Final validation perplexity against training time (hollow: timed on a busy machine)",
             xlabel="training minutes on the machine that ran it", ylabel="validation perplexity (log scale)")
    figure.savefig(path, dpi=110)
    return path
