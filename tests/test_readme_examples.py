"""Every ```python block in README.md runs, on tiny models and offline, so that the README's code cannot rot.

README.md is read afresh at every run and each block is executed as written, with only these substitutions:
- `AutoModelForCausalLM.from_pretrained(name)` with a hub name (not a local folder) gives a tiny GPT-2 built from a
  config (no download); a local folder loads for real;
- the names a block uses without defining them: `loader` (100 batches, so that the default update_interval of 100
  reaches one topology update), `input_ids` (a prompt), `path` (a plain checkpoint of a tiny GPT-2 with block-64
  zeros, saved as `unsparsify(model).save_pretrained(path)` writes one);
- the working directory is a temporary folder (blocks may save, e.g. `save_pretrained("out")`).
A method a block registers is also trained through one topology update, and removed from the registry afterwards.
"""
from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import sparse_nlp
from sparse_nlp.methods import registry

README = Path(__file__).resolve().parents[1] / "README.md"
VOCAB = 64


def python_blocks(text: str) -> list[tuple[str, int, str]]:
    """(title, first code line's number, code) of each ```python block, titled by the nearest heading above."""
    blocks, title, code, start = [], "README.md", None, 0
    for number, line in enumerate(text.splitlines(), start=1):
        if code is not None:
            if line.strip() == "```":
                blocks.append((title, start, "\n".join(code)))
                code = None
            else:
                code.append(line)
        elif line.strip() == "```python":
            code, start = [], number + 1
        elif re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip()
    return blocks


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """Width 128: every linear layer divides by 64, the README's block size."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=128, n_head=2, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _ids(generator: torch.Generator, rows: int, length: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, length), generator=generator)


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_python_examples():
    assert BLOCKS, "README.md has no ```python block: this test would check nothing"


@pytest.fixture
def namespace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_from_pretrained = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(name_or_path, *args, **kwargs):
        if Path(name_or_path).is_dir():
            return real_from_pretrained(name_or_path, *args, **kwargs)
        return tiny_gpt2()  # a hub name: the tiny model instead of a download

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # what a block registers goes afterwards

    checkpoint = tmp_path / "trained"
    trained = sparse_nlp.sparsify(tiny_gpt2(seed=1), density=0.25, block_size=64)
    sparse_nlp.unsparsify(trained).save_pretrained(checkpoint)
    generator = torch.Generator().manual_seed(0)
    loader = []
    for _ in range(100):
        ids = _ids(generator, 2, 16)
        loader.append({"input_ids": ids, "labels": ids})
    return {"__name__": "readme_example", "loader": loader, "input_ids": _ids(generator, 1, 8),
            "path": str(checkpoint)}


def _train_with(method: str) -> None:
    """A registered method goes through a real topology update on the tiny model."""
    model = tiny_gpt2()
    sparse_nlp.sparsify(model, density=0.5, method=method, update_interval=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    controller = sparse_nlp.SparsityController(model, optimizer, total_steps=4)
    ids = _ids(torch.Generator().manual_seed(1), 2, 16)
    updates = []
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        updates.append(controller.step())
        optimizer.zero_grad()
    assert updates[-1] is not None and updates[-1]["grown"] > 0, f"method {method!r} made no topology update"


@pytest.mark.parametrize("title, line, code", BLOCKS, ids=[title for title, _, _ in BLOCKS])
def test_readme_block_runs(title, line, code, namespace):
    before = set(registry.known_methods())
    # Padded so that a traceback names README.md's own line numbers.
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")
    try:
        exec(compiled, namespace)
    except Exception as error:  # noqa: BLE001 (any failure of the block is the finding)
        pytest.fail(f"README.md block under {title!r} (line {line}) does not run: {type(error).__name__}: {error}\n"
                    f"{traceback.format_exc()}", pytrace=False)
    for method in sorted(set(registry.known_methods()) - before):
        _train_with(method)
