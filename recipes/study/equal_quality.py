"""Dense at equal quality: which dense model matches each sparse-wide model's perplexity, read off a curve of dense
models of the same shape at several widths, and the effective-size multiplier that says.

    python recipes/study_equal_quality.py --dense runs/dense_widths/w320 runs/dense_widths/w384 \\
        docs/results/study/dense-s0 --sparse docs/results/study_wider/w512 docs/results/study_wider/w1024 \\
        --output_dir docs/results/study_equal_quality

Dense runs are averaged per width (seeds); the curve is validation perplexity against nonzeros on log-log axes,
interpolated linearly between neighbouring widths (never extrapolated: a sparse model outside the dense range is
reported as such). For each sparse-wide model (its seeds averaged) the dense nonzeros at its perplexity, counted both
in linear weights and in all parameters, give the multiplier: dense nonzeros needed / sparse nonzeros.
Writes equal_quality.md, equal_quality.json and equal_quality.png (perplexity against nonzeros, both counts).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from sparse_nlp.lm.reporting import aligned_table
from study.compare import load_runs
from study.grid import StudyResult

PLOT_FILE = "equal_quality.png"


@dataclass
class ModelPoint:
    """One model (its seeds averaged): what it holds and how well it does."""

    name: str
    width: int
    density: float  # of its linear layers
    linear_nonzeros: float
    total_nonzeros: float
    val_perplexity: float
    val_spread: Optional[float]  # sample standard deviation over seeds (None for one seed)
    seeds: int
    method: str


@dataclass
class Match:
    """A sparse-wide model and the dense model of equal validation perplexity on the dense curve."""

    sparse: ModelPoint
    dense_linear_nonzeros: Optional[float]  # None: outside the dense curve's range
    dense_total_nonzeros: Optional[float]
    dense_width: Optional[float]  # the interpolated width, for orientation (heads = width / 64 do not interpolate)

    @property
    def linear_multiplier(self) -> Optional[float]:
        return None if self.dense_linear_nonzeros is None else self.dense_linear_nonzeros / self.sparse.linear_nonzeros

    @property
    def total_multiplier(self) -> Optional[float]:
        return None if self.dense_total_nonzeros is None else self.dense_total_nonzeros / self.sparse.total_nonzeros


def model_points(runs: Sequence[StudyResult]) -> list[ModelPoint]:
    """Runs grouped by (method, width, density, block size): one point per model, seeds averaged."""
    groups: dict[tuple, list[StudyResult]] = {}
    for run in runs:
        groups.setdefault((run.method, run.width, run.density, run.block_size), []).append(run)
    points = []
    for (method, width, density, block_size), group in groups.items():
        ppl = [r.val_perplexity for r in group]
        block = f", block {block_size}" if block_size > 1 else ""
        name = "dense" if method == "dense" else f"{method}{block}, density {density:g}"
        points.append(ModelPoint(
            name=f"{name}, width {width}", width=width, density=density,
            linear_nonzeros=statistics.mean(r.linear_nonzeros for r in group),
            total_nonzeros=statistics.mean(r.nonzero_params for r in group),
            val_perplexity=statistics.mean(ppl), val_spread=statistics.stdev(ppl) if len(ppl) > 1 else None,
            seeds=len(group), method=method))
    return sorted(points, key=lambda p: (p.method, p.width, p.density))


def interpolate_log(xs: Sequence[float], ys: Sequence[float], y: float) -> Optional[float]:
    """x at which the piecewise log-log linear curve through (xs, ys) reaches y; None outside its range. The curve is
    read in the order of xs; a perplexity that falls with size has exactly one crossing."""
    pairs = sorted(zip(xs, ys))
    for (x0, y0), (x1, y1) in zip(pairs, pairs[1:]):
        if min(y0, y1) <= y <= max(y0, y1):
            if y0 == y1:
                return x0
            t = (math.log(y) - math.log(y0)) / (math.log(y1) - math.log(y0))
            return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
    return None


def match_dense(sparse: ModelPoint, dense: Sequence[ModelPoint]) -> Match:
    ppl = [d.val_perplexity for d in dense]
    return Match(
        sparse=sparse,
        dense_linear_nonzeros=interpolate_log([d.linear_nonzeros for d in dense], ppl, sparse.val_perplexity),
        dense_total_nonzeros=interpolate_log([d.total_nonzeros for d in dense], ppl, sparse.val_perplexity),
        dense_width=interpolate_log([d.width for d in dense], ppl, sparse.val_perplexity),
    )


def _ppl(point: ModelPoint) -> str:
    spread = f" ± {point.val_spread:.2f}" if point.val_spread is not None else ""
    return f"{point.val_perplexity:.2f}{spread} ({point.seeds} seed{'s' if point.seeds > 1 else ''})"


def _millions(value: Optional[float]) -> str:
    return "outside the dense range" if value is None else f"{value / 1e6:.2f}M"


def _times(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_report(dense: Sequence[ModelPoint], matches: Sequence[Match]) -> str:
    curve = aligned_table([["dense model", "width", "linear nonzeros", "total nonzeros", "val ppl"]] + [
        [d.name, str(d.width), _millions(d.linear_nonzeros), _millions(d.total_nonzeros), _ppl(d)] for d in dense])
    table = aligned_table([["sparse-wide model", "linear nonzeros", "total nonzeros", "val ppl",
                            "dense width at equal ppl", "dense linear / sparse", "dense total / sparse"]] + [
        [m.sparse.name, _millions(m.sparse.linear_nonzeros), _millions(m.sparse.total_nonzeros), _ppl(m.sparse),
         "-" if m.dense_width is None else f"{m.dense_width:.0f}", _times(m.linear_multiplier),
         _times(m.total_multiplier)] for m in matches])
    return (f"# Dense at equal quality\n\nThe dense curve:\n\n{curve}\n\nEach sparse-wide model against the dense model "
            "of its validation perplexity (log-log interpolation on nonzeros between neighbouring dense widths):\n\n"
            f"{table}\n")


def write_plot(dense: Sequence[ModelPoint], sparse: Sequence[ModelPoint], path: str) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.6), layout="constrained")
    for axes, attribute, label in zip(figure.subplots(1, 2), ("linear_nonzeros", "total_nonzeros"),
                                      ("nonzero linear weights", "all nonzero parameters")):
        axes.plot([getattr(d, attribute) for d in dense], [d.val_perplexity for d in dense], "o-", color="C1",
                  label="dense, widths " + ", ".join(str(d.width) for d in dense))
        for i, point in enumerate(sparse):
            axes.errorbar(getattr(point, attribute), point.val_perplexity, yerr=point.val_spread or 0, fmt="s",
                          color=f"C{(i + 2) % 10}", capsize=3, label=point.name)
        axes.set(xscale="log", yscale="log", xlabel=label, ylabel="validation perplexity",
                 title=f"Perplexity against {label}")
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize="small")
    figure.savefig(path, dpi=110)
    return path


def main(argv: Optional[Sequence[str]] = None) -> list[Match]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", nargs="+", required=True, help="Finished dense runs or study folders.")
    parser.add_argument("--sparse", nargs="+", required=True, help="Finished sparse-wide runs or study folders.")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    dense = [p for p in model_points([run for _, run in load_runs(args.dense)]) if p.method == "dense"]
    sparse = [p for p in model_points([run for _, run in load_runs(args.sparse)]) if p.method != "dense"]
    if len(dense) < 2 or not sparse:
        raise SystemExit("error: need dense runs at two widths or more, and one sparse run or more.")
    dense.sort(key=lambda p: p.total_nonzeros)
    matches = [match_dense(point, dense) for point in sparse]
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "equal_quality.json"), "w", encoding="utf-8") as f:
        json.dump({"dense": [asdict(d) for d in dense],
                   "matches": [{**asdict(m), "linear_multiplier": m.linear_multiplier,
                                "total_multiplier": m.total_multiplier} for m in matches]}, f, indent=1)
        f.write("\n")
    report = format_report(dense, matches)
    with open(os.path.join(args.output_dir, "equal_quality.md"), "w", encoding="utf-8") as f:
        f.write(report)
    write_plot(dense, sparse, os.path.join(args.output_dir, PLOT_FILE))
    print(report)
    return matches
