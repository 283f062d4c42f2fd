"""Does a training sequence length fit the corpus and the machine? If not, one line that says the largest that does.

    check_memory_fits(seq_length, config, count_parameters_of(config), batch_size, device)   # before any weight exists
    check_corpus_fits(seq_length, group_token_counts(tokenized), {"train": 12, "validation": 1})  # before packing
    check_model_fits(config, len(tokenizer), seq_length, batch_size, device)  # the tokenizer's ids, then memory

A typo such as --seq_length 100000 otherwise builds a 100,000-position model that sits at step 0 for many minutes
(or swaps, or is killed) without a word.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

MIN_SEQ_LENGTH = 2  # a block needs an input and a next token (pack_into_blocks' lower bound)
ADAMW_BYTES_PER_PARAMETER = 16  # fp32 weight, its gradient and AdamW's two moments
MEMORY_LENGTH_MULTIPLE = 64  # the memory estimate is rough: suggest a round length, not an exact one
# The estimate ran up to 1.32x the measured peak (activation_bytes_per_token), and it is unmeasured on GPUs: refuse
# only a length whose estimate exceeds free memory by more than that, so that a length that may fit still runs (the
# typos this is for, such as 100000 for 1000, are many times over); the suggestion keeps to the estimate itself.
ESTIMATE_HIGH = 1.35


class SequenceLengthError(ValueError):
    """A --seq_length the corpus or the machine cannot hold; the message says the largest length that fits."""


def packed_blocks(group_tokens: Sequence[int], seq_length: int) -> int:
    """Blocks of `seq_length` that pack_into_blocks cuts from groups of these token counts (each drops its tail)."""
    return sum(tokens // seq_length for tokens in group_tokens)


def largest_length(fits: Callable[[int], bool], upper: int) -> Optional[int]:
    """The largest length in [MIN_SEQ_LENGTH, upper] for which `fits` holds (it must only turn false as lengths
    grow), or None when none does."""
    low, high = MIN_SEQ_LENGTH - 1, upper  # fits(low) is taken as true; the answer is in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low if low >= MIN_SEQ_LENGTH else None


def check_corpus_fits(seq_length: int, group_tokens: Mapping[str, Sequence[int]], needed: Mapping[str, int]) -> None:
    """Raise SequenceLengthError unless every split packs into at least needed[split] sequences of `seq_length`.

    `group_tokens` is data.group_token_counts(tokenized): per split, the tokens of each group of records packed
    together. The message names the first short split and the largest length at which every split has enough.
    """
    def enough(length: int) -> list[bool]:
        return [packed_blocks(tokens, length) >= needed.get(split, 1) for split, tokens in group_tokens.items()]

    if all(enough(seq_length)):
        return
    upper = max((max(tokens, default=0) for tokens in group_tokens.values()), default=0)
    best = largest_length(lambda length: all(enough(length)), min(upper, seq_length - 1))
    split = list(group_tokens)[enough(seq_length if best is not None else MIN_SEQ_LENGTH).index(False)]
    have, want = packed_blocks(group_tokens[split], seq_length), needed.get(split, 1)
    purpose = f"one step's batch of {want}" if split == "train" and want > 1 else f"the {want} it needs"
    advice = (f"use --seq_length {best} or less, or more text" if best is not None
              else f"it has only {sum(group_tokens[split]):,} tokens: give it more text")
    raise SequenceLengthError(f"--seq_length {seq_length} leaves the {split} split {have} sequence(s) of that length, "
                              f"fewer than {purpose}; {advice}.")


def activation_bytes_per_token(config, seq_length: int) -> int:
    """Bytes a training step keeps per token of the batch: the logits (and their softmax and gradient) and each
    layer's saved activations; eager attention adds its seq_length-wide score rows, one per head and layer.

    Fitted to the marginal peak RSS per token of an AdamW step (forward, backward, step) on a CPU, torch 2.13,
    transformers 5.25, sdpa attention: GPT-2 (layers 4-8, width 256-512, MLP 512-1024, vocabulary 2,048-8,192) and
    Llama (width 256, MLP 688), fp32 and bf16 autocast. The estimate is 0.82x-1.32x the measurement (high for GPT-2
    in bf16, low for Llama); eager attention's score rows were measured at 1.0x-1.25x of 4 bytes per entry.
    """
    text = config.get_text_config()
    width, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    mlp = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * width
    per_token = 12 * vocab + 4 * (16 + 14 * layers) * width + 8 * layers * mlp
    if getattr(text, "_attn_implementation", None) == "eager":  # sdpa / flash never hold the scores
        per_token += 4 * text.num_attention_heads * layers * seq_length
    return per_token


def training_memory_bytes(config, parameters: int, batch_size: int, seq_length: int) -> int:
    """About what one training step needs: AdamW's weights, gradients and moments, and the batch's activations."""
    activations = batch_size * seq_length * activation_bytes_per_token(config, seq_length)
    return ADAMW_BYTES_PER_PARAMETER * parameters + activations


def available_memory(device: torch.device) -> Optional[int]:
    """Free bytes for this process on `device`: the GPU's free memory, or the machine's available memory (within a
    cgroup limit) shared by the processes launched on it; None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    candidates = []
    try:
        import psutil  # a dependency of accelerate

        candidates.append(psutil.virtual_memory().available)
    except ImportError:
        candidates.append(_meminfo_available())
    candidates.append(_cgroup_room())
    known = [room for room in candidates if room is not None]
    if not known:
        return None
    return min(known) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check_memory_fits(seq_length: int, config, parameters: int, batch_size: int, device: torch.device,
                      available: Optional[int] = None) -> None:
    """Raise SequenceLengthError when a training step at `seq_length` needs clearly more memory than `device` has
    free (`available`, default: available_memory(device); more than ESTIMATE_HIGH times it); the message says the
    largest length whose estimate fits."""
    available = available_memory(device) if available is None else available
    if available is None:
        return
    needed = training_memory_bytes(config, parameters, batch_size, seq_length)
    if needed <= ESTIMATE_HIGH * available:
        return
    best = largest_length(lambda length: training_memory_bytes(config, parameters, batch_size, length) <= available,
                          seq_length - 1)
    if best is not None and best >= 2 * MEMORY_LENGTH_MULTIPLE:
        best -= best % MEMORY_LENGTH_MULTIPLE
    advice = (f"use --seq_length {best} or less, or a smaller --per_device_train_batch_size" if best is not None
              else "the model alone does not fit: use a smaller model")
    raise SequenceLengthError(f"--seq_length {seq_length} does not fit in memory: a training step of {batch_size} "
                              f"sequences of {seq_length} tokens needs about {needed / 2**30:,.1f} GiB, the "
                              f"{device.type} has {available / 2**30:,.1f} GiB free; {advice}.")


def check_model_takes_data(config, vocabulary: int, embedded: int, seq_length: int,
                           model_name: Optional[str] = None) -> None:
    """A tokenizer of `vocabulary` ids needs as many embeddings (the model has `embedded`), and `seq_length` needs
    positions; ValueError in one line otherwise."""
    if vocabulary > embedded:
        raise ValueError(f"tokenizer has {vocabulary} tokens but {model_name or 'the model'} embeds {embedded}; "
                         "use the model's own tokenizer.")
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if positions is not None and seq_length > positions:
        raise ValueError(f"--seq_length {seq_length} is longer than the model's {positions} positions.")


def check_model_fits(config, vocabulary: int, seq_length: int, batch_size: int, device: torch.device,
                     model_name: Optional[str] = None) -> None:
    """check_model_takes_data on `config`'s own vocabulary size, and the memory a training step of `batch_size`
    sequences of `seq_length` needs (check_memory_fits), before any weight is allocated."""
    check_model_takes_data(config, vocabulary, config.get_text_config().vocab_size, seq_length, model_name)
    check_memory_fits(seq_length, config, count_parameters_of(config), batch_size, device)  # parameters on meta


def sequences_needed(batch_size: int, world_size: int, splits) -> dict[str, int]:
    """Packed sequences each split must give: one optimizer step's batch on every process for training
    (`batch_size` per process, gradient accumulation included), one window to score for the others."""
    return {split: batch_size * world_size if split == "train" else 1 for split in splits}


def count_parameters_of(config) -> int:
    """Parameters of the model `config` describes, counted on the meta device (nothing is allocated); sets
    config._attn_implementation to the attention the model will use."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    config._attn_implementation = model.config._attn_implementation
    return sum(p.numel() for p in model.parameters())


def _meminfo_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> Optional[int]:
    """The cgroup v2 memory limit less its current use, or None without a limit."""
    folder = Path("/sys/fs/cgroup")
    try:
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((folder / "memory.current").read_text()))
    except (OSError, ValueError):
        return None
