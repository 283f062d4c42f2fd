"""The study's command line and its loop: the flags, each run's settings, train or skip, the tables and plots.

    results = main(["--densities", "0.1", "--methods", "dense", "momentum", "--output_dir", "runs/study_x"])

recipes/study_lm.py runs it (its docstring is the study's guide: the grid's methods, resuming, the default model);
recipes/study_levers.py runs it once per lever. Each run is one call of ``sparse_nlp.lm.training.train_one``.
Flags: every StudyArguments field below, the training recipe's model and data flags, every SparsityConfig field
but density / method / block_size (the grid's), and every TrainingArguments field; --help lists them.
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint

from sparse_nlp import SparseTrainer, SparsityConfig
from sparse_nlp.config import DENSE
from sparse_nlp.lm.arguments import (
    DataArguments,
    LMTrainingArguments,
    ModelArguments,
    SparsityArguments,
    with_default_precision,
)
from sparse_nlp.lm.training import new_model_config, prepare_data, train_one, use_all_cores
from sparse_nlp.topology.schedule import schedule_for
from study.grid import (
    MAGNITUDE_AVERAGE,
    OWN_SETTINGS,
    RIGL_OWN,
    SET_OWN,
    SMALL_DENSE,
    SMALL_DENSE_TOTAL,
    StudyRun,
    load_result,
    plan_grid,
    run_dir,
    study_result,
    write_result,
)
from study.magnitude_budget import equal_average_magnitude
from study.plots import write_study_plots
from study.small_dense import linear_layer_sizes, small_dense_shape
from study.tables import write_study

GRID_FIELDS = ("density", "method", "block_size", "initial_density")  # SparsityConfig fields the grid sets per run
# Sparsity options added after results were first written; those files hold the value every run had then.
ADDED_SETTINGS = {"sparsity.adam_momentum": "normalized", "sparsity.regrown_state": "reset", "sparsity.fused_qkv": "joint",
                  "sparsity.block_scores": "optimizer", "sparsity.initial_density": 1.0}
# every 100 steps (the reference's interval): 15 topology updates in 1,600 steps (the 16th, at step 1,600, would prune
# at rate 0 and is not scheduled; results from before that change counted it)
STUDY_SPARSITY_DEFAULTS = {"update_interval": 100}

# --quick: a tiny grid on a tiny model, a few minutes on 2 cores. Flags given after it still win.
QUICK_FLAGS = [
    "--output_dir", "runs/study_quick", "--densities", "0.2", "0.05", "--methods", "dense", "small_dense",
    "small_dense_total", "momentum", "static", "magnitude", "magnitude_average", "--block_methods", "momentum",
    "--seeds", "0", "1", "--seeded_methods", "small_dense", "momentum", "--seeded_densities", "0.05",
    "--config_overrides", "n_layer=2,n_embd=128,n_head=2", "--max_steps", "60", "--per_device_train_batch_size", "8",
    "--update_interval", "10", "--save_steps", "20", "--logging_steps", "20", "--max_eval_blocks", "64",
    "--layer_density", "0.05",
]


@dataclass
class StudyArguments:
    densities: list[float] = field(
        default_factory=lambda: [0.2, 0.1, 0.05], metadata={"help": "Densities of the linear layers to study."})
    methods: list[str] = field(
        default_factory=lambda: [DENSE, SMALL_DENSE, SMALL_DENSE_TOTAL, "momentum", "rigl", "set", "static",
                                 "magnitude", MAGNITUDE_AVERAGE, RIGL_OWN, SET_OWN],
        metadata={"help": "Fine-grained sparsity methods, and the references dense, small_dense (linear weights "
                  "matched), small_dense_total (all nonzeros matched), magnitude_average (gradual pruning with "
                  "the sparse runs' average linear weights), rigl_own and set_own (at their papers' settings); "
                  "'none' for block runs only."})
    block_methods: list[str] = field(
        default_factory=lambda: ["momentum"],
        metadata={"help": "Methods also trained block-sparse (--study_block_size); 'none' for no block runs."})
    study_block_size: int = field(default=64, metadata={"help": "Block size of the block-sparse runs."})
    seeds: list[int] = field(
        default_factory=lambda: [0, 1], metadata={"help": "Seeds: the first for the whole grid, the others for "
                                                  "--seeded_methods at --seeded_densities."})
    seeded_methods: list[str] = field(
        default_factory=lambda: [DENSE, SMALL_DENSE, "momentum", "static", "set"],
        metadata={"help": "Methods trained at every seed (block runs as e.g. momentum-b64)."})
    seeded_densities: list[float] = field(
        default_factory=lambda: [0.1, 0.05], metadata={"help": "Densities at which --seeded_methods get every seed."})
    width_multiple: int = field(default=8, metadata={"help": "Small-dense widths (both kinds) are multiples of this."})
    max_eval_blocks: Optional[int] = field(
        default=None, metadata={"help": "Score perplexity on the first N sequences of each split only (smoke tests)."})
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "Keep a finished run's checkpoints (default: delete them, keep the model)."})
    layer_density: float = field(
        default=0.1, metadata={"help": "The sparse momentum run whose per-layer densities are plotted."})
    quick: bool = field(default=False, metadata={"help": "A tiny grid for a smoke test (a few minutes on 2 cores)."})
    tables_only: bool = field(
        default=False, metadata={"help": "Train nothing: write the tables and plots from the grid's finished runs."})


@dataclass
class StudyModelArguments(ModelArguments):
    # 2,048, as the recipe's, stated here so that the study's grid does not move with the recipe's defaults.
    vocab_size: int = field(default=2048, metadata={"help": "Vocabulary of the trained BPE tokenizer."})


@dataclass
class StudyDataArguments(DataArguments):
    curve_eval_sequences: Optional[int] = field(
        default=None, metadata={"help": "Validation sequences scored at each evaluation during training "
                                "(--eval_strategy steps). Default: the whole split."})


@dataclass
class StudyTrainingArguments(LMTrainingArguments):
    output_dir: Optional[str] = field(default="runs/study_lm", metadata={"help": "Where the runs and tables go."})
    # 1,600 steps: at 400 the methods could not be told apart; ~1.2 epochs of the corpus at this vocabulary.
    max_steps: int = field(default=1600, metadata={"help": "Optimizer steps per run (the same for every run)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Sequences per step and device."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up: steps, or a fraction of max_steps if < 1."})
    logging_steps: float = field(default=50, metadata={"help": "Log loss and sparsity every N steps."})
    save_steps: float = field(default=200, metadata={"help": "Checkpoint every N steps (an interrupted run resumes)."})
    save_total_limit: Optional[int] = field(default=1, metadata={"help": "Checkpoints kept per run."})
    dense_baseline: bool = field(default=False, metadata={"help": "Not used by the study: see --methods."})
    # The study evaluates during training only when asked (--eval_strategy steps --eval_steps N), on the whole
    # validation split unless --curve_eval_sequences says otherwise.
    eval_strategy: str = field(default="no", metadata={"help": "When to score validation during training."})
    eval_steps: Optional[float] = field(default=None, metadata={"help": "Score validation every N steps."})


def _study_sparsity_arguments() -> type:
    """The training recipe's sparsity flags without the grid's (density, method, block_size)."""
    specs = []
    for f in dataclasses.fields(SparsityArguments):
        if f.name not in GRID_FIELDS:
            metadata = dict(f.metadata)
            default = STUDY_SPARSITY_DEFAULTS.get(f.name, f.default)
            if f.name in STUDY_SPARSITY_DEFAULTS:
                metadata["help"] = metadata["help"].split(" Recipe default")[0] + f" Study default: {default}."
            specs.append((f.name, f.type, field(default=default, metadata=metadata)))
    return dataclasses.make_dataclass("StudySparsityArguments", specs)


StudySparsityArguments = _study_sparsity_arguments()


def parse_args(argv: list[str]):
    if "--quick" in argv and argv[argv.index("--quick") + 1:][:1] not in (["false"], ["False"]):
        argv = QUICK_FLAGS + argv
    argv = with_default_precision(argv)
    parser = HfArgumentParser(
        (StudyModelArguments, StudyDataArguments, StudySparsityArguments, StudyArguments, StudyTrainingArguments))
    model_args, data_args, sparsity_args, study, training_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.model_name_or_path:
        raise ValueError("the study trains every model from scratch (small-dense needs a config): use --config_name "
                         "or --config_overrides instead of --model_name_or_path.")
    if model_args.width_multiplier != 1:
        raise ValueError("the study trains every run at one width: widen with --config_overrides (e.g. "
                         "n_embd=1024,n_head=16) and the densities by hand, or use recipes/train_lm.py "
                         "--width_multiplier.")
    study.block_methods = [m for m in study.block_methods if m.lower() != "none"]
    study.methods = [m for m in study.methods if m.lower() != "none"]  # e.g. block runs only
    options = dataclasses.asdict(sparsity_args)
    options["init"] = options["init"] or "random"
    options.pop("seed", None)
    training_args.resume_from_checkpoint = "last"  # each run from its own latest checkpoint, if it has one
    # the study scores every token with at least half a window of context, as it always has
    data_args.eval_stride = data_args.eval_stride or max(1, model_args.seq_length // 2)
    return model_args, data_args, options, study, training_args


def sparse_clip_rule() -> str:
    """How SparseTrainer clips sparse runs' gradients: by the norm of the active weights' gradients (the optimizer
    applies nothing else), or by all of them, absent weights' straight-through gradients included (harder than dense)."""
    from transformers import Trainer

    return "active" if SparseTrainer._clip_grad_norm is not Trainer._clip_grad_norm else "all gradients"


def run_settings(run: StudyRun, model_args, data_args, sparsity: SparsityConfig, args) -> dict:
    """What a finished run's result depends on: a result is reused only when all of it agrees."""
    return {
        "sparse_clip": sparse_clip_rule() if run.is_sparse else None,  # dense runs clip as the Trainer does
        "model": {k: getattr(model_args, k) for k in ("config_name", "config_overrides", "vocab_size", "seq_length")},
        "data": {k: getattr(data_args, k) for k in ("dataset_name", "dataset_config_name", "train_file",
                                                     "validation_file", "test_file")},
        "sparsity": sparsity.to_dict() if run.is_sparse else None,
        "training": {"max_steps": args.max_steps, "learning_rate": args.learning_rate,
                     "tokens_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps
                     * args.world_size, "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
                     "lr_scheduler_type": str(args.lr_scheduler_type), "max_grad_norm": args.max_grad_norm,
                     "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"},
    }


def prepare_run(run: StudyRun, model_args, base_config, sparsity_options: dict, study: StudyArguments, args):
    """The run's model flags (small-dense: narrower), sparsity config and training arguments."""
    model_args = copy.copy(model_args)
    config = base_config
    if run.method in (SMALL_DENSE, SMALL_DENSE_TOTAL):
        match = "total" if run.method == SMALL_DENSE_TOTAL else "linear"
        shape = small_dense_shape(base_config, run.density, study.width_multiple, match)
        overrides = [model_args.config_overrides] if model_args.config_overrides else []
        model_args.config_overrides = ",".join(overrides + [f"{k}={v}" for k, v in shape.items()])
        config = copy.deepcopy(base_config)
        config.update(shape)
    density = run.density if run.is_sparse else 1.0
    sparsity = SparsityConfig(**{**sparsity_options, "method": run.sparsity_method, "density": density,
                                 "block_size": run.block_size, "seed": run.seed})
    if run.method in OWN_SETTINGS:  # a baseline at its own paper's settings
        sparsity = dataclasses.replace(sparsity, **OWN_SETTINGS[run.method])
    if run.method == MAGNITUDE_AVERAGE:  # the same cubic schedule, scaled to the sparse runs' average weights
        initial, final = equal_average_magnitude(run.density, schedule_for(sparsity, args.max_steps))
        sparsity = dataclasses.replace(sparsity, density=final, initial_density=initial)
    args = copy.copy(args)
    args.seed = run.seed  # initial weights, masks and batch order
    return model_args, config, sparsity, args


def train_run(run, model_args, config, sparsity, data_args, args, blocks, tokenizer):
    """Train and evaluate one run (``train_one``, as the training recipe does); its study row."""
    folder = run_dir(args.output_dir, run)
    checkpoint = get_last_checkpoint(folder) if os.path.isdir(folder) else None
    resumed_from = int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0
    start = time.time()
    result = train_one(run.name, sparsity, model_args, data_args, args, blocks, tokenizer, single_run=True)
    sitting = time.time() - start
    return study_result(
        run, result, linear_layer_sizes(config), total_steps=args.max_steps, width=config.hidden_size,
        precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        setup_seconds=max(0.0, sitting - result.train_seconds), resumed_from_step=resumed_from,
    )


def limit_eval_blocks(blocks, limit: Optional[int]):
    if limit is None:
        return blocks
    return {split: data if split == "train" else data.select(range(min(limit, len(data))))
            for split, data in blocks.items()}


def run_study(model_args, data_args, sparsity_options, study: StudyArguments, training_args):
    start = time.time()
    blocks, tokenizer = prepare_data(model_args, data_args, training_args)
    blocks = limit_eval_blocks(blocks, study.max_eval_blocks)
    base_config = new_model_config(model_args, tokenizer)
    grid = plan_grid(study.densities, study.methods, study.seeds, study.seeded_methods, study.seeded_densities,
                     study.block_methods, study.study_block_size)
    log = print if training_args.should_log else (lambda *a, **k: None)
    log(f"Study: {len(grid)} runs of {training_args.max_steps} steps in {training_args.output_dir}.")
    if sparse_clip_rule() != "active" and training_args.max_grad_norm > 0:
        log("Note: sparse runs clip by the norm of all gradients, absent weights included (harder than dense runs); "
            "see docs/study.md.")
    results, trained, written = [], 0, []
    for i, run in enumerate(grid, 1):
        run_model_args, config, sparsity, args = prepare_run(run, model_args, base_config, sparsity_options, study,
                                                             training_args)
        settings = run_settings(run, run_model_args, data_args, sparsity, args)
        folder = run_dir(training_args.output_dir, run)
        done = load_result(folder, settings, ADDED_SETTINGS)
        skipped = " (finished before, skipped)" if done is not None else ""
        if done is None and study.tables_only:
            log(f"[{i}/{len(grid)}] {run.name}: not finished, left out of the tables (--tables_only)")
            continue
        if done is None:
            log(f"[{i}/{len(grid)}] training {run.name}", flush=True)
            done = train_run(run, run_model_args, config, sparsity, data_args, args, blocks, tokenizer)
            trained += 1
            if training_args.should_save:
                write_result(folder, done, settings)
                if not study.keep_checkpoints:
                    for checkpoint in glob.glob(os.path.join(folder, "checkpoint-*")):
                        shutil.rmtree(checkpoint, ignore_errors=True)
        speed = f"{done.tokens_per_second:,.0f} tokens/s, {done.wall_seconds:.0f} s" if done.wall_seconds else "speed -"
        log(f"[{i}/{len(grid)}] {run.name}{skipped}: val ppl {done.val_perplexity:.2f}, {speed}", flush=True)
        results.append(done)
        if training_args.should_save:
            written = write_study(results, training_args.output_dir, _notes(model_args, training_args, grid, results))
    if not results:
        raise ValueError(f"no finished run of this grid in {training_args.output_dir}: nothing to tabulate "
                         "(drop --tables_only to train them).")
    if not training_args.should_save:
        return results
    written += write_study_plots(results, training_args.output_dir, study.layer_density)
    print(f"\n{len(results)} runs ({trained} trained now) in {time.time() - start:.0f} s. Written: {', '.join(written)}.")
    return results


def _notes(model_args, args, grid, results) -> list[str]:
    first = results[0]
    return [
        f"{len(results)} of {len(grid)} runs finished. Every run: {args.max_steps} steps, {first.train_tokens:,} "
        f"training tokens of {model_args.seq_length}-token sequences, vocabulary {model_args.vocab_size}, "
        f"{first.precision}; perplexity over sliding windows of {model_args.seq_length} tokens.",
        "Linear nonzeros: the sparsified layers' nonzero weights at the end of training (small-dense: all of its, "
        "chosen to match); embeddings etc.: everything else (token and position embeddings, norms, biases), dense in "
        "every model; average params: nonzero params averaged over training (gradual magnitude pruning starts dense).",
        "Equal-size references: small-dense (equal total) has as many parameters as the sparse model's nonzeros, "
        "embeddings included; magnitude (equal average) prunes on the cubic schedule scaled so that its linear "
        "weights averaged over training equal the sparse runs' (it starts and ends sparser).",
        "Mean ± sample standard deviation over seeds; vs dense: validation perplexity against the dense model's.",
    ]


def main(argv=None):
    threads = use_all_cores()
    try:
        model_args, data_args, sparsity_options, study, training_args = parse_args(
            list(sys.argv[1:] if argv is None else argv))
        if threads is not None and training_args.should_log:
            print(f"Training on the CPU with {threads} threads (accelerate launch had set OMP_NUM_THREADS=1).")
        return run_study(model_args, data_args, sparsity_options, study, training_args)
    except (ValueError, OSError) as err:  # bad input: one line, not a traceback
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise SystemExit(f"error: {lines[0]}") from None

