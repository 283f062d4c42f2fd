"""What sparse training refuses on several processes, each with one line saying what to do instead.

- FSDP (``TrainingArguments(fsdp=...)``, as ``accelerate launch --use_fsdp`` sets it): it shards the weights that
  the masks and block layouts describe, so the masks would not be applied where the optimizer writes. SparseTrainer
  refuses when it is built; a plain Trainer with SparsityCallback when training starts.
- Block-sparse layers under DDP with a plain Trainer + SparsityCallback: DDP cannot follow their resizable values,
  and only SparseTrainer averages their gradients.
Two gloo ranks under torchrun; each writes the messages it got.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from transformers import Trainer

from sparse_nlp import SparseTrainer, SparsityCallback, SparsityConfig, sparsify
from torchrun_helpers import run_two_ranks
from trainer_helpers import RandomTokens, tiny_args, tiny_gpt2


def _message(build_and_train) -> str:
    try:
        build_and_train()
    except ValueError as error:
        return str(error)
    return "no error"


def _fsdp_sparse_trainer(output_dir):
    args = tiny_args(output_dir, fsdp="full_shard")
    SparseTrainer(model=tiny_gpt2(), args=args, train_dataset=RandomTokens(), sparsity_config=SparsityConfig(0.2)).train()


def _block_layers_in_plain_trainer(output_dir):
    model = sparsify(tiny_gpt2(n_embd=64), density=0.25, block_size=16)
    Trainer(model=model, args=tiny_args(output_dir), train_dataset=RandomTokens(), callbacks=[SparsityCallback()]).train()


@pytest.fixture(scope="module")
def messages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refusals")
    run_two_ranks(Path(__file__).resolve(), folder)
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_fsdp_is_refused_in_one_line(messages):
    for rank in messages:
        assert rank["fsdp"].startswith("sparse training does not support FSDP") and "DDP" in rank["fsdp"]
        assert "\n" not in rank["fsdp"]


def test_block_layers_need_sparse_trainer_under_ddp(messages):
    for rank in messages:
        assert "use SparseTrainer instead of Trainer + SparsityCallback" in rank["plain_trainer_blocks"]
        assert "\n" not in rank["plain_trainer_blocks"]


if __name__ == "__main__":  # the two ranks of the torchrun above
    folder = Path(sys.argv[1])
    got = {"plain_trainer_blocks": _message(lambda: _block_layers_in_plain_trainer(folder / "plain")),
           "fsdp": _message(lambda: _fsdp_sparse_trainer(folder / "fsdp"))}
    rank = dist.get_rank() if dist.is_initialized() else -1
    (folder / f"rank{rank}.json").write_text(json.dumps(got))
