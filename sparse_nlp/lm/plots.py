"""The training picture of a recipe run: training loss of every run, and per-layer density of the sparse run.

    write_training_plot(results, "runs/train_lm/training.png")   # a PNG; ImportError (saying how) without matplotlib

matplotlib is optional (``pip install -e ".[plot]"``) and imported only here, when a plot is drawn. The figure is
built without pyplot, so no backend is chosen and no global state is touched (it renders with Agg).
"""
from __future__ import annotations

import math
from typing import Sequence

from sparse_nlp.architectures import is_attention_layer
from sparse_nlp.integrations.console import short_layer_names
from sparse_nlp.lm.reporting import RunResult

INSTALL_HINT = 'pip install -e ".[plot]"'  # or: pip install matplotlib
def write_training_plot(results: Sequence[RunResult], path: str) -> str:
    """Left: training loss vs step, one line per run. Right: per-layer density vs step of each sparse run
    (attention layers solid blue, MLP layers dashed orange; darker = deeper). Returns ``path``."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"no training plot: matplotlib is not installed ({INSTALL_HINT} to get {path}).") from err
    figure = Figure(figsize=(13, 4.8), layout="constrained")
    loss_axes, density_axes = figure.subplots(1, 2)
    last_step = 0
    for result in results:
        if result.loss_history:
            steps, losses = zip(*result.loss_history)
            loss_axes.plot(steps, losses, marker=".", label=f"{result.run} ({result.method}, density {result.density:.2f})")
            last_step = max(last_step, steps[-1])
    loss_axes.set(title="Training loss", xlabel="optimizer step", ylabel="loss")
    loss_axes.grid(alpha=0.3)
    if any(result.loss_history for result in results):
        loss_axes.legend()
    sparse_runs = [result for result in results if result.density_history]
    for result in sparse_runs:
        plot_densities(density_axes, result, last_step, with_run_name=len(sparse_runs) > 1)
    if not sparse_runs:
        density_axes.text(0.5, 0.5, "no sparse run", ha="center", va="center", transform=density_axes.transAxes)
    density_axes.set(title="Per-layer density (sparse run)", xlabel="optimizer step", ylabel="density")
    density_axes.grid(alpha=0.3)
    figure.savefig(path, dpi=110)
    return path


def plot_densities(axes, result: RunResult, last_step: int, with_run_name: bool) -> None:
    from matplotlib import colormaps

    history = result.density_history
    steps = [record["step"] for record in history]
    if last_step > steps[-1]:  # the density holds after the last update: draw it to the end of training
        steps.append(last_step)
        history = list(history) + [history[-1]]
    names = list(history[0]["densities"])
    short = short_layer_names(names)
    attention = [name for name in names if is_attention_layer(name)]
    mlp = [name for name in names if not is_attention_layer(name)]
    for group, colormap, style in ((attention, "Blues", "-"), (mlp, "Oranges", "--")):
        shades = colormaps[colormap]
        for i, name in enumerate(group):
            densities = [record["densities"].get(name, math.nan) for record in history]
            label = f"{result.run}: {short[name]}" if with_run_name else short[name]
            color = shades(0.45 + 0.5 * i / max(1, len(group) - 1))
            axes.plot(steps, densities, linestyle=style, drawstyle="steps-post", color=color, label=label)
    axes.legend(fontsize="x-small", ncol=2 if len(names) > 8 else 1, loc="best")
