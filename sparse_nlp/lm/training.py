"""Train and report one language model: the model, the data, and ``train_one``, which the recipes share.

    blocks, tokenizer = prepare_data(model_args, data_args, training_args)       # packed splits, tokenizer
    result = train_one("sparse", sparsity, model_args, data_args, training_args, blocks, tokenizer, single_run=True)

``train_one`` seeds every run alike (``training_args.seed``: the same initial weights and batches), builds the model
(a pretrained one, or a new one: ``DEFAULT_MODEL``, or ``--config_name``, with ``--config_overrides``), trains it
with ``SparseTrainer``, scores sliding-window perplexity on the validation and test splits, saves the final model
(a plain transformers model) in ``<output_dir>/<run>`` and returns its ``RunResult`` row. The arguments are
``sparse_nlp.lm.arguments``' dataclasses. recipes/train_lm.py and the study (recipes/study/runner.py) call it.
"""
from __future__ import annotations

import copy
import os
from typing import Optional

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from sparse_nlp import SparseTrainer, SparsityConfig, unsparsify
from sparse_nlp.lm.arguments import DataArguments, ModelArguments
from sparse_nlp.lm.data import group_token_counts, load_text_dataset, pack_into_blocks, tokenize_texts
from sparse_nlp.lm.evaluation import concatenate_token_ids, evaluate_perplexity
from sparse_nlp.lm.machine_load import OtherLoad
from sparse_nlp.lm.reporting import (
    RunResult,
    count_linear_nonzeros,
    count_parameters,
    describe_compute_path,
    linear_density,
    training_state_bytes,
)
from sparse_nlp.lm.sequence_length import check_corpus_fits, check_model_fits, check_model_takes_data, sequences_needed
from sparse_nlp.lm.tokenizer import load_tokenizer
from sparse_nlp.lm.training_clock import CLOCK_KEY, TrainingClock, validation_curve
from sparse_nlp.parallel.fsdp import whole_state_dict

# The default model: GPT-2's architecture at nanoGPT's "baby" scale, sized so that the sparse and the dense run
# together take well under 15 minutes on 2 CPU cores (measured: docs/default_run.md) and still learn real English.
DEFAULT_MODEL = dict(
    n_layer=4,  # 4 blocks of attention + MLP: 16 sparse linear layers
    n_embd=256,  # width; the MLP is 4x wider (1024)
    n_head=4,  # head size 64, as GPT-2
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: the run sees each token less than once
    activation_function="gelu_pytorch_tanh",  # GPT-2's tanh GELU as one fused op (gelu_new spells it as 5)
)


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


def base_model_config(model_args: ModelArguments):
    """A new model's config before the tokenizer sets its vocabulary and special tokens: ``DEFAULT_MODEL`` or
    ``--config_name``, with ``--config_overrides``."""
    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name)
    else:
        config = GPT2Config(**DEFAULT_MODEL, n_positions=model_args.seq_length)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    return config


def new_model_config(model_args: ModelArguments, tokenizer):
    config = base_model_config(model_args)
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


def curve_validation_blocks(blocks, data_args: DataArguments):
    """The validation sequences the Trainer scores during training (the curve in training.png): the first
    ``--curve_eval_sequences`` of the split, or all of it (None, or 0 or less)."""
    validation = blocks.get("validation")
    limit = data_args.curve_eval_sequences
    if validation is None or limit is None or limit <= 0 or limit >= len(validation):
        return validation
    return validation.select(range(limit))


def train_one(run: str, sparsity: SparsityConfig, model_args, data_args, training_args, blocks, tokenizer,
              single_run: bool) -> RunResult:
    run_dir = os.path.join(training_args.output_dir, run)
    args = copy.copy(training_args)
    args.output_dir, args.run_name = run_dir, run
    if args.device.type == "cpu":
        args.dataloader_pin_memory = False  # pinning only speeds copies to an accelerator (torch warns otherwise)
    set_seed(training_args.seed)  # same initial weights and the same batches for both runs
    model = build_model(model_args, tokenizer)
    clock = TrainingClock()
    trainer = SparseTrainer(
        model=model, args=args, train_dataset=blocks["train"], data_collator=default_data_collator,
        processing_class=tokenizer, sparsity_config=sparsity, callbacks=[clock],
        # --eval_strategy steps --eval_steps N: validation perplexity during training (a curve by steps and seconds)
        eval_dataset=curve_validation_blocks(blocks, data_args) if args.eval_strategy != "no" else None,
    )
    with OtherLoad() as load:  # was the machine quiet while it trained? (the speed is comparable only then)
        output = trainer.train(resume_from_checkpoint=resume_point(training_args, run_dir, single_run))
    model = trainer.model
    stride = data_args.eval_stride or model_args.seq_length
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
    train_tokens = trainer.state.global_step * tokens_per_step * model_args.seq_length
    history = trainer.state.log_history
    # the Trainer's train_runtime counts the evaluations during training; the clock leaves them out
    runtime = output.metrics["train_runtime"]
    sitting = clock.sitting_seconds or runtime
    result = RunResult(
        run=run, method=sparsity.method, density=linear_density(model), nonzero_params=nonzero, total_params=total,
        val_perplexity=perplexity["validation"], test_perplexity=perplexity.get("test"),
        train_tokens=train_tokens,
        tokens_per_second=output.metrics["train_samples_per_second"] * model_args.seq_length * runtime / sitting,
        train_seconds=clock.total_seconds or runtime,
        topology_updates=controller.update_count if controller is not None else 0,
        compute_path=describe_compute_path(model),
        loss_history=[(entry["step"], entry["loss"]) for entry in history if "loss" in entry],
        loss_curve=[(entry["step"], entry.get(CLOCK_KEY), entry["loss"]) for entry in history if "loss" in entry],
        density_history=list(controller.density_history) if controller is not None else [],
        other_load=load.share if args.world_size == 1 else None,  # other ranks of this job would count as others
        validation_history=validation_curve(history),
        width=getattr(model.config, "hidden_size", None),
        linear_nonzeros=count_linear_nonzeros(model),
        training_state_bytes=training_state_bytes(model, trainer.optimizer),
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
