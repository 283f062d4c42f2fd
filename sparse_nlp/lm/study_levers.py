"""Levers on sparse momentum: one setting changed at a time, each a measured row beside the study's own rows.

    for lever in LEVERS: ...train sparse momentum with lever.flags (recipes/study_levers.py)
    write_levers(rows, load_groups("runs/study_lm"), "runs/study_levers", density=0.05)   # levers.json, levers.md

The levers are the ones the paper and its successors name: the initial per-layer density (ERK), when topology
updates stop, how much each update prunes and how often, how momentum is read from AdamW, and the optimizer state
a regrown weight starts with. Each lever's row is compared with the study's sparse momentum at the same density
(mean over its seeds) and with static, SET, small-dense and dense there.
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from sparse_nlp.config import DENSE
from sparse_nlp.lm.reporting import aligned_table
from sparse_nlp.lm.study import SMALL_DENSE, StudyResult


@dataclass(frozen=True)
class Lever:
    name: str  # also its run folder
    flags: tuple[str, ...]  # study_lm flags that set it
    change: str  # what it changes, against the study's default


LEVERS = (
    Lever("erk", ("--distribution", "erk"), "initial per-layer density by ERK (RigL) instead of uniform"),
    Lever("end-0.75", ("--update_end_fraction", "0.75"), "topology updates stop at 75% of training (RigL), not 100%"),
    Lever("prune-0.3", ("--prune_rate", "0.3"), "first update prunes 30% (RigL's drop fraction), not 50%"),
    Lever("interval-200", ("--update_interval", "200"), "an update every 200 steps (7 in all), not every 100 (15)"),
    Lever("adam-raw", ("--adam_momentum", "raw"), "momentum read as AdamW's exp_avg, not exp_avg / sqrt(exp_avg_sq)"),
    Lever("regrown-keep", ("--regrown_state", "keep"),
          "regrown weights keep the AdamW state gathered while absent, not zeroed"),
    Lever("regrown-fresh", ("--regrown_state", "fresh"),
          "regrown weights zero AdamW's exp_avg but keep exp_avg_sq (the gradient scale), not both zeroed"),
)
LEVERS_BY_NAME = {lever.name: lever for lever in LEVERS}
REFERENCES = (("momentum", "sparse momentum (study default)"), ("static", "static"), ("set", "SET"),
              (SMALL_DENSE, "small-dense"), (DENSE, "dense"))


def get_levers(names: Sequence[str]) -> list[Lever]:
    unknown = [n for n in names if n not in LEVERS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown lever {unknown[0]!r}; known levers: {', '.join(LEVERS_BY_NAME)}.")
    return [LEVERS_BY_NAME[n] for n in names]


@dataclass
class LeverRow:
    lever: str
    change: str
    flags: list[str]
    seeds: list[int]
    val_perplexity: float  # mean over seeds
    test_perplexity: Optional[float]
    tokens_per_second: Optional[float]


def lever_row(lever: Lever, results: Sequence[StudyResult]) -> LeverRow:
    if not results:
        raise ValueError(f"lever {lever.name} has no finished run.")
    tests = [r.test_perplexity for r in results if r.test_perplexity is not None]
    speeds = [r.tokens_per_second for r in results if r.tokens_per_second is not None]
    return LeverRow(
        lever=lever.name, change=lever.change, flags=list(lever.flags), seeds=sorted(r.seed for r in results),
        val_perplexity=statistics.mean(r.val_perplexity for r in results),
        test_perplexity=statistics.mean(tests) if tests else None,
        tokens_per_second=statistics.mean(speeds) if speeds else None,
    )


def load_groups(study_dir: str) -> list[dict]:
    """The groups of a finished (or partly finished) study: its study.json's "groups"."""
    path = os.path.join(study_dir, "study.json")
    if not os.path.isfile(path):
        raise ValueError(f"no study results at {path}: run recipes/study_lm.py first, or give --baseline_dir.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)["groups"]


def reference_groups(groups: Sequence[dict], density: float) -> dict[str, dict]:
    """The study's fine-grained rows at ``density`` (and dense), by method."""
    found = {}
    for g in groups:
        if g["block_size"] == 1 and (g["method"] == DENSE or abs(g["density"] - density) < 1e-9):
            found[g["method"]] = g
    return found


def _versus(value: float, reference: Optional[dict]) -> str:
    if reference is None:
        return "-"
    return f"{100 * (value / reference['val_perplexity'] - 1):+.1f}%"


def format_levers(rows: Sequence[LeverRow], groups: Sequence[dict], density: float) -> str:
    refs = reference_groups(groups, density)
    momentum = refs.get("momentum")
    header = ["setting", "seeds", "val ppl", "vs momentum", "vs static", "vs SET", "vs dense", "test ppl"]
    table = [header]
    for method, label in REFERENCES:
        g = refs.get(method)
        if g is None:
            continue
        sd = g.get("val_perplexity_sd")
        val = f"{g['val_perplexity']:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")
        test = "-" if g.get("test_perplexity") is None else f"{g['test_perplexity']:.2f}"
        table.append([label, str(len(g["seeds"])), val, _versus(g["val_perplexity"], momentum),
                      _versus(g["val_perplexity"], refs.get("static")), _versus(g["val_perplexity"], refs.get("set")),
                      _versus(g["val_perplexity"], refs.get(DENSE)), test])
    for row in rows:
        test = "-" if row.test_perplexity is None else f"{row.test_perplexity:.2f}"
        table.append([f"momentum, {row.change}", str(len(row.seeds)), f"{row.val_perplexity:.2f}",
                      _versus(row.val_perplexity, momentum), _versus(row.val_perplexity, refs.get("static")),
                      _versus(row.val_perplexity, refs.get("set")), _versus(row.val_perplexity, refs.get(DENSE)), test])
    lines = [
        f"# Levers on sparse momentum at density {density:g}", "",
        "One setting changed at a time (flags in levers.json); the first rows are the study's own, means (± sample "
        "standard deviation) over their seeds. vs X: validation perplexity against X's (negative: better).", "",
        aligned_table(table), "",
    ]
    return "\n".join(lines)


def write_levers(rows: Sequence[LeverRow], groups: Sequence[dict], output_dir: str, density: float) -> list[str]:
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, "levers.json"), os.path.join(output_dir, "levers.md")]
    refs = reference_groups(groups, density)
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump({"density": density, "levers": [asdict(r) for r in rows], "references": refs}, f, indent=1)
        f.write("\n")
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(format_levers(rows, groups, density))
    return paths
