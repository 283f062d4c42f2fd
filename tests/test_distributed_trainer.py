"""SparseTrainer on two gloo ranks with batch B each equals one process with batch 2B, on the same data order.

For fine-grained and block-sparse (block 16) layers, with gradient accumulation 2 and topology updates at steps 2,
4 and 6 of 6: the same logged losses, masks and final weights; and again for a 2-rank run resumed from its step-3
checkpoint. (Identical masks on both ranks alone would also hold if nothing ever changed, so the masks are also
checked to have moved.) The ranks run under torchrun; the 1-process references train here, in pytest.
"""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sparse_nlp import SparseTrainer, SparsityConfig, sparse_layers
from torchrun_helpers import run_two_ranks
from trainer_helpers import RandomTokens, tiny_args, tiny_gpt2

BLOCK_SIZES = {"fine": 1, "block": 16}
WHOLE_BATCH, ACCUMULATION, STEPS = 4, 2, 6


def _trainer(output_dir, block_size: int, batch: int) -> SparseTrainer:
    args = tiny_args(output_dir, per_device_train_batch_size=batch, max_steps=STEPS,
                     gradient_accumulation_steps=ACCUMULATION, save_strategy="steps", save_steps=3)
    config = SparsityConfig(density=0.25, update_interval=2, block_size=block_size)
    return SparseTrainer(model=tiny_gpt2(n_embd=64), args=args, train_dataset=RandomTokens(), sparsity_config=config)


def _outcome(trainer: SparseTrainer) -> dict:
    model = trainer.model
    return {
        "losses": torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry]),
        "masks": torch.cat([layer.mask.reshape(-1).to(torch.uint8) for _, layer in sparse_layers(model)]),
        "weights": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        "updates": trainer.sparsity_controller.update_count,
    }


def _gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return parts


def _run_ranks(output_dir: str) -> None:
    results = {}
    for kind, block_size in BLOCK_SIZES.items():
        straight = _trainer(os.path.join(output_dir, kind, "straight"), block_size, WHOLE_BATCH // 2)
        straight.train()
        assert isinstance(straight.model_wrapped, torch.nn.parallel.DistributedDataParallel)
        resumed = _trainer(os.path.join(output_dir, kind, "resumed"), block_size, WHOLE_BATCH // 2)
        resumed.train(resume_from_checkpoint=os.path.join(output_dir, kind, "straight", "checkpoint-3"))
        for name, trainer in (("straight", straight), ("resumed", resumed)):
            outcome = _outcome(trainer)
            outcome["weights_per_rank"] = _gathered(outcome["weights"])
            outcome["masks_per_rank"] = _gathered(outcome["masks"])
            results[f"{kind}/{name}"] = outcome
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(output_dir, "ranks.pt"))


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_ranks")
    run_two_ranks(Path(__file__).resolve(), folder, timeout=400)
    return torch.load(folder / "ranks.pt", weights_only=True)


@pytest.mark.parametrize("kind", list(BLOCK_SIZES))
def test_two_ranks_equal_one_process_with_the_whole_batch(kind, two_rank_results, tmp_path):
    reference = _trainer(tmp_path, BLOCK_SIZES[kind], WHOLE_BATCH)
    reference.train()
    expected = _outcome(reference)
    initial = torch.cat([layer.mask.reshape(-1).to(torch.uint8) for _, layer in sparse_layers(
        _trainer(tmp_path / "initial", BLOCK_SIZES[kind], WHOLE_BATCH).model)])
    assert expected["updates"] == 3 and not torch.equal(expected["masks"], initial)  # the topology did move
    for run in ("straight", "resumed"):
        got = two_rank_results[f"{kind}/{run}"]
        rank0, rank1 = got["weights_per_rank"]
        torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)
        assert torch.equal(got["masks_per_rank"][0], got["masks_per_rank"][1])
        assert got["updates"] == 3, run
        assert torch.equal(got["masks"], expected["masks"]), run
        torch.testing.assert_close(got["losses"], expected["losses"], rtol=1e-5, atol=1e-6, msg=run)
        torch.testing.assert_close(got["weights"], expected["weights"], rtol=1e-4, atol=1e-5, msg=run)


if __name__ == "__main__":  # the two ranks of the torchrun above; --use_cpu: the Trainer sets up a gloo group
    _run_ranks(sys.argv[1])  # its trainers (and their DDP wrappers) are gone when it returns
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
