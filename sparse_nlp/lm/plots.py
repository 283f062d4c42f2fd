"""The training picture of a recipe run: loss and validation perplexity of every run against steps and against
training seconds, and per-layer density of each sparse run over training.

    write_training_plot(results, "runs/train_lm/training.png")   # a PNG

matplotlib (a dependency) is imported here, when a plot is drawn. The figure is built without pyplot, so no backend
is chosen and no global state is touched (it renders with Agg).
"""
from __future__ import annotations

import math
from typing import Sequence

from sparse_nlp.architectures import is_attention_layer
from sparse_nlp.integrations.console import short_layer_names
from sparse_nlp.lm.reporting import RunResult

PANELS = [["loss_step", "loss_time", "density"], ["ppl_step", "ppl_time", "density"]]


def _label(result: RunResult) -> str:
    path = "" if result.compute_path in ("dense", "masked dense") else f", {result.compute_path.split(':')[0]}"
    return f"{result.run} ({result.method}{path}, density {result.density:.2f})"


def write_training_plot(results: Sequence[RunResult], path: str) -> str:
    """Top: training loss against optimizer steps and against training seconds. Bottom: validation perplexity
    (evaluations during training) against the same. Right: per-layer density of each sparse run (attention layers
    solid blue, MLP layers dashed orange; darker = deeper). One colour per run across panels. Returns ``path``."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(16, 7.5), layout="constrained")
    axes = figure.subplot_mosaic(PANELS, width_ratios=[1, 1, 1.15])
    last_step = 0
    for i, result in enumerate(results):
        style = dict(color=f"C{i}", label=_label(result))
        curve = result.loss_curve or [(step, None, loss) for step, loss in result.loss_history]
        if curve:
            axes["loss_step"].plot([p[0] for p in curve], [p[2] for p in curve], marker=".", **style)
            timed = [p for p in curve if p[1] is not None]
            axes["loss_time"].plot([p[1] for p in timed], [p[2] for p in timed], marker=".", **style)
            last_step = max(last_step, curve[-1][0])
        validation = result.validation_history
        if validation:
            axes["ppl_step"].plot([p[0] for p in validation], [p[2] for p in validation], marker="o", **style)
            timed = [p for p in validation if p[1] is not None]
            axes["ppl_time"].plot([p[1] for p in timed], [p[2] for p in timed], marker="o", **style)
    axes["loss_step"].set(title="Training loss", xlabel="optimizer step", ylabel="loss")
    axes["loss_time"].set(title="Training loss against training time", xlabel="training seconds (evaluations "
                          "left out)", ylabel="loss")
    axes["ppl_step"].set(title="Validation perplexity during training", xlabel="optimizer step",
                         ylabel="perplexity", yscale="log")
    axes["ppl_time"].set(title="Validation perplexity against training time", xlabel="training seconds",
                         ylabel="perplexity", yscale="log")
    for name in ("loss_step", "loss_time", "ppl_step", "ppl_time"):
        axes[name].grid(alpha=0.3)
        if axes[name].lines:
            axes[name].legend(fontsize="small")
        else:
            axes[name].text(0.5, 0.5, "no evaluation during training (--eval_strategy steps)" if "ppl" in name
                            else "no training loss logged", ha="center", va="center",
                            transform=axes[name].transAxes)
    density_axes = axes["density"]
    sparse_runs = [result for result in results if result.density_history]
    for result in sparse_runs:
        plot_densities(density_axes, result, last_step, with_run_name=len(sparse_runs) > 1)
    if not sparse_runs:
        density_axes.text(0.5, 0.5, "no sparse run", ha="center", va="center", transform=density_axes.transAxes)
    density_axes.set(title="Per-layer density (sparse run)", xlabel="optimizer step", ylabel="density")
    density_axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)
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
