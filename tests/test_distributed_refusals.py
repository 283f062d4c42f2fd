"""What sparse training refuses on several processes, each with one line saying what to do instead.

- FSDP1 (``fsdp_config={"version": 1}``): it flattens the weights that the masks describe. SparseTrainer refuses when
  it is built (FSDP2 trains fine-grained layers: test_fsdp.py).
- Block-sparse layers under FSDP (SparseTrainer when it is built; a plain loop with ``fully_shard`` when the
  controller is): their values change size at every topology update, which FSDP's fixed shards cannot follow.
- Block-sparse layers under DDP with a plain Trainer + SparsityCallback: DDP cannot follow their resizable values,
  and only SparseTrainer averages their gradients.
Two gloo ranks under torchrun; each writes the messages it got.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import Trainer

from fsdp_helpers import FSDP2_CONFIG, fsdp_on_cpu
from sparse_nlp import SparseTrainer, SparsityCallback, SparsityConfig, SparsityController, sparsify
from sparse_nlp.parallel.fsdp import BLOCK_LAYERS_REFUSAL, FSDP1_REFUSAL
from torchrun_helpers import run_two_ranks
from trainer_helpers import RandomTokens, tiny_args, tiny_gpt2


def _message(build_and_train) -> str:
    try:
        build_and_train()
    except ValueError as error:
        return str(error)
    return "no error"


def _fsdp_sparse_trainer(output_dir, version: int, block_size: int):
    # (FSDP1 on CPU: accelerate cannot sync module states there)
    args = tiny_args(output_dir, fsdp=True, fsdp_config={**FSDP2_CONFIG, "version": version, "sync_module_states": False})
    with fsdp_on_cpu():
        SparseTrainer(model=tiny_gpt2(n_embd=64), args=args, train_dataset=RandomTokens(),
                      sparsity_config=SparsityConfig(0.25, block_size=block_size)).train()


def _fully_shard_block_layers():
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(sparsify(tiny_gpt2(n_embd=64), density=0.25, block_size=16))
    SparsityController(model, torch.optim.AdamW(model.parameters()), total_steps=4)


def _block_layers_in_plain_trainer(output_dir):
    model = sparsify(tiny_gpt2(n_embd=64), density=0.25, block_size=16)
    Trainer(model=model, args=tiny_args(output_dir), train_dataset=RandomTokens(), callbacks=[SparsityCallback()]).train()


@pytest.fixture(scope="module")
def messages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refusals")
    run_two_ranks(Path(__file__).resolve(), folder)
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("case, refusal", [("fsdp1", FSDP1_REFUSAL), ("fsdp2_trainer_blocks", BLOCK_LAYERS_REFUSAL),
                                            ("fsdp2_loop_blocks", BLOCK_LAYERS_REFUSAL)])
def test_what_fsdp_cannot_train_is_refused_in_one_line(messages, case, refusal):
    for rank in messages:
        assert rank[case] == refusal and "\n" not in refusal


def test_block_layers_need_sparse_trainer_under_ddp(messages):
    for rank in messages:
        assert "use SparseTrainer instead of Trainer + SparsityCallback" in rank["plain_trainer_blocks"]
        assert "\n" not in rank["plain_trainer_blocks"]


if __name__ == "__main__":  # the two ranks of the torchrun above
    folder = Path(sys.argv[1])
    got = {"plain_trainer_blocks": _message(lambda: _block_layers_in_plain_trainer(folder / "plain")),
           "fsdp1": _message(lambda: _fsdp_sparse_trainer(folder / "fsdp1", version=1, block_size=1)),
           "fsdp2_trainer_blocks": _message(lambda: _fsdp_sparse_trainer(folder / "fsdp2", version=2, block_size=16)),
           "fsdp2_loop_blocks": _message(_fully_shard_block_layers)}
    rank = dist.get_rank() if dist.is_initialized() else -1
    (folder / f"rank{rank}.json").write_text(json.dumps(got))
