"""Finished runs of different studies side by side: another width, another step budget, another setting.

    runs = load_runs(["docs/results/study/dense-s0", "runs/study_wider_w512"])   # run folders or study folders
    write_comparison(runs, "docs/results/study_wider", title="Wider and sparser")    # comparison.md / .json (+ curves)

The study's own tables (``study.tables``) average the seeds of one method, block size and density, which is right
inside one grid and wrong across grids (a 6,400-step run is not another seed of a 1,600-step one). Here each run
is one row (with the folder of the study it came from), compared with the first row (the baseline): its width, steps, nonzero weights, perplexity, speed and time,
and whether its speed was measured on a quiet machine. With matplotlib, ``comparison.png`` draws each run's
perplexity against its training time (``time_plot``), and runs evaluated during training also go into
``study_curves.png`` (``curve_plot``).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, fields
from typing import Optional, Sequence

from sparse_nlp.lm.machine_load import is_quiet
from sparse_nlp.lm.reporting import aligned_table, format_duration
from study.grid import RESULT_FILE, StudyResult


def load_runs(paths: Sequence[str]) -> list[tuple[str, StudyResult]]:
    """(study folder name, run) of the finished runs under ``paths``, in the order given (a study folder: its runs
    by name)."""
    runs = []
    for path in paths:
        files = ([os.path.join(path, RESULT_FILE)] if os.path.isfile(os.path.join(path, RESULT_FILE))
                 else sorted(glob.glob(os.path.join(path, "*", RESULT_FILE))))
        if not files:
            raise ValueError(f"no finished run at {path} (no {RESULT_FILE} in it or in its folders).")
        known = {f.name for f in fields(StudyResult)}
        for file in files:
            with open(file, encoding="utf-8") as f:
                saved = json.load(f)["result"]
            study = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(file))))
            runs.append((study, StudyResult(**{k: v for k, v in saved.items() if k in known})))
    return runs


def _steps(run: StudyResult) -> int:
    history = run.loss_history or run.validation_history
    return int(history[-1][0]) if history else 0


def format_comparison(runs: Sequence[tuple[str, StudyResult]], title: str, notes: Sequence[str] = ()) -> str:
    base = runs[0][1]
    header = ["study", "run", "width", "steps", "linear nonzeros", "total nonzeros", "val ppl", "vs the first", "test ppl",
              "tokens/s", "train time"]
    rows = [header]
    for study, run in runs:
        quiet = is_quiet(run.other_load)
        speed = "-" if run.tokens_per_second is None else f"{run.tokens_per_second:,.0f}" + (
            " (busy)" if quiet is False else "")
        rows.append([
            study, run.name, str(run.width), f"{_steps(run):,}", f"{run.linear_nonzeros:,}", f"{run.nonzero_params:,}",
            f"{run.val_perplexity:.2f}", f"{100 * (run.val_perplexity / base.val_perplexity - 1):+.1f}%",
            "-" if run.test_perplexity is None else f"{run.test_perplexity:.2f}", speed,
            "-" if run.train_seconds is None else format_duration(run.train_seconds),
        ])
    lines = [f"# {title}", ""] + [f"{note}\n" for note in notes] + [aligned_table(rows), ""]
    lines.append("tokens/s marked (busy): other processes used more than 5% of the cores while it trained.")
    return "\n".join(lines) + "\n"


def write_comparison(runs: Sequence[tuple[str, StudyResult]], output_dir: str, title: str,
                     notes: Sequence[str] = ()) -> list[str]:
    if not runs:
        raise ValueError("no runs to compare.")
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, "comparison.json"), os.path.join(output_dir, "comparison.md")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump({"title": title, "notes": list(notes), "runs": [{"study": study, **asdict(r)} for study, r in runs]},
                  f, indent=1)
        f.write("\n")
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(format_comparison(runs, title, notes))
    if any(r.train_seconds is not None for _, r in runs):
        from study.time_plot import TIME_PLOT_FILE, write_time_plot

        paths.append(write_time_plot(runs, os.path.join(output_dir, TIME_PLOT_FILE)))
    if any(r.validation_history for _, r in runs):
        from study.curve_plot import CURVES_FILE, write_validation_curves

        paths.append(write_validation_curves([r for _, r in runs], os.path.join(output_dir, CURVES_FILE)))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
    import argparse

    parser = argparse.ArgumentParser(description="Finished study runs side by side (the first is the baseline).")
    parser.add_argument("runs", nargs="+", help="Run folders (with study_result.json) or study folders.")
    parser.add_argument("--output_dir", required=True, help="Where comparison.md / .json (and the plots) go.")
    parser.add_argument("--title", default="Runs compared", help="The table's title.")
    parser.add_argument("--note", action="append", default=[], help="A line of text above the table (repeatable).")
    args = parser.parse_args(argv)
    try:
        paths = write_comparison(load_runs(args.runs), args.output_dir, args.title, args.note)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(open(paths[1], encoding="utf-8").read() + f"Written: {', '.join(paths)}.")
    return paths


if __name__ == "__main__":
    main()
