"""The tokenizer for a corpus: a named one, or a byte-level BPE trained on the training split and cached.

    tokenizer = load_tokenizer(train_split=raw["train"])           # trains once (~1.5 s on 2 cores), then loads
    tokenizer = load_tokenizer("gpt2")                             # AutoTokenizer: hub name or local folder

The trained tokenizer is GPT-2's recipe at a smaller vocabulary: bytes as the base alphabet (so no
unknown tokens), GPT-2's pre-tokenizer regex, and `<|endoftext|>` as bos, eos and only special token.
It is saved under `<cache_dir>/sparse_nlp_tokenizers/bpe-<vocab size>-<fingerprint>/`, where the
fingerprint hashes the training texts and the settings below; `training_info.json` in that folder
marks a finished save and records what was trained on and how long it took.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"  # GPT-2's document separator, used as bos and eos
# 2,048: ~2.65M training tokens of the embedded corpus, and a GPT-2 of width 256 then holds 85% of its weights in
# the linear layers (60% at 8,192, where the dense token embedding held most of a sparse model's nonzeros).
DEFAULT_VOCAB_SIZE = 2048
MIN_PAIR_FREQUENCY = 2  # a merge must occur at least twice in the training text
RECIPE_VERSION = "bytelevel-bpe-1"  # change when the training recipe changes, so old caches are not reused
TRAINING_INFO = "training_info.json"  # written last: its presence means the folder holds a complete tokenizer


class TokenizerLoadError(ValueError):
    """A tokenizer that cannot be loaded or trained; the message says what to do instead."""


def load_tokenizer(
    tokenizer_name: str | None = None,
    train_split: Dataset | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: str | Path | None = None,
) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(tokenizer_name)` if a name is given, else the cached BPE of `train_split`."""
    if tokenizer_name is not None:
        try:
            return AutoTokenizer.from_pretrained(tokenizer_name)
        except (OSError, ValueError) as err:
            lines = str(err).strip().splitlines() or [type(err).__name__]
            raise TokenizerLoadError(f"cannot load tokenizer {tokenizer_name!r}: {lines[0]}") from None
    if train_split is None:
        raise TokenizerLoadError("pass tokenizer_name, or train_split to train a BPE tokenizer on")
    return load_or_train_bpe_tokenizer(train_split, vocab_size, cache_dir)


def load_or_train_bpe_tokenizer(
    train_split: Dataset,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """The BPE tokenizer of `train_split`'s "text" column: loaded from the cache, or trained and cached."""
    folder = bpe_cache_folder(train_split, vocab_size, cache_dir)
    if not (folder / TRAINING_INFO).is_file():
        start = time.perf_counter()
        tokenizer = train_bpe_tokenizer(_texts(train_split), vocab_size, length=len(train_split))
        seconds = round(time.perf_counter() - start, 2)
        info = {"recipe": RECIPE_VERSION, "vocab_size": vocab_size, "records": len(train_split),
                "characters": sum(len(text) for text in _texts(train_split)), "training_seconds": seconds}
        _save_atomically(tokenizer, info, folder)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                        length: int | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (uncached); `length` only sizes the progress bar."""
    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise TokenizerLoadError(f"vocab_size must be an integer >= 257 (256 bytes + {END_OF_TEXT}), "
                                 f"got {vocab_size!r}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=MIN_PAIR_FREQUENCY,
                                  special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer, length=length)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT)


def bpe_cache_folder(train_split: Dataset, vocab_size: int, cache_dir: str | Path | None = None) -> Path:
    """Where the BPE of `train_split` at `vocab_size` is cached: keyed by a hash of the texts and settings."""
    digest = hashlib.sha256(f"{RECIPE_VERSION}|{vocab_size}|{MIN_PAIR_FREQUENCY}|".encode())
    for text in _texts(train_split):
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")  # record boundary: ["ab", "c"] and ["a", "bc"] hash differently
    root = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE)
    return root / "sparse_nlp_tokenizers" / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}"


def _texts(split: Dataset) -> Iterator[str]:
    if "text" not in split.column_names:
        raise TokenizerLoadError(f"train_split has no 'text' column (it has {split.column_names})")
    for batch in split.select_columns(["text"]).iter(batch_size=1000):
        yield from batch["text"]


def _save_atomically(tokenizer: PreTrainedTokenizerFast, info: dict, folder: Path) -> None:
    """Save into a temporary sibling folder, then rename: a reader never sees half a tokenizer.

    If another process (e.g. a second rank under `accelerate launch`) finished first, keep its copy.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        tokenizer.save_pretrained(str(staging))
        (staging / TRAINING_INFO).write_text(json.dumps(info, indent=2) + "\n")
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / TRAINING_INFO).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
