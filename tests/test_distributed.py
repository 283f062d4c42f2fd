"""Two CPU processes on gloo (DDP through the Trainer): every rank ends with the same masks and weights.

The test starts ``torchrun --standalone --nproc_per_node 2`` on this file (a fresh process: forking the pytest
process after torch has run OpenMP work can hang). ``--use_cpu`` makes the Trainer set up DDP over gloo.
SparseTrainer turns DDP's per-forward buffer broadcast off, so equal masks here are the controller's doing.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sparse_nlp import SparseTrainer, SparsityConfig, sparse_layers
from torchrun_helpers import run_two_ranks
from trainer_helpers import RandomTokens, tiny_args, tiny_gpt2


def _train_and_gather(output_dir):
    trainer = SparseTrainer(
        model=tiny_gpt2(), args=tiny_args(output_dir, max_steps=6, gradient_accumulation_steps=2),
        train_dataset=RandomTokens(), sparsity_config=SparsityConfig(density=0.2, update_interval=2),
    )
    trainer.train()
    assert dist.is_initialized() and dist.get_world_size() == 2, "expected a 2-process group"
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    assert trainer.args.ddp_broadcast_buffers is False
    controller = trainer.sparsity_controller
    assert controller.step_count == 6 and controller.update_count == 3
    model = trainer.model
    masks = torch.cat([layer.mask.view(-1).to(torch.uint8) for _, layer in sparse_layers(model)])
    weights = torch.cat([p.detach().view(-1) for p in model.parameters()])
    gathered_masks = [torch.empty_like(masks) for _ in range(2)]
    gathered_weights = [torch.empty_like(weights) for _ in range(2)]
    dist.all_gather(gathered_masks, masks)
    dist.all_gather(gathered_weights, weights)
    if dist.get_rank() == 0:
        torch.save({"masks": gathered_masks, "weights": gathered_weights}, os.path.join(output_dir, "gathered.pt"))


def test_two_ranks_hold_identical_masks(tmp_path):
    run_two_ranks(Path(__file__).resolve(), tmp_path)
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)
    rank0, rank1 = gathered["masks"]
    assert torch.equal(rank0, rank1)
    assert rank0.sum() > 0 and abs(rank0.float().mean().item() - 0.2) < 1e-3
    torch.testing.assert_close(gathered["weights"][0], gathered["weights"][1], rtol=0, atol=0)


if __name__ == "__main__":  # one rank of the torchrun above
    _train_and_gather(sys.argv[1])
