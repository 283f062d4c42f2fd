"""Levers: the study's sparse momentum with one setting changed at a time, and baselines at their papers' settings.

    nohup accelerate launch recipes/study_levers.py > levers.log 2>&1 &     # 11 runs at density 0.05, ~1.5 h on
                                                                            # 2 CPU cores; run it again to resume
    accelerate launch recipes/study_levers.py --levers erk adam-raw --density 0.1 --seeds 0 1
    accelerate launch recipes/study_levers.py --levers rigl-own set-own lr-x0.5 lr-x2 --density 0.1 \\
        --output_dir runs/study_levers_d0.1

Each lever is one study (recipes/study_lm.py: the same model, tokens, budget and resume) of its method alone (sparse
momentum, or RigL / SET for rigl-own / set-own) in ``<output_dir>/<lever>``, with the lever's flags added
(study.levers.LEVERS lists them). At the end levers.json and levers.md set every lever's perplexity
beside the study's own rows at that density, read from ``--baseline_dir``'s study.json: its own method at the study's
settings, sparse momentum (the default settings), RigL, static, SET, small-dense and dense.
Any other flag goes to every lever's study unchanged (e.g. --max_steps, --config_overrides, TrainingArguments).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

# Large CPU tensors (the logits) on transparent huge pages, as recipes/train_lm.py: torch reads this once, at its first
# allocation, so it is set before torch is imported (by the imports below).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from transformers import HfArgumentParser  # noqa: E402

from study import runner  # noqa: E402
from study.levers import LEVERS, get_levers, lever_row, load_groups, write_levers  # noqa: E402


@dataclass
class LeverArguments:
    levers: list[str] = field(
        default_factory=lambda: [lever.name for lever in LEVERS],
        # (argparse formats help with %: the changes' percentages are escaped)
        metadata={"help": "Levers to train: " + ", ".join(f"{lever.name} ({lever.change})" for lever in LEVERS)
                  .replace("%", "%%")})
    density: float = field(default=0.05, metadata={"help": "Density of every lever's run."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds of every lever."})
    output_dir: str = field(default="runs/study_levers", metadata={"help": "One folder per lever, and the tables."})
    baseline_dir: str = field(
        default="runs/study_lm", metadata={"help": "The study whose rows the levers are compared with."})


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, passed_on = HfArgumentParser(LeverArguments).parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True)
        levers = get_levers(args.levers)
        groups = load_groups(args.baseline_dir)  # before hours of training: a missing baseline is an error now
    except ValueError as err:
        raise SystemExit(f"error: {str(err).strip().splitlines()[0]}") from None
    density, seeds = str(args.density), [str(s) for s in args.seeds]
    rows = []
    for i, lever in enumerate(levers, 1):
        print(f"Lever {i}/{len(levers)}: {lever.name}: {lever.change}", flush=True)
        results = runner.main(passed_on + list(lever.flags) + [
            "--methods", lever.method, "--block_methods", "none", "--densities", density, "--seeds", *seeds,
            "--seeded_methods", lever.method, "--seeded_densities", density,
            "--output_dir", os.path.join(args.output_dir, lever.name)])
        if is_main_process():
            rows.append(lever_row(lever, results))
            written = write_levers(rows, groups, args.output_dir, args.density)  # after each lever: nothing lost
    if is_main_process():
        print(open(written[1], encoding="utf-8").read())
        print(f"Written: {', '.join(written)}.")
    return rows


if __name__ == "__main__":
    main()
