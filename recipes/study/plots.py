"""The study's three plots, as PNG files.

    write_study_plots(results, "runs/study_lm")   # the paths written; ImportError (saying how) without matplotlib

- ``study_perplexity.png``: validation perplexity against density, one line per method (mean over seeds, error
  bars one standard deviation), the dense model as a horizontal line and small-dense as a dashed reference line;
- ``study_layer_density.png``: sparse momentum's per-layer density over training (the run at ``layer_density``,
  0.1 by default, first seed) and each layer's final density by depth: which layers gain weights, attention or
  MLP, early or late;
- ``study_speed.png``: training tokens/s against density, fine-grained against block-sparse, dense as a line;
- ``study_curves.png``, when runs were evaluated during training: validation perplexity against steps and training
  time (``study.curve_plot``).

matplotlib is optional (``pip install -e ".[plot]"``) and imported only here, when a plot is drawn; the figures are
built without pyplot (no backend is chosen, no global state touched: they render with Agg).
"""
from __future__ import annotations

import os
import re
from typing import Sequence

from sparse_nlp.architectures import is_attention_layer
from sparse_nlp.config import DENSE
from sparse_nlp.lm.plots import plot_densities
from study.curve_plot import CURVES_FILE, write_validation_curves
from study.grid import StudyResult
from study.tables import StudyGroup, aggregate

PLOT_FILES = ("study_perplexity.png", "study_layer_density.png", "study_speed.png")


def write_study_plots(results: Sequence[StudyResult], output_dir: str, layer_density: float = 0.1) -> list[str]:
    """Draw the three plots into ``output_dir``; return their paths (a plot without data says so in its figure)."""
    from matplotlib.figure import Figure
    groups = aggregate(results)
    paths = [os.path.join(output_dir, name) for name in PLOT_FILES]
    for path, draw in zip(paths, (_perplexity, _layer_density, _speed)):
        figure = Figure(figsize=(12, 4.8) if draw is _layer_density else (7, 4.8), layout="constrained")
        draw(figure, groups, results, layer_density)
        figure.savefig(path, dpi=110)
    if any(r.validation_history for r in results):  # evaluated during training (--eval_strategy steps)
        paths.append(write_validation_curves(results, os.path.join(output_dir, CURVES_FILE)))
    return paths


def _lines(groups: Sequence[StudyGroup]) -> dict[str, list[StudyGroup]]:
    """Groups by label (method and block size), each sorted by density; dense left out."""
    lines: dict[str, list[StudyGroup]] = {}
    for group in groups:
        if group.method != DENSE:
            lines.setdefault(group.label, []).append(group)
    return {label: sorted(members, key=lambda g: g.density) for label, members in lines.items()}


def _density_axis(axes, groups: Sequence[StudyGroup]) -> None:
    axes.set_xscale("log")
    densities = sorted({g.density for g in groups if g.method != DENSE})
    if densities:
        axes.set_xticks(densities, labels=[f"{d:g}" for d in densities])
        axes.set_xticks([], minor=True)
        axes.set_xlim(densities[-1] * 1.25, densities[0] / 1.25)  # sparser to the right
    axes.set_xlabel("density of the linear layers (log scale; references: the density they match)")
    axes.grid(alpha=0.3, which="both")


def _perplexity(figure, groups, results, layer_density) -> None:
    axes = figure.subplots()
    for label, members in _lines(groups).items():
        x = [g.density for g in members]
        y = [g.val_perplexity for g in members]
        spread = [g.val_perplexity_sd or 0.0 for g in members]
        style = {"small-dense": dict(color="black", linestyle="--"),
                 "small-dense (equal total)": dict(color="dimgray", linestyle="-.")}.get(label, {})
        axes.errorbar(x, y, yerr=spread, marker="o", capsize=3, label=label, **style)
    dense = [g for g in groups if g.method == DENSE]
    if dense:
        level, spread = dense[0].val_perplexity, dense[0].val_perplexity_sd or 0.0
        axes.axhline(level, color="gray", linewidth=1.5, label=f"dense ({level:.1f})")
        if spread:
            axes.axhspan(level - spread, level + spread, color="gray", alpha=0.15)
    if not groups:
        axes.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=axes.transAxes)
    _density_axis(axes, groups)
    axes.set(title="Validation perplexity (mean over seeds, ± 1 sd)", ylabel="validation perplexity")
    axes.legend(fontsize="small")


def _layer_density(figure, groups, results, layer_density) -> None:
    over_time, by_depth = figure.subplots(1, 2)
    wanted = [r for r in results if r.method == "momentum" and r.block_size == 1 and r.density == layer_density]
    if not wanted or not wanted[0].density_history:
        for axes in (over_time, by_depth):
            axes.text(0.5, 0.5, f"no sparse momentum run at density {layer_density:g}", ha="center", va="center",
                      transform=axes.transAxes)
        return
    run = min(wanted, key=lambda r: r.seed)
    last_step = run.loss_history[-1][0] if run.loss_history else run.density_history[-1]["step"]
    plot_densities(over_time, run.run_result(), last_step, with_run_name=False)
    over_time.axhline(layer_density, color="gray", linewidth=1, linestyle=":")
    over_time.set(title=f"Sparse momentum, density {layer_density:g}: per-layer density", xlabel="optimizer step",
                  ylabel="density")
    over_time.grid(alpha=0.3)
    final = run.density_history[-1]["densities"]
    kinds: dict[str, dict[int, float]] = {}  # layer kind (e.g. attn.c_attn) -> depth -> final density
    for name, density in final.items():
        match = re.search(r"\.(\d+)\.(.+)$", name)
        depth, kind = (int(match.group(1)), match.group(2)) if match else (0, name)
        kinds.setdefault(kind, {})[depth] = density
    for kind, by_layer in kinds.items():
        depths = sorted(by_layer)
        style = "-" if is_attention_layer(kind) else "--"
        by_depth.plot(depths, [by_layer[d] for d in depths], style, marker="o", label=kind)
    by_depth.axhline(layer_density, color="gray", linewidth=1, linestyle=":", label="uniform start")
    by_depth.set(title="Final density by depth (solid: attention, dashed: MLP)", xlabel="block (0 = first)",
                 ylabel="density")
    by_depth.set_xticks(sorted({d for by_layer in kinds.values() for d in by_layer}))
    by_depth.grid(alpha=0.3)
    by_depth.legend(fontsize="small")


def _speed(figure, groups, results, layer_density) -> None:
    axes = figure.subplots()
    for label, members in _lines(groups).items():
        if label.startswith("small-dense"):  # dense models, not a sparse path's speed
            continue
        block = members[0].block_size > 1
        members = [g for g in members if g.tokens_per_second is not None and not g.speed_on_busy_machine]
        axes.plot([g.density for g in members], [g.tokens_per_second for g in members], marker="s" if block else "o",
                  linestyle="-" if block else ":", label=label)
    dense = [g for g in groups if g.method == DENSE and g.tokens_per_second is not None and not g.speed_on_busy_machine]
    if dense:
        axes.axhline(dense[0].tokens_per_second, color="gray", linewidth=1.5, label="dense")
    _density_axis(axes, groups)
    axes.set(title="Training speed: fine-grained (masked dense) vs block-sparse", ylabel="tokens/s")
    axes.legend(fontsize="small")
