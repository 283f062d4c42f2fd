"""Levers: one setting changed at a time, each a measured row beside the study's own rows.

    for lever in LEVERS: ...train lever.method with lever.flags (recipes/study_levers.py)
    write_levers(rows, load_groups("runs/study_lm"), "runs/study_levers", density=0.05)   # levers.json, levers.md

Most levers change one setting of sparse momentum, the ones the paper and its successors name: the initial per-layer
density (ERK), when topology updates stop, how much each update prunes and how often, how momentum is read from
AdamW, the optimizer state a regrown weight starts with, and the learning rate (tuned on dense). Two run a baseline
at its own paper's settings instead of the study's (``rigl-own``, ``set-own``). Each lever's row is compared with the
study's row of its own method at the same density (mean over its seeds), and with sparse momentum, static, SET,
small-dense and dense there.
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from sparse_nlp.config import DENSE
from sparse_nlp.lm.reporting import aligned_table
from study.grid import OWN_SETTINGS, RIGL_OWN, SET_OWN, SMALL_DENSE, StudyResult


def _flags(settings: dict) -> tuple[str, ...]:
    return tuple(part for key, value in settings.items() for part in (f"--{key}", str(value)))


@dataclass(frozen=True)
class Lever:
    name: str  # also its run folder
    flags: tuple[str, ...]  # study_lm flags that set it
    change: str  # what it changes, against the study's default
    method: str = "momentum"  # the sparsity method it trains; compared with the study's row of that method


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
    # The study's peak 1e-3 was tuned on dense only.
    Lever("lr-x0.5", ("--learning_rate", "5e-4"), "peak learning rate 5e-4 (x0.5), not 1e-3"),
    Lever("lr-x2", ("--learning_rate", "2e-3"), "peak learning rate 2e-3 (x2), not 1e-3"),
    # The baselines at their own papers' settings: the study's rigl_own / set_own references (study.OWN_SETTINGS).
    Lever("rigl-own", _flags(OWN_SETTINGS[RIGL_OWN]),
          "its paper's settings: drop fraction 0.3, updates end at 75%, ERK (study: 0.5, 100%, uniform)", "rigl"),
    Lever("set-own", _flags(OWN_SETTINGS[SET_OWN]),
          "its paper's settings: zeta 0.3 constant, ERK (study: 0.5 decayed by cosine, uniform)", "set"),
)
LEVERS_BY_NAME = {lever.name: lever for lever in LEVERS}
REFERENCES = (("momentum", "sparse momentum (study default)"), ("rigl", "RigL (study settings)"), ("static", "static"),
              ("set", "SET (study settings)"), (SMALL_DENSE, "small-dense"), (DENSE, "dense"))
METHOD_LABELS = {"momentum": "momentum", "rigl": "RigL", "set": "SET"}  # a lever row's prefix


def get_levers(names: Sequence[str]) -> list[Lever]:
    unknown = [n for n in names if n not in LEVERS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown lever {unknown[0]!r}; known levers: {', '.join(LEVERS_BY_NAME)}.")
    return [LEVERS_BY_NAME[n] for n in names]


@dataclass
class LeverRow:
    lever: str
    method: str
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
        lever=lever.name, method=lever.method, change=lever.change, flags=list(lever.flags),
        seeds=sorted(r.seed for r in results),
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

    def versus(value: float, own: Optional[str]) -> list[str]:
        """vs the lever's own method's study row ("-" on the study's rows), then vs each fixed reference."""
        return [_versus(value, refs.get(own)) if own else "-"] + [
            _versus(value, refs.get(m)) for m in ("momentum", "rigl", "static", "set", DENSE)]

    header = ["setting", "seeds", "val ppl", "vs own method", "vs momentum", "vs RigL", "vs static", "vs SET",
              "vs dense", "test ppl"]
    table = [header]
    for method, label in REFERENCES:
        g = refs.get(method)
        if g is None:
            continue
        sd = g.get("val_perplexity_sd")
        val = f"{g['val_perplexity']:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")
        test = "-" if g.get("test_perplexity") is None else f"{g['test_perplexity']:.2f}"
        table.append([label, str(len(g["seeds"])), val, *versus(g["val_perplexity"], None), test])
    for row in rows:
        test = "-" if row.test_perplexity is None else f"{row.test_perplexity:.2f}"
        label = f"{METHOD_LABELS.get(row.method, row.method)}, {row.change}"
        table.append([label, str(len(row.seeds)), f"{row.val_perplexity:.2f}",
                      *versus(row.val_perplexity, row.method), test])
    lines = [
        f"# Levers at density {density:g}", "",
        "One setting changed at a time (flags in levers.json): sparse momentum's, or a baseline run at its own paper's "
        "settings. The first rows are the study's own, means (± sample standard deviation) over their seeds. vs X: "
        "validation perplexity against X's (negative: better); vs own method: against the study's row of the lever's "
        "method at the study's settings (sparse momentum for a momentum lever).", "",
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
