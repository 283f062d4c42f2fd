"""Dense at equal quality: the dense width whose perplexity each sparse-wide model matches, and the effective-size
multiplier (dense nonzeros needed / sparse nonzeros), from finished study runs. recipes/study/equal_quality.py says
how; docs/study.md ("Dense at equal quality") has the result.

    python recipes/study_equal_quality.py --dense runs/dense_widths/w320 runs/dense_widths/w384 \\
        docs/results/study/dense-s0 docs/results/study/dense-s1 \\
        --sparse docs/results/study_wider/w512 docs/results/study_wider/w1024 --output_dir docs/results/study_equal_quality
"""
from __future__ import annotations

import sys

from study.equal_quality import main

if __name__ == "__main__":
    main(sys.argv[1:])
