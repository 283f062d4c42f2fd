"""The study's tables: one row per run (study.json, study.csv) and per method and density over seeds (study.md).

    groups = aggregate(results)                       # mean and spread of each (method, block size, density) over seeds
    write_study(results, "runs/study_lm", notes)      # study.json, study.csv, study.md

The spread is the sample standard deviation over seeds (None for a single seed); study.md writes
``mean ± sd`` and the number of seeds beside it. A group's tokens/s is the mean over its runs trained on a quiet
machine (``other_load`` at most ``machine_load.QUIET_SHARE``); where every run shared the cores with other work,
the table marks the figure "(busy)" and the speed plot leaves it out.
"""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, fields
from typing import Optional, Sequence

from sparse_nlp.config import DENSE
from sparse_nlp.lm.machine_load import is_quiet
from sparse_nlp.lm.reporting import aligned_table, format_duration
from study.grid import MAGNITUDE_AVERAGE, RIGL_OWN, SET_OWN, SMALL_DENSE, SMALL_DENSE_TOTAL, StudyResult

HISTORIES = ("loss_history", "density_history", "validation_history")  # kept in study.json, not in the flat CSV
# Table labels of the references (other methods: their name); the equal-size references say what they match.
LABELS = {SMALL_DENSE: "small-dense", SMALL_DENSE_TOTAL: "small-dense (equal total)",
          MAGNITUDE_AVERAGE: "magnitude (equal average)", RIGL_OWN: "rigl (own settings)", SET_OWN: "set (own settings)"}
# What sparse momentum is compared with in the summary, in this order (those in the study).
VERSUS = ("static", "set", "set (own settings)", "small-dense", "small-dense (equal total)", "rigl",
          "rigl (own settings)", "magnitude", "magnitude (equal average)", "dense")
CSV_COLUMNS = tuple(f.name for f in fields(StudyResult) if f.name not in HISTORIES)


@dataclass
class StudyGroup:
    """The runs of one method, block size and density: means (and spreads) over their seeds."""

    method: str
    block_size: int
    density: float
    seeds: list[int]
    width: int
    linear_nonzeros: float
    other_params: float
    nonzero_params: float
    average_params: float
    val_perplexity: float
    val_perplexity_sd: Optional[float]  # sample standard deviation over seeds; None for one seed
    val_perplexity_min: float
    val_perplexity_max: float
    test_perplexity: Optional[float]
    test_perplexity_sd: Optional[float]
    tokens_per_second: Optional[float]  # over the runs whose speed was measured on a quiet machine (or all, if none)
    speed_on_busy_machine: bool  # every measured speed of the group had other processes busy on the cores
    wall_seconds: Optional[float]  # per run

    @property
    def label(self) -> str:
        if self.method in LABELS:
            return LABELS[self.method]
        return f"{self.method} (block {self.block_size})" if self.block_size > 1 else self.method


def _mean_of(values) -> Optional[float]:
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else None


def _sd(values: Sequence[float]) -> Optional[float]:
    return statistics.stdev(values) if len(values) > 1 else None


def aggregate(results: Sequence[StudyResult]) -> list[StudyGroup]:
    """One group per (method, block size, density), in the order they first appear."""
    keyed: dict[tuple, list[StudyResult]] = {}
    for result in results:
        keyed.setdefault((result.method, result.block_size, result.density), []).append(result)
    groups = []
    for (method, block_size, density), runs in keyed.items():
        val = [r.val_perplexity for r in runs]
        tests = [r.test_perplexity for r in runs if r.test_perplexity is not None]
        measured = [r for r in runs if r.tokens_per_second is not None]
        quiet = [r for r in measured if is_quiet(r.other_load) is not False]  # unknown load counts as quiet
        speeds = quiet or measured
        groups.append(StudyGroup(
            method=method, block_size=block_size, density=density, seeds=sorted(r.seed for r in runs),
            width=runs[0].width, linear_nonzeros=statistics.mean(r.linear_nonzeros for r in runs),
            other_params=statistics.mean(r.other_params for r in runs),
            nonzero_params=statistics.mean(r.nonzero_params for r in runs),
            average_params=statistics.mean(r.average_params for r in runs),
            val_perplexity=statistics.mean(val), val_perplexity_sd=_sd(val), val_perplexity_min=min(val),
            val_perplexity_max=max(val), test_perplexity=statistics.mean(tests) if tests else None,
            test_perplexity_sd=_sd(tests), tokens_per_second=_mean_of(r.tokens_per_second for r in speeds),
            speed_on_busy_machine=bool(speeds) and speeds is measured,
            wall_seconds=_mean_of(r.wall_seconds for r in runs),
        ))
    return groups


# ---- files ----------------------------------------------------------------------------------------------------
def write_study(results: Sequence[StudyResult], output_dir: str, notes: Sequence[str] = ()) -> list[str]:
    """Write study.json (runs with their histories, groups, notes), study.csv (one row per run) and study.md."""
    os.makedirs(output_dir, exist_ok=True)
    groups = aggregate(results)
    paths = [os.path.join(output_dir, f"study.{ext}") for ext in ("json", "csv", "md")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump({"runs": [asdict(r) for r in results], "groups": [asdict(g) for g in groups], "notes": list(notes)},
                  f, indent=1)
        f.write("\n")
    with open(paths[1], "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    with open(paths[2], "w", encoding="utf-8") as f:
        f.write(format_study(groups, notes))
    return paths


def format_study(groups: Sequence[StudyGroup], notes: Sequence[str] = ()) -> str:
    """study.md: one table per density (dense first), methods as rows, each a mean over its seeds."""
    dense = next((g for g in groups if g.method == DENSE), None)
    lines = ["# The NLP-gap study", ""] + [f"{note}\n" for note in notes]
    if any(g.method != DENSE for g in groups):
        lines += ["## Summary", "", format_summary(groups), ""]
    if dense is not None:
        lines += ["## Dense (the full model)", "", _group_table([dense], dense), ""]
    for density in sorted({g.density for g in groups if g.method != DENSE}, reverse=True):
        lines += [f"## Density {density:g}", "", _group_table([g for g in groups if g.density == density and
                                                              g.method != DENSE], dense), ""]
    return "\n".join(lines)


def format_summary(groups: Sequence[StudyGroup]) -> str:
    """Validation perplexity, methods by density (mean ± sd over seeds; the seed count where there are several),
    then sparse momentum against each reference at each density (negative: momentum is better)."""
    densities = sorted({g.density for g in groups if g.method != DENSE}, reverse=True)
    dense = next((g for g in groups if g.method == DENSE), None)
    labels = list(dict.fromkeys(g.label for g in groups))
    by_cell = {(g.label, g.density): g for g in groups}
    rows = [["validation perplexity"] + [f"density {d:g}" for d in densities]]
    for label in labels:
        cells = []
        for density in densities:
            g = dense if dense is not None and label == dense.label else by_cell.get((label, density))
            if g is None:
                cells.append("-")
            else:
                seeds = f" ({len(g.seeds)} seeds)" if len(g.seeds) > 1 else ""
                cells.append(_mean_sd(g.val_perplexity, g.val_perplexity_sd) + seeds)
        rows.append([label + (" (density 1)" if dense is not None and label == dense.label else "")] + cells)
    text = aligned_table(rows)
    momentum = {d: by_cell.get(("momentum", d)) for d in densities}
    if not any(momentum.values()):
        return text
    references = [label for label in VERSUS if label in labels]
    versus = [["sparse momentum vs"] + [f"density {d:g}" for d in densities]]
    for label in references:
        cells = []
        for density in densities:
            ours = momentum[density]
            theirs = dense if label == "dense" else by_cell.get((label, density))
            cells.append("-" if ours is None or theirs is None else
                         f"{100 * (ours.val_perplexity / theirs.val_perplexity - 1):+.1f}%")
        versus.append([label] + cells)
    return text + "\n\n" + aligned_table(versus)


HEADER = ("method", "seeds", "width", "linear nonzeros", "embeddings etc.", "total nonzeros", "average params",
          "val ppl", "vs dense", "test ppl", "tokens/s", "wall time per run")


def _group_table(groups: Sequence[StudyGroup], dense: Optional[StudyGroup]) -> str:
    rows = [list(HEADER)]
    for g in groups:
        same = math.isclose(g.average_params, g.nonzero_params, rel_tol=5e-3)
        rows.append([
            g.label, str(len(g.seeds)), str(g.width), _count(g.linear_nonzeros), _count(g.other_params),
            _count(g.nonzero_params), "= final" if same else _count(g.average_params),
            _mean_sd(g.val_perplexity, g.val_perplexity_sd),
            _versus(g.val_perplexity, dense), _mean_sd(g.test_perplexity, g.test_perplexity_sd),
            "-" if g.tokens_per_second is None else f"{g.tokens_per_second:,.0f}" + (" (busy)" if g.speed_on_busy_machine else ""),
            "-" if g.wall_seconds is None else format_duration(g.wall_seconds),
        ])
    return aligned_table(rows)


def _count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _mean_sd(mean: Optional[float], sd: Optional[float]) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"


def _versus(value: float, dense: Optional[StudyGroup]) -> str:
    if dense is None:
        return "-"
    return f"{100 * (value / dense.val_perplexity - 1):+.1f}%"
