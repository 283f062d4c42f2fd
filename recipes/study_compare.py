"""Finished runs of different studies side by side: one row per run against the first (the baseline).

    python recipes/study_compare.py runs/study_long docs/results/study/dense-s0 --output_dir docs/results/study_long \\
        --title "Longer training"

Writes comparison.md / comparison.json into --output_dir, and with matplotlib comparison.png (perplexity against
training time) and study_curves.png (runs evaluated during training). recipes/study/compare.py says more.
"""
from __future__ import annotations

import sys

from study.compare import main

if __name__ == "__main__":
    main(sys.argv[1:])
