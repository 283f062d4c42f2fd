"""Corpus loading, bad-input errors, the cached BPE tokenizer and packing into blocks."""
from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

import sparse_nlp.lm.tokenizer as tokenizer_module
from sparse_nlp.lm.data import (
    DataInputError,
    load_text_dataset,
    pack_into_blocks,
    sotu_split_of,
    tokenize_and_pack,
    tokenize_texts,
)
from sparse_nlp.lm.tokenizer import END_OF_TEXT, TRAINING_INFO, TokenizerLoadError, load_tokenizer

SMALL_VOCAB = 300  # 256 bytes + special token + a few merges: trains in well under a second


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets_cache")


@pytest.fixture(scope="module")
def corpus(cache_dir):
    return load_text_dataset(cache_dir=cache_dir)


@pytest.fixture(scope="module")
def small_tokenizer(corpus, cache_dir):
    return load_tokenizer(train_split=corpus["train"].select(range(5)), vocab_size=SMALL_VOCAB, cache_dir=cache_dir)


# --- the embedded corpus ---------------------------------------------------------------------------------------------

def test_corpus_has_three_splits_of_whole_speeches(corpus):
    assert set(corpus) == {"train", "validation", "test"}
    assert {split: len(data) for split, data in corpus.items()} == {"train": 210, "validation": 12, "test": 11}
    speeches = {split: {(row["year"], row["president"]) for row in data.select_columns(["year", "president"])}
                for split, data in corpus.items()}
    assert not speeches["train"] & speeches["validation"] and not speeches["train"] & speeches["test"]
    assert not speeches["validation"] & speeches["test"]
    assert sum(len(s) for s in speeches.values()) == 233  # every speech, whole, in exactly one split


def test_corpus_split_sizes_are_about_90_5_5(corpus):
    characters = {split: sum(len(text) for text in data["text"]) for split, data in corpus.items()}
    total = sum(characters.values())
    assert 10_000_000 < total < 11_500_000
    assert 0.88 < characters["train"] / total < 0.92
    assert 0.04 < characters["validation"] / total < 0.06 and 0.04 < characters["test"] / total < 0.06


def test_corpus_split_is_the_documented_interleaving_and_deterministic(corpus, cache_dir):
    assert [sotu_split_of(i) for i in (0, 8, 9, 10, 19, 20, 29, 39)] == [
        "train", "train", "validation", "train", "test", "train", "validation", "test"]
    assert corpus["validation"][0]["year"] == 1799 and corpus["test"][0]["year"] == 1809  # speeches 9 and 19
    again = load_text_dataset(cache_dir=cache_dir)  # the second load reads datasets' cache
    for split in corpus:
        assert again[split]["year"] == corpus[split]["year"]
        assert again[split]["text"][:3] == corpus[split]["text"][:3]


# --- local files -----------------------------------------------------------------------------------------------------

def test_local_text_files_keep_their_text(tmp_path, cache_dir):
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("first line\nsecond line\n\nafter a blank line\n", encoding="utf-8")
    valid.write_text("held out\n", encoding="utf-8")
    data = load_text_dataset(train_file=train, validation_file=valid, cache_dir=cache_dir)
    assert set(data) == {"train", "validation"}
    assert "".join(data["train"]["text"]) == train.read_text(encoding="utf-8")  # line breaks kept
    assert data["validation"]["text"] == ["held out\n"]


def test_missing_validation_split_is_carved_from_the_end_of_train(tmp_path, cache_dir):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(40)), encoding="utf-8")
    data = load_text_dataset(train_file=train, cache_dir=cache_dir)
    assert data["validation"]["text"] == ["record 38", "record 39"]  # 5% of 40, the tail
    assert data["train"]["text"][-1] == "record 37" and len(data["train"]) == 38


def _bad_input(tmp_path, case):
    """Arguments for load_text_dataset that must fail, and a word the one-line message must contain."""
    good = tmp_path / "good.txt"
    good.write_text("some text\nmore text\n", encoding="utf-8")
    if case == "missing file":
        return {"train_file": tmp_path / "nope.txt"}, "does not exist"
    if case == "empty file":
        (tmp_path / "empty.txt").write_bytes(b"")
        return {"train_file": tmp_path / "empty.txt"}, "empty"
    if case == "whitespace only":
        (tmp_path / "blank.txt").write_text("\n  \n\t\n")
        return {"train_file": tmp_path / "blank.txt"}, "empty"
    if case == "not utf-8":
        (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
        return {"train_file": tmp_path / "latin1.txt"}, "UTF-8"
    if case == "validation without train":
        return {"validation_file": good}, "train_file"
    if case == "config without name":
        return {"dataset_config_name": "wikitext-2-raw-v1"}, "dataset_name"
    if case == "name and file":
        return {"dataset_name": "wikitext", "train_file": good}, "not both"
    if case == "unsupported extension":
        (tmp_path / "data.csv").write_text("text\nhello\n")
        return {"train_file": tmp_path / "data.csv"}, "extension"
    if case == "json without text":
        (tmp_path / "rows.jsonl").write_text('{"body": "hello"}\n{"body": "world"}\n')
        return {"train_file": tmp_path / "rows.jsonl"}, "'text'"
    if case == "invalid json":
        (tmp_path / "broken.jsonl").write_text('{"text": "hello"\n')
        return {"train_file": tmp_path / "broken.jsonl"}, "cannot read"
    if case == "mixed formats":
        (tmp_path / "valid.jsonl").write_text('{"text": "hello"}\n')
        return {"train_file": good, "validation_file": tmp_path / "valid.jsonl"}, "one format"
    if case == "too short to carve":
        (tmp_path / "one.txt").write_text("only one line\n")
        return {"train_file": tmp_path / "one.txt"}, "validation"
    if case == "hub unreachable":
        return {"dataset_name": "wikitext", "dataset_config_name": "wikitext-2-raw-v1"}, "wikitext"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "missing file", "empty file", "whitespace only", "not utf-8", "validation without train", "config without name",
    "name and file", "unsupported extension", "json without text", "invalid json", "mixed formats",
    "too short to carve", "hub unreachable",
])
def test_bad_input_gives_one_clear_line(tmp_path, cache_dir, case):
    arguments, expected = _bad_input(tmp_path, case)
    with pytest.raises(DataInputError) as caught:
        load_text_dataset(cache_dir=cache_dir, **arguments)
    message = str(caught.value)
    assert expected in message and "\n" not in message and isinstance(caught.value, ValueError)


# --- tokenizer -------------------------------------------------------------------------------------------------------

def test_bpe_tokenizer_is_trained_once_then_loaded_from_cache(corpus, tmp_path, monkeypatch):
    few_speeches = corpus["train"].select(range(3))
    first = load_tokenizer(train_split=few_speeches, vocab_size=SMALL_VOCAB, cache_dir=tmp_path)
    folders = list((tmp_path / "sparse_nlp_tokenizers").iterdir())
    assert len(folders) == 1 and (folders[0] / TRAINING_INFO).is_file() and (folders[0] / "tokenizer.json").is_file()
    assert json.loads((folders[0] / TRAINING_INFO).read_text())["vocab_size"] == SMALL_VOCAB

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded, not retrained")

    monkeypatch.setattr(tokenizer_module, "train_bpe_tokenizer", no_training)
    second = load_tokenizer(train_split=few_speeches, vocab_size=SMALL_VOCAB, cache_dir=tmp_path)
    assert second.get_vocab() == first.get_vocab() and second.name_or_path == str(folders[0])
    with pytest.raises(AssertionError, match="retrained"):  # other texts, other key: would train
        load_tokenizer(train_split=corpus["train"].select(range(4)), vocab_size=SMALL_VOCAB, cache_dir=tmp_path)


def test_bpe_tokenizer_round_trips_text_and_uses_endoftext(small_tokenizer):
    assert len(small_tokenizer) == SMALL_VOCAB
    assert small_tokenizer.eos_token == small_tokenizer.bos_token == END_OF_TEXT
    text = "Fellow-Citizens of the Senate: 1,790 d\u00e9j\u00e0 vu \U0001F1FA\U0001F1F8\n"
    ids = small_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert small_tokenizer.decode(ids) == text  # byte-level: no unknown tokens, nothing lost


def test_tokenizer_errors_are_one_line(tmp_path):
    with pytest.raises(TokenizerLoadError, match="tokenizer_name"):
        load_tokenizer()
    with pytest.raises(TokenizerLoadError) as caught:
        load_tokenizer(str(tmp_path / "no_such_tokenizer"))
    assert "no_such_tokenizer" in str(caught.value) and "\n" not in str(caught.value)


# --- packing ---------------------------------------------------------------------------------------------------------

def test_packing_gives_fixed_length_blocks_of_the_token_stream(corpus, small_tokenizer):
    raw = DatasetDict({split: data.select(range(2)) for split, data in corpus.items()})
    tokenized = tokenize_texts(raw, small_tokenizer, append_eos=True)
    packed = tokenize_and_pack(raw, small_tokenizer, block_size=64, append_eos=True)
    for split in raw:
        stream = [token for record in tokenized[split]["input_ids"] for token in record]
        blocks = packed[split]["input_ids"]
        assert packed[split].column_names == ["input_ids", "labels"]
        assert all(len(block) == 64 for block in blocks) and packed[split]["labels"] == blocks
        assert len(blocks) == len(stream) // 64 and sum(blocks, []) == stream[:len(blocks) * 64]
        first_record = tokenized[split]["input_ids"][0]
        assert first_record[-1] == small_tokenizer.eos_token_id  # documents end with <|endoftext|>


def test_packing_rejects_splits_shorter_than_a_block_and_bad_block_sizes(small_tokenizer):
    tokenized = tokenize_texts(DatasetDict({"train": Dataset.from_dict({"text": ["a few words only"]})}),
                               small_tokenizer)
    with pytest.raises(DataInputError, match="fewer than block_size"):
        pack_into_blocks(tokenized, block_size=512)
    with pytest.raises(DataInputError, match="block_size"):
        pack_into_blocks(tokenized, block_size=0)


def test_a_named_dataset_without_validation_split_gets_one_carved(tmp_path, cache_dir):
    # load_dataset(name) with a local folder takes the same code path as a hub name, offline.
    (tmp_path / "train.txt").write_text("".join(f"line {i}\n" for i in range(20)), encoding="utf-8")
    (tmp_path / "test.txt").write_text("test line\n", encoding="utf-8")
    data = load_text_dataset(dataset_name=str(tmp_path), cache_dir=cache_dir)
    assert set(data) == {"train", "validation", "test"}
    assert data["validation"]["text"] == ["line 19"] and len(data["train"]) == 19
    assert data["test"]["text"] == ["test line"]
