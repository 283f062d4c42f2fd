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

Flags: every field below, every `SparsityConfig` field (its `seed` is `--seed`) and every `TrainingArguments`
field (`--help` lists them). Training prints one line per topology update; per-layer densities go to the
`--report_to` backends only. The table goes to stdout and to results.json / results.md in --output_dir (with the
loss curves and per-layer density histories), and training.png plots them (with matplotlib: pip install -e ".[plot]");
each run keeps its checkpoints and its final model (a plain transformers model, zeros included) in <output_dir>/<run>.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from typing import Optional

# Large CPU tensors (the logits) on transparent huge pages: torch reads this once, at its first allocation, so it is
# set before torch is imported. ~30 ms of 4 KiB page faults per 100 MB tensor otherwise.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from sparse_nlp import SparseTrainer, SparsityConfig, unsparsify
from sparse_nlp.config import DENSE
from sparse_nlp.precision import has_fast_bf16
from sparse_nlp.parallel.fsdp import whole_state_dict
from sparse_nlp.lm.data import group_token_counts, load_text_dataset, pack_into_blocks, tokenize_texts
from sparse_nlp.lm.evaluation import concatenate_token_ids, evaluate_perplexity
from sparse_nlp.lm.machine_load import OtherLoad
from sparse_nlp.lm.plots import write_training_plot
from sparse_nlp.lm.sequence_length import check_corpus_fits, check_model_fits, check_model_takes_data, sequences_needed
from sparse_nlp.lm.speed import kernel_speed_settings, measure_kernel_speedup
from sparse_nlp.lm.reporting import (
    RunResult,
    count_parameters,
    describe_compute_path,
    format_table,
    linear_density,
    write_results,
)
from sparse_nlp.lm.tokenizer import DEFAULT_VOCAB_SIZE, load_tokenizer
from sparse_nlp.lm.training_clock import TrainingClock, validation_curve

# The default model: GPT-2's architecture at nanoGPT's "baby" scale, sized so that the sparse and the dense run
# together take well under 15 minutes on 2 CPU cores (measured: docs/default_run.md) and still learn real English.
DEFAULT_MODEL = dict(
    n_layer=4,  # 4 blocks of attention + MLP: 16 sparse linear layers
    n_embd=256,  # width; the MLP is 4x wider (1024)
    n_head=4,  # head size 64, as GPT-2
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: the run sees each token less than once
    activation_function="gelu_pytorch_tanh",  # GPT-2's tanh GELU as one fused op (gelu_new spells it as 5)
)


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
    eval_stride: Optional[int] = field(
        default=None, metadata={"help": "Perplexity window stride (default seq_length // 2: every token scored with "
                                "at least half a window of context)."}
    )
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for tokenizing."})


@dataclass
class LMTrainingArguments(TrainingArguments):
    # Recipe defaults (the Trainer's are for fine-tuning): AdamW at a from-scratch learning rate, cosine decay.
    # AdamW rather than the paper's SGD-momentum: AdamW is what LMs train with; sparse momentum reads its
    # exp_avg / sqrt(exp_avg_sq) as the momentum.
    output_dir: Optional[str] = field(default="runs/train_lm", metadata={"help": "Where runs and results go."})
    max_steps: int = field(default=400, metadata={"help": "Optimizer steps per run (same for sparse and dense)."})
    # 12 x 128 tokens a step: the whole default run took 414 s on 2 cores in fp32 (docs/default_run.md); a step of 16
    # sequences takes ~1.5x as long as one of 12 there.
    per_device_train_batch_size: int = field(default=12, metadata={"help": "Sequences per step and device."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Windows per perplexity batch."})
    # 1e-3: the dense baseline's best of {5e-4, 1e-3, 2e-3} in 150-step trials (2e-3 was its worst); sparse uses the same.
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warm-up."})
    # A fifth of the run: 80 of the default 400 steps, as measured (docs/default_run.md); with 20 (5%) the dense
    # baseline of the default run fell 31% behind the sparse one (val ppl 131.45 vs 103.57; 100.06 vs 98.49 with 80).
    # A fraction, not a count, so that short runs reach their peak learning rate: a 40-step fine-tune of a pretrained
    # 135M Llama at lr 1e-4 reached val ppl 131.4 with the former fixed 80 steps and 101.5 with 20.
    warmup_steps: float = field(
        default=0.2, metadata={"help": "Warm-up: a fraction of max_steps if < 1 (default 0.2: 80 of the default 400 "
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
        default=True, metadata={"help": "Also train a dense model of the same shape on the same tokens."}
    )


RECIPE_SPARSITY_DEFAULTS = {"update_interval": 50}  # 8 topology updates in the default 400-step run


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


def with_default_precision(argv: list[str]) -> list[str]:
    """Without --bf16 on the command line, train in bf16 autocast where bf16 is fast (on a CPU-only machine that
    also needs --use_cpu, which changes nothing else there); `--bf16 false` keeps fp32."""
    if any(arg.split("=")[0] in ("--bf16", "--fp16") for arg in argv):  # the user chose
        return argv
    if torch.cuda.is_available():
        return argv + ["--bf16", "true"] if has_fast_bf16("cuda") else argv
    if not has_fast_bf16("cpu"):
        return argv
    given_cpu = any(arg == "--use_cpu" or arg.startswith("--use_cpu=") for arg in argv)
    return argv + ["--bf16", "true"] + ([] if given_cpu else ["--use_cpu", "true"])


def parse_args(argv=None):
    argv = with_default_precision(list(sys.argv[1:] if argv is None else argv))
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


def use_all_cores() -> Optional[int]:
    """`accelerate launch` without a config sets OMP_NUM_THREADS=1; on a CPU-only machine use every core instead.

    Returns the thread count set, or None when nothing was changed (a GPU, or a thread count someone chose).
    """
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    if torch.cuda.is_available() or not launched_by_accelerate or os.environ.get("OMP_NUM_THREADS") != "1":
        return None
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, len(os.sched_getaffinity(0)) // local_processes)
    if threads > 1:
        torch.set_num_threads(threads)
        return threads
    return None


def build_model(model_args: ModelArguments, tokenizer) -> torch.nn.Module:
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    else:
        model = AutoModelForCausalLM.from_config(new_model_config(model_args, tokenizer))
    check_model_takes_data(model.config, len(tokenizer), model.get_input_embeddings().num_embeddings,
                           model_args.seq_length, model_args.model_name_or_path)
    if getattr(model, "loss_type", None) is None:  # class names like GPT2LMHeadModel do not tell transformers
        model.loss_type = "ForCausalLM"
    return model


def model_config(model_args: ModelArguments, tokenizer):
    """The config build_model's model will have (a pretrained model's, or a new one's)."""
    if model_args.model_name_or_path:
        return AutoConfig.from_pretrained(model_args.model_name_or_path)
    return new_model_config(model_args, tokenizer)


def new_model_config(model_args: ModelArguments, tokenizer):
    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name)
    else:
        config = GPT2Config(**DEFAULT_MODEL, n_positions=model_args.seq_length)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    config.vocab_size = len(tokenizer)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    return config


def prepare_data(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    """Packed blocks of every split, and the tokenizer; the main process builds caches first.

    A --seq_length that memory or the corpus cannot hold fails here in one line (SequenceLengthError), memory before
    the text is tokenized, the corpus before it is packed.
    """
    with training_args.main_process_first(desc="data"):
        raw = load_text_dataset(
            data_args.dataset_name, data_args.dataset_config_name, data_args.train_file, data_args.validation_file,
            data_args.test_file, cache_dir=data_args.data_cache_dir,
        )
        tokenizer = load_tokenizer(
            model_args.tokenizer_name or model_args.model_name_or_path, train_split=raw["train"],
            vocab_size=model_args.vocab_size, cache_dir=data_args.data_cache_dir,
        )
        # build_model's checks and the memory a step needs, before any weight is allocated
        check_model_fits(model_config(model_args, tokenizer), len(tokenizer), model_args.seq_length,
                         training_args.per_device_train_batch_size, training_args.device, model_args.model_name_or_path)
        embedded = data_args.dataset_name is None and data_args.train_file is None
        append_eos = embedded if data_args.append_eos is None else data_args.append_eos
        workers = data_args.preprocessing_num_workers
        tokenized = tokenize_texts(raw, tokenizer, append_eos=append_eos, num_proc=workers)
        batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
        check_corpus_fits(model_args.seq_length, group_token_counts(tokenized, num_proc=workers),
                          sequences_needed(batch, training_args.world_size, tokenized))
        blocks = pack_into_blocks(tokenized, model_args.seq_length, num_proc=workers)
    return blocks, tokenizer


def planned_runs(sparsity: SparsityConfig, training_args: LMTrainingArguments) -> list[tuple[str, SparsityConfig]]:
    if sparsity.method == DENSE or sparsity.density == 1.0:
        return [("dense", dataclasses.replace(sparsity, method=DENSE, density=1.0))]
    runs = [("sparse", sparsity)]
    if training_args.dense_baseline:
        runs.append(("dense", dataclasses.replace(sparsity, method=DENSE, density=1.0)))
    return runs


def resume_point(training_args: TrainingArguments, run_dir: str, single_run: bool) -> Optional[str]:
    """--resume_from_checkpoint: 'last' resumes every run from its own latest checkpoint; a path needs one run."""
    wanted = training_args.resume_from_checkpoint
    if wanted is None:
        return None
    if wanted == "last":
        return get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    if not single_run:
        raise ValueError("--resume_from_checkpoint PATH resumes one run: add --dense_baseline false (or use 'last' "
                         "to resume each run from its own latest checkpoint).")
    return wanted


def train_one(run: str, sparsity: SparsityConfig, model_args, data_args, training_args, blocks, tokenizer,
              single_run: bool) -> RunResult:
    run_dir = os.path.join(training_args.output_dir, run)
    args = copy.copy(training_args)
    args.output_dir, args.run_name = run_dir, run
    if args.device.type == "cpu":
        args.dataloader_pin_memory = False  # pinning only speeds copies to an accelerator (torch warns otherwise)
    set_seed(training_args.seed)  # same initial weights and the same batches for both runs
    model = build_model(model_args, tokenizer)
    trainer = SparseTrainer(
        model=model, args=args, train_dataset=blocks["train"], data_collator=default_data_collator,
        processing_class=tokenizer, sparsity_config=sparsity, callbacks=[TrainingClock()],
        # --eval_strategy steps --eval_steps N: validation perplexity during training (a curve by steps and seconds)
        eval_dataset=blocks.get("validation") if args.eval_strategy != "no" else None,
    )
    with OtherLoad() as load:  # was the machine quiet while it trained? (the speed is comparable only then)
        output = trainer.train(resume_from_checkpoint=resume_point(training_args, run_dir, single_run))
    model = trainer.model
    stride = data_args.eval_stride or max(1, model_args.seq_length // 2)
    perplexity = {}
    # Scored in the precision the run trained in (bf16 autocast halves the time); logits are upcast for the softmax.
    scoring = torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16)
    for split in ("validation", "test"):
        if split in blocks:
            stream = concatenate_token_ids(blocks[split])
            with scoring:
                perplexity[split] = evaluate_perplexity(
                    model, stream, context_length=model_args.seq_length, stride=stride, device=args.device,
                    batch_size=args.per_device_eval_batch_size, show_progress=args.should_log and not args.disable_tqdm,
                )["perplexity"]
    nonzero, total = count_parameters(model)
    controller = trainer.sparsity_controller
    tokens_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    result = RunResult(
        run=run, method=sparsity.method, density=linear_density(model), nonzero_params=nonzero, total_params=total,
        val_perplexity=perplexity["validation"], test_perplexity=perplexity.get("test"),
        train_tokens=trainer.state.global_step * tokens_per_step * model_args.seq_length,
        tokens_per_second=output.metrics["train_samples_per_second"] * model_args.seq_length,
        train_seconds=output.metrics["train_runtime"],
        topology_updates=controller.update_count if controller is not None else 0,
        compute_path=describe_compute_path(model),
        loss_history=[(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry],
        density_history=list(controller.density_history) if controller is not None else [],
        other_load=load.share if args.world_size == 1 else None,  # other ranks of this job would count as others
        validation_history=validation_curve(trainer.state.log_history),
    )
    if controller is not None:
        unsparsify(model)  # the final model is a plain transformers model: masked weights are exact zeros
    if trainer.is_fsdp_enabled:  # FSDP2: whole weights (gathered on every rank), written by the main process
        state = whole_state_dict(model)
        if args.should_save:
            model.save_pretrained(run_dir, state_dict=state)
            tokenizer.save_pretrained(run_dir)
    else:
        trainer.save_model(run_dir)
    return result


def kernel_speed_note(model_args, sparsity: SparsityConfig, training_args, tokenizer) -> Optional[str]:
    """One line on what block-sparse kernels gain on this model's layer shapes at the run's density (a few seconds)."""
    if sparsity.method == DENSE or sparsity.density >= 1.0:
        return None
    block_size = sparsity.block_size if sparsity.block_size > 1 else 64
    model = build_model(model_args, tokenizer).to(training_args.device)
    tokens, dtype = kernel_speed_settings(training_args.device,
                                          training_args.per_device_train_batch_size * model_args.seq_length,
                                          bf16=training_args.bf16, fp16=training_args.fp16)
    speed = measure_kernel_speedup(model, tokens, density=sparsity.density, block_size=block_size, repeats=7,
                                   dtype=dtype)
    return speed.describe() if speed is not None else None


def run(model_args, data_args, sparsity, training_args) -> list[RunResult]:
    start = time.time()
    blocks, tokenizer = prepare_data(model_args, data_args, training_args)
    runs = planned_runs(sparsity, training_args)
    results = []
    for name, config in runs:
        results.append(train_one(name, config, model_args, data_args, training_args, blocks, tokenizer, len(runs) == 1))
    if training_args.should_save:
        notes = [
            f"Same model shape, steps and tokens per run: {results[0].train_tokens:,} training tokens of "
            f"{model_args.seq_length}-token sequences; perplexity over sliding windows of {model_args.seq_length} "
            f"tokens. Total wall time {time.time() - start:.0f} s.",
        ]
        speed = kernel_speed_note(model_args, sparsity, training_args, tokenizer)
        if speed:
            notes.append(speed)
        json_path, md_path = write_results(results, training_args.output_dir, notes)
        written = [json_path, md_path]
        try:
            written.append(write_training_plot(results, os.path.join(training_args.output_dir, "training.png")))
        except ImportError as err:  # matplotlib is optional
            print(err)
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
