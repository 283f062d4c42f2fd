"""Text corpora for language modelling, and their token ids packed into fixed-length blocks.

    raw = load_text_dataset()                                   # embedded State of the Union corpus
    raw = load_text_dataset("wikitext", "wikitext-103-raw-v1")  # a hub dataset (needs the network once)
    raw = load_text_dataset(train_file="train.txt", validation_file="valid.txt")
    blocks = tokenize_and_pack(raw, tokenizer, block_size=256)  # input_ids + labels, each 256 long

Every loader returns a `datasets.DatasetDict` with a "text" column and splits "train" and
"validation" (carved from the end of train when the source has none), plus "test" when the source
has one. Everything goes through `datasets`, whose cache (`cache_dir`, default
`datasets.config.HF_DATASETS_CACHE`) makes a second run read Arrow files instead of parsing text, and
whose fingerprints let `map` reuse the tokenized and packed splits. Bad input raises `DataInputError`
(a ValueError) with one line that says what is wrong and what to do.
"""
from __future__ import annotations

import codecs
from pathlib import Path

import datasets
import pyarrow.compute as pc
from datasets import DatasetDict

SOTU_CORPUS = Path(__file__).resolve().parent / "corpus" / "sotu.jsonl.xz"  # built by scripts/build_corpus.py
SOTU_SPLIT_CYCLE = 20  # speeches in chronological order; in every run of 20, the 10th and the 20th are held out
SOTU_VALIDATION_POSITION = 9  # index % 20 == 9  -> validation (12 speeches, ~5% of the characters)
SOTU_TEST_POSITION = 19  # index % 20 == 19 -> test (11 speeches, ~5%); all other speeches -> train (210)
DEFAULT_VALIDATION_FRACTION = 0.05  # share of train records carved off when a source has no validation split
TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json"}
PACK_RECORDS = 1000  # records concatenated into one stream by pack_into_blocks; each stream drops its partial block


class DataInputError(ValueError):
    """A data source or argument the loaders cannot use; the message says what to do instead."""


def load_text_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    test_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> DatasetDict:
    """Load a corpus as a DatasetDict with a "text" column: the embedded one, a hub dataset or local files."""
    files_given = any(f is not None for f in (train_file, validation_file, test_file))
    if dataset_config_name is not None and dataset_name is None:
        raise DataInputError(f"dataset_config_name={dataset_config_name!r} needs dataset_name as well")
    if dataset_name is not None and files_given:
        raise DataInputError("pass either dataset_name or train_file/validation_file/test_file, not both")
    if dataset_name is not None:
        return load_hub_dataset(dataset_name, dataset_config_name, cache_dir, validation_fraction)
    if files_given:
        if train_file is None:
            raise DataInputError("validation_file/test_file need a train_file as well")
        return load_text_files(train_file, validation_file, test_file, cache_dir, validation_fraction)
    return load_sotu_corpus(cache_dir)


def sotu_split_of(index: int) -> str:
    """The split of the speech at `index` in chronological order: a fixed interleaving, whole speeches."""
    position = index % SOTU_SPLIT_CYCLE
    if position == SOTU_VALIDATION_POSITION:
        return "validation"
    if position == SOTU_TEST_POSITION:
        return "test"
    return "train"


def load_sotu_corpus(cache_dir: str | Path | None = None) -> DatasetDict:
    """The 233 US State of the Union addresses 1790-2021 (CC0), split by whole speeches ~90/5/5.

    Columns: year, president, party, text. See sparse_nlp/lm/corpus/README.md for source and licence.
    """
    if not SOTU_CORPUS.is_file():
        raise DataInputError(f"embedded corpus {SOTU_CORPUS} is missing; reinstall sparse_nlp or run "
                             "scripts/build_corpus.py")
    # datasets decompresses the .xz once into its cache and keeps the parsed Arrow table there.
    speeches = datasets.load_dataset("json", data_files={"train": str(SOTU_CORPUS)},
                                     cache_dir=_optional_str(cache_dir))["train"]
    indices = {"train": [], "validation": [], "test": []}
    for index in range(len(speeches)):
        indices[sotu_split_of(index)].append(index)
    return DatasetDict({split: speeches.select(rows) for split, rows in indices.items()})


def load_hub_dataset(
    dataset_name: str,
    dataset_config_name: str | None = None,
    cache_dir: str | Path | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> DatasetDict:
    """`datasets.load_dataset(name, config)`, e.g. ("wikitext", "wikitext-103-raw-v1"); needs a "text" column."""
    label = dataset_name if dataset_config_name is None else f"{dataset_name} ({dataset_config_name})"
    try:
        loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=_optional_str(cache_dir))
    except (ConnectionError, FileNotFoundError) as err:
        raise DataInputError(f"cannot load dataset {label}: {_first_line(err)}; check the name and the network, "
                             "or pass train_file=... for local text") from None
    if not isinstance(loaded, DatasetDict) or "train" not in loaded:
        raise DataInputError(f"dataset {label} has no 'train' split")
    columns = loaded["train"].column_names
    if "text" not in columns:
        raise DataInputError(f"dataset {label} has no 'text' column (it has {columns}); pick a text dataset")
    splits = {split: loaded[split] for split in ("train", "validation", "test") if split in loaded}
    return _with_validation_split(DatasetDict(splits), validation_fraction, f"dataset {label}")


def load_text_files(
    train_file: str | Path,
    validation_file: str | Path | None = None,
    test_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> DatasetDict:
    """Local UTF-8 files: .txt (one record per line, line breaks kept) or .json/.jsonl with a "text" field."""
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    files = {split: Path(path) for split, path in files.items() if path is not None}
    builders = {split: _check_text_file(path, f"{split}_file") for split, path in files.items()}
    if len(set(builders.values())) > 1:
        raise DataInputError(f"files mix plain text and JSON ({', '.join(str(p) for p in files.values())}); "
                             "use one format for all splits")
    builder = builders["train"]
    options = {"keep_linebreaks": True} if builder == "text" else {}  # concatenated lines stay the file's text
    try:
        loaded = datasets.load_dataset(builder, data_files={s: str(p) for s, p in files.items()},
                                       cache_dir=_optional_str(cache_dir), **options)
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err
        raise DataInputError(f"cannot read {', '.join(str(p) for p in files.values())}: {_first_line(cause)}") \
            from None
    if "text" not in loaded["train"].column_names:
        raise DataInputError(f"{files['train']} has no 'text' field (it has {loaded['train'].column_names}); "
                             "write one JSON object per line with a 'text' string")
    return _with_validation_split(loaded, validation_fraction, str(files["train"]))


def tokenize_and_pack(
    dataset_dict: DatasetDict,
    tokenizer,
    block_size: int,
    append_eos: bool = False,
    num_proc: int | None = None,
) -> DatasetDict:
    """Token ids of every split cut into blocks of `block_size`: columns input_ids and labels (a copy)."""
    tokenized = tokenize_texts(dataset_dict, tokenizer, append_eos=append_eos, num_proc=num_proc)
    return pack_into_blocks(tokenized, block_size, num_proc=num_proc)


def tokenize_texts(dataset_dict: DatasetDict, tokenizer, append_eos: bool = False,
                   num_proc: int | None = None) -> DatasetDict:
    """Replace the "text" column (and all others) by "input_ids", one list per record.

    No special tokens are added, so concatenated records are the concatenated text. With
    `append_eos`, the tokenizer's eos token follows every non-empty record: use it when records are
    whole documents (the embedded corpus), not when they are lines (wikitext, local .txt files).
    """
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise DataInputError(f"append_eos=True but tokenizer {tokenizer.name_or_path!r} has no eos token")

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        if append_eos:
            ids = [record + [eos] if record else record for record in ids]
        return {"input_ids": ids}

    return dataset_dict.map(tokenize, batched=True, num_proc=num_proc,
                            remove_columns=dataset_dict["train"].column_names, desc="Tokenizing")


def pack_into_blocks(tokenized: DatasetDict, block_size: int, num_proc: int | None = None) -> DatasetDict:
    """Concatenate each batch of PACK_RECORDS records and cut it into blocks; the last partial block is dropped."""
    if not isinstance(block_size, int) or block_size < 2:
        raise DataInputError(f"block_size must be an integer >= 2, got {block_size!r}")

    def group_texts(batch):
        stream = [token for record in batch["input_ids"] for token in record]
        usable = len(stream) // block_size * block_size
        blocks = [stream[start:start + block_size] for start in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}  # the model shifts labels

    packed = tokenized.map(group_texts, batched=True, batch_size=PACK_RECORDS, num_proc=num_proc,
                           desc=f"Packing into blocks of {block_size}")
    for split, blocks in packed.items():
        if len(blocks) == 0:
            raise DataInputError(f"split {split!r} has fewer than block_size={block_size} tokens; "
                                 "use a smaller block_size or more text")
    return packed


def group_token_counts(tokenized: DatasetDict, num_proc: int | None = None) -> dict[str, list[int]]:
    """Per split, the tokens of each stream pack_into_blocks concatenates (the same batches of records, split over
    the same processes): a split packs into sum(tokens // block_size) blocks at any block size."""

    def count(batch):  # an Arrow table: the token counts are summed without building Python lists
        return {"tokens": [pc.sum(pc.list_value_length(batch["input_ids"])).as_py() or 0]}

    counts = tokenized.with_format("arrow").map(count, batched=True, batch_size=PACK_RECORDS, num_proc=num_proc,
                                                remove_columns=["input_ids"], desc="Counting tokens")
    return {split: list(counts[split].with_format(None)["tokens"]) for split in counts}


def _with_validation_split(dataset_dict: DatasetDict, fraction: float, source: str) -> DatasetDict:
    """Return `dataset_dict` with a validation split: the given one, or the last `fraction` of train."""
    if "validation" in dataset_dict:
        return dataset_dict
    if not 0 < fraction < 1:
        raise DataInputError(f"validation_fraction must be between 0 and 1, got {fraction!r}")
    train = dataset_dict["train"]
    if len(train) < 2:
        raise DataInputError(f"{source} has {len(train)} record(s), too few to carve a validation split; "
                             "pass a validation file")
    held_out = min(len(train) - 1, max(1, round(len(train) * fraction)))
    # The tail, not a random sample: line-based corpora keep whole articles together.
    splits = {"train": train.select(range(len(train) - held_out)),
              "validation": train.select(range(len(train) - held_out, len(train)))}
    splits.update({split: data for split, data in dataset_dict.items() if split not in splits})
    return DatasetDict(splits)


def _check_text_file(path: Path, role: str) -> str:
    """Raise DataInputError unless `path` is a non-empty UTF-8 file; return its datasets builder name."""
    if not path.is_file():
        raise DataInputError(f"{role} {str(path)!r} does not exist or is not a file")
    builder = TEXT_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise DataInputError(f"{role} {str(path)!r} has an unsupported extension; use .txt, .json or .jsonl")
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text, offset = False, 0
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise DataInputError(f"{role} {str(path)!r} is not UTF-8 (bad byte at offset {offset + err.start}); "
                                     "re-encode it, e.g. with iconv -t UTF-8") from None
            has_text = has_text or not text.isspace() and text != ""
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataInputError(f"{role} {str(path)!r} is not UTF-8 (it ends inside a character); re-encode it") from None
    if not has_text:
        raise DataInputError(f"{role} {str(path)!r} is empty; give it some text")
    return builder


def _optional_str(path: str | Path | None) -> str | None:
    return None if path is None else str(path)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
