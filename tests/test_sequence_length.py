"""Does a sequence length fit the corpus and memory: exact block counts, the largest length that fits, one-line
errors."""
from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import GPT2Config

from sparse_nlp.lm.data import PACK_RECORDS, DataInputError, group_token_counts, pack_into_blocks
from sparse_nlp.lm.sequence_length import (
    ESTIMATE_HIGH,
    SequenceLengthError,
    check_corpus_fits,
    check_memory_fits,
    check_model_fits,
    check_model_takes_data,
    count_parameters_of,
    largest_length,
    packed_blocks,
    sequences_needed,
    training_memory_bytes,
)


def test_largest_length_is_the_last_that_fits():
    assert largest_length(lambda length: length <= 37, 1000) == 37
    assert largest_length(lambda length: length <= 5000, 1000) == 1000
    assert largest_length(lambda length: False, 1000) is None  # not even a 2-token sequence
    assert largest_length(lambda length: True, 1) is None  # nothing in [2, 1]


def test_group_token_counts_give_the_blocks_packing_makes():
    _check_counts_match_packing(None)


def test_group_token_counts_give_the_blocks_packing_makes_with_two_workers():
    # datasets forks its workers: from this multi-threaded pytest process that may deadlock (Python 3.12 warns), so
    # the two-worker case runs in a fresh interpreter
    code = "import test_sequence_length as t; t._check_counts_match_packing(2); print('ok')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _check_counts_match_packing(num_proc):
    # more records than one packing group: each group drops its own tail, so the total // length overcounts
    rng = random.Random(0)
    tokenized = DatasetDict({
        "train": Dataset.from_dict({"input_ids": [[1] * rng.randint(0, 50) for _ in range(PACK_RECORDS * 2 + 503)]}),
        "validation": Dataset.from_dict({"input_ids": [[2] * rng.randint(0, 50) for _ in range(37)]}),
    })
    counts = group_token_counts(tokenized, num_proc=num_proc)
    assert {split: sum(tokens) for split, tokens in counts.items()} == \
        {split: sum(map(len, data["input_ids"])) for split, data in tokenized.items()}
    for length in (2, 7, 64, 300, 500):
        expected = {split: packed_blocks(tokens, length) for split, tokens in counts.items()}
        if 0 in expected.values():
            with pytest.raises(DataInputError):
                pack_into_blocks(tokenized, length, num_proc=num_proc)
        else:
            packed = pack_into_blocks(tokenized, length, num_proc=num_proc)
            assert {split: len(blocks) for split, blocks in packed.items()} == expected


def test_corpus_check_names_the_short_split_and_the_largest_length_that_fits():
    groups = {"train": [100, 50], "validation": [40]}
    needed = {"train": 4, "validation": 1}
    check_corpus_fits(33, groups, needed)  # train: 3 + 1 blocks of 33
    with pytest.raises(SequenceLengthError) as error:
        check_corpus_fits(34, groups, needed)  # train: 2 + 1
    assert str(error.value) == ("--seq_length 34 leaves the train split 3 sequence(s) of that length, fewer than one "
                                "step's batch of 4; use --seq_length 33 or less, or more text.")
    with pytest.raises(SequenceLengthError, match=r"leaves the validation split 0 sequence\(s\) .* the 1 it needs; "
                                                  r"use --seq_length 30 or less"):
        check_corpus_fits(31, {"train": [1000], "validation": [30]}, needed)
    with pytest.raises(SequenceLengthError, match="leaves the validation split .* it has only 1 tokens: give it more"):
        check_corpus_fits(80, {"train": [100], "validation": [1]}, needed)  # train is short too, but can be helped


def _tiny_config(**changes) -> GPT2Config:
    return GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=4096, **changes)


def test_parameters_are_counted_without_allocating_and_the_attention_is_recorded():
    from transformers import AutoModelForCausalLM

    config = _tiny_config()
    parameters = count_parameters_of(config)
    assert parameters == sum(p.numel() for p in AutoModelForCausalLM.from_config(_tiny_config()).parameters())
    assert config._attn_implementation == "sdpa"  # no seq_length x seq_length scores held
    eager = _tiny_config()
    eager._attn_implementation = "eager"
    extra = training_memory_bytes(eager, 0, 1, 1024) - training_memory_bytes(config, 0, 1, 1024)
    assert extra == 4 * 2 * 2 * 1024 * 1024  # 4 bytes per score: heads x layers x length^2


def test_memory_check_fails_with_the_largest_length_that_fits():
    config = _tiny_config()
    parameters = count_parameters_of(config)
    needed = lambda length: training_memory_bytes(config, parameters, 16, length)  # noqa: E731
    room = math.ceil(needed(1000) / ESTIMATE_HIGH)  # the estimate may run high: 1000 is refused only past this margin
    check_memory_fits(1000, config, parameters, 16, torch.device("cpu"), available=room)
    with pytest.raises(SequenceLengthError) as error:
        check_memory_fits(1001, config, parameters, 16, torch.device("cpu"), available=room)
    message = str(error.value)
    assert message.startswith("--seq_length 1001 does not fit in memory: a training step of 16 sequences of 1001 "
                              "tokens needs about ") and "\n" not in message
    suggested = int(re.search(r"use --seq_length (\d+) or less, or a smaller --per_device_train_batch_size",
                              message).group(1))
    # the suggestion keeps to the estimate itself, rounded down to a multiple of 64
    assert suggested % 64 == 0 and needed(suggested) <= room < needed(suggested + 64)
    with pytest.raises(SequenceLengthError, match="the model alone does not fit"):
        check_memory_fits(64, config, parameters, 16, torch.device("cpu"), available=parameters)


def test_memory_check_reads_this_machines_memory():
    config = _tiny_config()
    check_memory_fits(128, config, count_parameters_of(config), 16, torch.device("cpu"))  # a few MB: fits anywhere
    with pytest.raises(SequenceLengthError) as error:  # ~2**50 bytes of activations: fits nowhere
        check_memory_fits(2**25, config, 0, 2**12, torch.device("cpu"))
    free = float(re.search(r"the cpu has ([\d,.]+) GiB free", str(error.value)).group(1).replace(",", ""))
    assert 0 < free < 2**20


def test_model_must_embed_the_tokenizers_ids_and_have_the_positions():
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64)
    check_model_takes_data(config, vocabulary=300, embedded=300, seq_length=64)
    with pytest.raises(ValueError, match="tokenizer has 301 tokens but gpt2-tiny embeds 300; use the model's own"):
        check_model_takes_data(config, 301, 300, 64, model_name="gpt2-tiny")
    with pytest.raises(ValueError, match="--seq_length 65 is longer than the model's 64 positions"):
        check_model_takes_data(config, 300, 300, 65)
    with pytest.raises(ValueError, match="but the model embeds 300"):  # a new model has no name
        check_model_fits(config, 301, 64, 2, torch.device("cpu"))
    check_model_fits(config, 300, 64, 2, torch.device("cpu"))  # a tiny model fits any machine


def test_training_needs_one_steps_batch_on_every_process_and_the_others_one_window():
    assert sequences_needed(8 * 2, 3, ["train", "validation", "test"]) == {"train": 48, "validation": 1, "test": 1}
