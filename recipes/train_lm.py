"""Train a sparse language model with sparse momentum, and a dense model of the same shape on the same tokens;
print their perplexities side by side.

    accelerate launch recipes/train_lm.py                                  # CPU-sized default: ~7 min on 2 cores
    accelerate launch recipes/train_lm.py --method rigl --density 0.1      # any method / density
    accelerate launch recipes/train_lm.py --train_file a.txt --validation_file b.txt
    accelerate launch recipes/train_lm.py --model_name_or_path gpt2 --max_steps 2000   # pretrained: magnitude mask
    accelerate launch --num_processes 8 recipes/train_lm.py --dataset_name wikitext \\
        --dataset_config_name wikitext-103-raw-v1 --config_overrides n_layer=12,n_embd=768,n_head=12 \\
        --seq_length 1024 --max_steps 20000 --per_device_train_batch_size 16 --bf16
    torchrun --standalone --nproc_per_node 2 recipes/train_lm.py --use_cpu    # DDP over gloo on CPUs
    accelerate launch --config_file recipes/accelerate_fsdp_config.yaml --num_processes 8 recipes/train_lm.py  # FSDP2

Flags: every field of the model, data and training arguments (sparse_nlp/lm/arguments.py), every `SparsityConfig`
field (its `seed` is `--seed`) and every `TrainingArguments` field (`--help` lists them). Each run is one call of
`sparse_nlp.lm.training.train_one`, seeded alike (the same initial weights and batches). Training prints one line per
topology update; per-layer densities go to the `--report_to` backends only. The table goes to stdout and to
results.json / results.md in --output_dir (with the loss curves and per-layer density histories), and training.png
plots them (with matplotlib: pip install -e ".[plot]"); each run keeps its checkpoints and its final model (a plain
transformers model, zeros included) in <output_dir>/<run>.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Optional

# Large CPU tensors (the logits) on transparent huge pages: torch reads this once, at its first allocation, so it is
# set before torch is imported (by the imports below). ~30 ms of 4 KiB page faults per 100 MB tensor otherwise.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from transformers import HfArgumentParser, TrainingArguments  # noqa: E402

from sparse_nlp import SparsityConfig  # noqa: E402
from sparse_nlp.config import DENSE  # noqa: E402
from sparse_nlp.lm.arguments import (  # noqa: E402
    DataArguments,
    LMTrainingArguments,
    ModelArguments,
    SparsityArguments,
    with_default_precision,
)
from sparse_nlp.lm.plots import write_training_plot  # noqa: E402
from sparse_nlp.lm.reporting import RunResult, comparison_line, format_table, write_results  # noqa: E402
from sparse_nlp.lm.speed import kernel_speed_settings, measure_kernel_speedup  # noqa: E402
from sparse_nlp.lm.training import build_model, prepare_data, train_one, use_all_cores  # noqa: E402
from sparse_nlp.lm.widening import widened_sparse_run  # noqa: E402


def parse_args(argv=None):
    # fp32 on a CPU-only machine (its block-sparse kernels compute in fp32; the same numbers on every CPU), bf16
    # autocast on a GPU with fast bf16; --bf16 true|false chooses.
    argv = with_default_precision(list(sys.argv[1:] if argv is None else argv), bf16_on_cpu=False)
    parser = HfArgumentParser((ModelArguments, DataArguments, SparsityArguments, LMTrainingArguments))
    model_args, data_args, sparsity_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    options = dataclasses.asdict(sparsity_args)
    if options["init"] is None:
        options["init"] = "magnitude" if model_args.model_name_or_path else "random"
    sparsity = SparsityConfig(**options, seed=training_args.seed)  # raises one-line ValueErrors
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:  # e.g. torchrun on a machine without GPUs
        raise ValueError(f"{launched} processes were launched but the Trainer set up no distributed training; "
                         "on CPUs add --use_cpu (DDP over gloo).")
    return model_args, data_args, sparsity, training_args


def warmup_warning(training_args: TrainingArguments) -> Optional[str]:
    """A line for a warm-up as long as the run or longer (the learning rate never reaches its peak), else None."""
    steps = training_args.max_steps
    if steps <= 0:  # a run in epochs: its length is known only once the data is
        return None
    warmup = training_args.get_warmup_steps(steps)
    if warmup < steps:
        return None
    last = training_args.learning_rate * (steps - 1) / warmup  # the Trainer's step k trains at lr * (k - 1) / warmup
    return (f"warning: --warmup_steps {training_args.warmup_steps:g} warms up for {warmup} steps but the run has "
            f"{steps} (--max_steps): the learning rate rises all run to {last:.2g}, not --learning_rate "
            f"{training_args.learning_rate:g}, and never decays; pass a fraction of the run (e.g. --warmup_steps 0.2) "
            "or fewer steps.")


def planned_runs(model_args, sparsity: SparsityConfig,
                 training_args: LMTrainingArguments) -> list[tuple[str, ModelArguments, SparsityConfig]]:
    """(run name, model flags, sparsity) of each run: the sparse model (widened by --width_multiplier), the same
    method fine-grained (--fine_grained_baseline, with a block-sparse run) and the dense model of the base shape."""
    dense = ("dense", model_args, dataclasses.replace(sparsity, method=DENSE, density=1.0, block_size=1))
    widened = model_args.width_multiplier != 1
    if sparsity.method == DENSE or (sparsity.density == 1.0 and not widened):
        if widened:
            raise ValueError("--width_multiplier widens the sparse run and --method dense trains none: set the dense "
                             "model's width with --config_overrides (e.g. n_embd=1024,n_head=16).")
        return [dense]
    sparse_args, sparse = widened_sparse_run(model_args, sparsity)  # raises one-line ValueErrors
    runs = [("sparse", sparse_args, sparse)]
    if training_args.fine_grained_baseline and sparse.block_size > 1:
        runs.append(("fine-grained", sparse_args, dataclasses.replace(sparse, block_size=1)))
    if training_args.dense_baseline:
        runs.append(dense)
    return runs


def kernel_speed_note(model_args, sparsity: SparsityConfig, training_args, tokenizer) -> Optional[str]:
    """For a fine-grained run, one line on what block-sparse kernels would gain on this model's layer shapes at the
    run's density (a few seconds); a block-sparse run's own tokens/s say it already."""
    if sparsity.method == DENSE or sparsity.density >= 1.0 or sparsity.block_size > 1:
        return None
    block_size = 64
    model = build_model(model_args, tokenizer).to(training_args.device)
    tokens, dtype = kernel_speed_settings(training_args.device,
                                          training_args.per_device_train_batch_size * model_args.seq_length,
                                          bf16=training_args.bf16, fp16=training_args.fp16)
    speed = measure_kernel_speedup(model, tokens, density=sparsity.density, block_size=block_size, repeats=7,
                                   dtype=dtype)
    return speed.describe() if speed is not None else None


def widening_note(model_args, runs) -> Optional[str]:
    """What --width_multiplier did, in one line, or None."""
    multiplier = model_args.width_multiplier
    if multiplier == 1 or runs[0][0] != "sparse":
        return None
    sparse = runs[0][2]
    return (f"--width_multiplier {multiplier:g}: the sparse model is {multiplier:g}x wider than the dense one, each of "
            f"its linear layers at density {sparse.density:.4g} (--density {sparse.density * multiplier ** 2:g} / "
            f"{multiplier:g}^2), so it holds --density x the dense model's linear weights.")


def run(model_args, data_args, sparsity, training_args) -> list[RunResult]:
    start = time.time()
    runs = planned_runs(model_args, sparsity, training_args)
    # the first run's model is the largest (widened): check memory and sequence length against it
    blocks, tokenizer = prepare_data(runs[0][1], data_args, training_args)
    results = []
    for name, run_args, config in runs:
        results.append(train_one(name, config, run_args, data_args, training_args, blocks, tokenizer, len(runs) == 1))
    if training_args.should_save:
        notes = [line for line in (comparison_line(results), widening_note(model_args, runs)) if line]
        notes.append(
            f"Same steps and tokens per run: {results[0].train_tokens:,} training tokens of {model_args.seq_length}-"
            f"token sequences; perplexity over sliding windows of {model_args.seq_length} tokens; train memory: "
            f"weights, gradients and optimizer state. Total wall time {time.time() - start:.0f} s.")
        speed = kernel_speed_note(runs[0][1], runs[0][2], training_args, tokenizer)
        if speed:
            notes.append(speed)
        json_path, md_path = write_results(results, training_args.output_dir, notes)
        written = [json_path, md_path, write_training_plot(results, os.path.join(training_args.output_dir,
                                                                                   "training.png"))]
        print("\n" + format_table(results) + "\n\n" + "\n".join(notes) + f"\nWritten to {', '.join(written[:-1])} and {written[-1]}.")
    return results


def main(argv=None) -> list[RunResult]:
    threads = use_all_cores()
    try:
        model_args, data_args, sparsity, training_args = parse_args(argv)
        if threads is not None and training_args.should_log:
            print(f"Training on the CPU with {threads} threads (accelerate launch had set OMP_NUM_THREADS=1).")
        warning = warmup_warning(training_args)
        if warning and training_args.process_index == 0:  # once per job, before any data or model is loaded
            print(warning, file=sys.stderr)
        return run(model_args, data_args, sparsity, training_args)
    except (ValueError, OSError) as err:  # bad input: one line, not a traceback
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise SystemExit(f"error: {lines[0]}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
