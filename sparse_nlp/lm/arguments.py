"""The command-line flags of the language-model recipes, as dataclasses that HfArgumentParser reads.

    parser = HfArgumentParser((ModelArguments, DataArguments, SparsityArguments, LMTrainingArguments))
    model_args, data_args, sparsity_args, training_args = parser.parse_args_into_dataclasses(
        args=with_default_precision(sys.argv[1:]))

``SparsityArguments`` is every ``SparsityConfig`` field but those ``TrainingArguments`` owns (``seed``: one
``--seed`` for both), with the recipe's defaults; ``LMTrainingArguments`` is ``TrainingArguments`` with defaults for
training from scratch. recipes/train_lm.py parses them; the study's recipe subclasses them.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import TrainingArguments

from sparse_nlp import SparsityConfig
from sparse_nlp.lm.tokenizer import DEFAULT_VOCAB_SIZE
from sparse_nlp.precision import has_fast_bf16


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Pretrained model (hub id or local folder) to sparsify with a magnitude mask. "
                  "Default: a new GPT-2-style model (DEFAULT_MODEL, or --config_name)."},
    )
    config_name: Optional[str] = field(
        default=None, metadata={"help": "Config (hub id or local folder) of a new model to train from scratch."}
    )
    config_overrides: Optional[str] = field(
        default=None, metadata={"help": "Config changes for a new model, e.g. 'n_layer=2,n_embd=128,n_head=2'."}
    )
    width_multiplier: float = field(
        default=1.0,
        metadata={"help": "Train the sparse model this many times wider than the dense baseline (width and heads x it, "
                  "head size kept, the MLP following the width; a new model only). --density then counts the "
                  "baseline's linear weights: each sparse layer keeps density / multiplier^2 of its weights, so 4 "
                  "with --density 1 gives layer density 0.0625 and as many nonzero linear weights as the baseline."},
    )
    tokenizer_name: Optional[str] = field(
        default=None,
        metadata={"help": "Tokenizer (hub id or local folder). Default: the pretrained model's, else a byte-level "
                  "BPE trained on the training split and cached beside the data."},
    )
    # DEFAULT_VOCAB_SIZE (2,048, as the study's): at 8,192 the LM head and softmax cost 4x as much.
    vocab_size: int = field(default=DEFAULT_VOCAB_SIZE, metadata={"help": "Vocabulary of the trained BPE tokenizer."})
    seq_length: int = field(
        default=128, metadata={"help": "Tokens per training sequence (text is packed into blocks of this length); "
                               "also the perplexity context. One that the corpus (a batch of training sequences, a "
                               "validation one) or memory cannot hold fails at once, naming the largest that fits."}
    )


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset, e.g. wikitext."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "e.g. wikitext-103-raw-v1."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Local UTF-8 .txt/.json/.jsonl training text."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Local validation text (default: the "
                                           "last 5 percent of the training file)."})
    test_file: Optional[str] = field(default=None, metadata={"help": "Local test text (optional)."})
    data_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Cache of datasets and trained tokenizers (default: the datasets cache)."}
    )
    append_eos: Optional[bool] = field(
        default=None, metadata={"help": "End every record with the eos token. Default: on for the embedded corpus "
                                "(records are whole speeches), off for line-based text."}
    )
    # Non-overlapping windows by default: half the scoring time of stride seq_length // 2 (which gives every token
    # at least half a window of context, and a lower perplexity); the study sets that.
    eval_stride: Optional[int] = field(
        default=None, metadata={"help": "Perplexity window stride (default seq_length: non-overlapping windows; "
                                "seq_length // 2 scores every token with at least half a window of context)."}
    )
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for tokenizing."})
    curve_eval_sequences: Optional[int] = field(
        # 64 x 128 tokens: about a second a point on 2 CPU cores; the whole embedded split would take ~10
        default=64, metadata={"help": "Validation sequences scored at each evaluation during training (the "
                              "validation curve in training.png; 0 or less: the whole split). The final "
                              "perplexities always score the whole split."}
    )


@dataclass
class LMTrainingArguments(TrainingArguments):
    # Recipe defaults (the Trainer's are for fine-tuning): AdamW at a from-scratch learning rate, cosine decay.
    # AdamW rather than the paper's SGD-momentum: AdamW is what LMs train with; sparse momentum reads its
    # exp_avg / sqrt(exp_avg_sq) as the momentum.
    output_dir: Optional[str] = field(default="runs/train_lm", metadata={"help": "Where runs and results go."})
    # 300 steps of 8 x 128 tokens: the sparse and the dense run together in a few minutes on 2 CPU cores, install
    # included (docs/default_run.md); the run before (400 x 12, fine-grained) took 7-10 minutes.
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps per run (same for sparse and dense)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per step and device."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Windows per perplexity batch."})
    # 1e-3: the dense baseline's best of {5e-4, 1e-3, 2e-3} in 150-step trials (2e-3 was its worst); sparse uses the same.
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warm-up."})
    # A fifth of the run (60 of the default 300 steps): 80 of 400 steps as measured (docs/default_run.md); with 20 (5%) the dense
    # baseline of the default run fell 31% behind the sparse one (val ppl 131.45 vs 103.57; 100.06 vs 98.49 with 80).
    # A fraction, not a count, so that short runs reach their peak learning rate: a 40-step fine-tune of a pretrained
    # 135M Llama at lr 1e-4 reached val ppl 131.4 with the former fixed 80 steps and 101.5 with 20.
    warmup_steps: float = field(
        default=0.2, metadata={"help": "Warm-up: a fraction of max_steps if < 1 (default 0.2: 60 of the default 300 "
                               "steps, 8 of 40), else a number of steps; one as long as the run is warned about."}
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    logging_steps: float = field(default=25, metadata={"help": "Log loss and sparsity every N steps."})
    save_steps: float = field(default=100, metadata={"help": "Checkpoint every N steps (for resuming)."})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "Checkpoints kept per run."})
    ddp_find_unused_parameters: Optional[bool] = field(
        default=False, metadata={"help": "DDP: look for parameters without gradients (none in a causal LM)."}
    )
    dense_baseline: bool = field(
        default=True, metadata={"help": "Also train a dense model of the base shape on the same tokens."}
    )
    fine_grained_baseline: bool = field(
        default=False, metadata={"help": "With a block-sparse run (--block_size > 1), also train the same method and "
                                 "density fine-grained (--block_size 1): the quality/speed trade in one table."}
    )
    # Validation perplexity on --curve_eval_sequences every 50 steps: the curve in training.png (the time it takes is
    # left out of tokens/s and train time).
    eval_strategy: str = field(default="steps", metadata={"help": "When to score validation during training."})
    eval_steps: Optional[float] = field(default=50, metadata={"help": "Score validation every N steps."})


# 5 topology updates in the default 300-step run. 32 x 32 blocks: the layers store and compute only their live blocks,
# so the sparse run trains faster than dense; on this model 32 trains as fast as 64 (1.21x dense at density 0.2, 2-core
# AVX2, fp32: docs/default_run.md) and is finer (the study: block 64 within 1.4-3.2% of fine-grained perplexity).
RECIPE_SPARSITY_DEFAULTS = {"update_interval": 50, "block_size": 32}


def _sparsity_arguments() -> type:
    """SparsityConfig's fields as a CLI dataclass, without those TrainingArguments owns (seed: one --seed)."""
    hints = typing.get_type_hints(SparsityConfig)
    taken = {f.name for f in dataclasses.fields(TrainingArguments)}
    specs = []
    for f in dataclasses.fields(SparsityConfig):
        if f.name in taken:
            continue
        default, metadata = f.default, dict(f.metadata)
        if f.name == "init":  # None: magnitude for a pretrained model, random for a new one
            default, hint = None, Optional[str]
            metadata["help"] += " Default: magnitude with --model_name_or_path, else random."
        else:
            hint = hints[f.name]
        if f.name in RECIPE_SPARSITY_DEFAULTS:
            default = RECIPE_SPARSITY_DEFAULTS[f.name]
            metadata["help"] += f" Recipe default: {default}."
        specs.append((f.name, hint, field(default=default, metadata=metadata)))
    return dataclasses.make_dataclass("SparsityArguments", specs)


SparsityArguments = _sparsity_arguments()


def with_default_precision(argv: list[str], bf16_on_cpu: bool = True) -> list[str]:
    """Without --bf16 on the command line, train in bf16 autocast where bf16 is fast (on a CPU-only machine that
    also needs --use_cpu, which changes nothing else there); `--bf16 false` keeps fp32. ``bf16_on_cpu=False`` keeps
    fp32 on CPU-only machines (the training recipe: its block-sparse CPU kernels compute in fp32, and its numbers
    are then the same on every CPU, with or without fast bf16)."""
    if any(arg.split("=")[0] in ("--bf16", "--fp16") for arg in argv):  # the user chose
        return argv
    if torch.cuda.is_available():
        return argv + ["--bf16", "true"] if has_fast_bf16("cuda") else argv
    if not bf16_on_cpu or not has_fast_bf16("cpu"):
        return argv
    given_cpu = any(arg == "--use_cpu" or arg.startswith("--use_cpu=") for arg in argv)
    return argv + ["--bf16", "true"] + ([] if given_cpu else ["--use_cpu", "true"])
