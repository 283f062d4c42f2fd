"""The NLP-gap study: sparse momentum against every baseline and a small dense model, across densities, with seeds.

    nohup accelerate launch recipes/study_lm.py > study.log 2>&1 &          # the default grid (43 runs, ~6 h
                                                                             # on 2 CPU cores); again to resume
    accelerate launch recipes/study_lm.py --quick --output_dir /tmp/study   # smoke test: a tiny grid, minutes
    accelerate launch recipes/study_lm.py --densities 0.1 0.05 --methods dense momentum static --seeds 0 1 2 \\
        --seeded_methods momentum static --seeded_densities 0.1 0.05
    accelerate launch --num_processes 8 recipes/study_lm.py --dataset_name wikitext \\
        --dataset_config_name wikitext-103-raw-v1 --vocab_size 50257 --config_overrides n_layer=12,n_embd=768,n_head=12 \\
        --seq_length 1024 --max_steps 20000 --per_device_train_batch_size 16   # GPT-2-small (block runs: 1 process)

Each run is one call of ``sparse_nlp.lm.training.train_one`` (as recipes/train_lm.py's runs) on the same tokens,
steps and seed-determined batches:
- ``dense``: the full model; ``small_dense``: a narrower dense model with as many linear weights as the sparse ones
  at each density, ``small_dense_total`` one with as many parameters in all as the sparse model's nonzeros
  (embeddings included) (recipes/study/small_dense.py: width rule and weight counts);
- ``magnitude_average``: gradual magnitude pruning with as many linear weights averaged over training as the sparse
  runs (the cubic schedule scaled down: it starts and ends sparser; recipes/study/magnitude_budget.py);
- ``rigl_own``, ``set_own``: RigL and SET at their own papers' settings (``OWN_SETTINGS`` in recipes/study/grid.py);
- every sparsity method in ``--methods`` at every density, fine-grained; ``--block_methods`` block-sparse
  (``--study_block_size`` 64, fast block momentum);
- the further ``--seeds`` for ``--seeded_methods`` at ``--seeded_densities``.

A run writes ``<output_dir>/<run>/study_result.json`` when it has finished; starting the study again skips those and
resumes an unfinished run from its last checkpoint (``--save_steps``). After each run the tables are rewritten
(study.json, study.csv, study.md); at the end the plots (study_*.png, with matplotlib: pip install -e ".[plot]").

The default model is the training recipe's GPT-2 (4 layers, width 256) with its 2,048-token vocabulary, so that the
linear layers hold 85% of the weights (60% at 8,192: the dense token embedding held most of a sparse model's
nonzeros, and the model barely felt linear sparsity); 1,600 steps of 16 x 128 tokens (~1.2 epochs).
Flags: every StudyArguments field (recipes/study/runner.py), the training recipe's model and data flags, every
SparsityConfig field but density / method / block_size (the grid's), and every TrainingArguments field; --help lists
them.
"""
from __future__ import annotations

import os
import sys

# Large CPU tensors (the logits) on transparent huge pages, as recipes/train_lm.py: torch reads this once, at its first
# allocation, so it is set before torch is imported (by the import below).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from study.runner import main  # noqa: E402  (recipes/study/: the flags, the grid's loop, tables and plots)

if __name__ == "__main__":
    main(sys.argv[1:])
