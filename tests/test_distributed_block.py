"""Block-sparse layers under plain torch DDP: 2 ranks with batch B each equal 1 rank with batch 2B.

DDP skips the block ``values`` (``ignore_block_values_in_ddp``) and ``all_reduce_block_grads`` averages their
gradients after each synchronising backward; accumulation micro-steps run under ``no_sync``. The ranks run under
torchrun; the 1-process reference on the whole batches trains here, in the pytest process.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sparse_nlp.layers.block import BlockSparseLinear
from sparse_nlp.parallel.ddp import all_reduce_block_grads, ignore_block_values_in_ddp
from torchrun_helpers import run_two_ranks

STEPS, ACCUMULATION, GLOBAL_BATCH = 3, 2, 8


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    block_mask = torch.rand(4, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    block_mask[0, 0] = True
    return nn.Sequential(BlockSparseLinear.from_dense(nn.Linear(64, 64), block_mask, 16), nn.ReLU(), nn.Linear(64, 3))


def _batches():
    generator = torch.Generator().manual_seed(2)
    for _ in range(STEPS * ACCUMULATION):
        yield torch.randn(GLOBAL_BATCH, 64, generator=generator), torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)


def _train(model, forward, rank_slice, sync_block_grads, no_sync):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for index, (x, y) in enumerate(_batches()):
        last_micro = (index + 1) % ACCUMULATION == 0
        with (torch.enable_grad() if last_micro else no_sync()):
            loss = nn.functional.cross_entropy(forward(x[rank_slice]), y[rank_slice]) / ACCUMULATION
            loss.backward()
        losses.append(loss.detach())
        if last_micro:
            sync_block_grads()
            optimizer.step()
            optimizer.zero_grad()
    return torch.stack(losses)


def _run(output_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model()
    assert ignore_block_values_in_ddp(model) == ["0.values"]
    ddp = nn.parallel.DistributedDataParallel(model)
    half = GLOBAL_BATCH // world
    losses = _train(model, ddp, slice(rank * half, (rank + 1) * half), lambda: all_reduce_block_grads(model), ddp.no_sync)
    dist.all_reduce(losses)  # per-rank means of equal halves: their sum over ranks / world is the batch mean
    losses /= world
    weights = torch.cat([p.detach().view(-1) for p in model.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(gathered, weights)
    if rank == 0:
        torch.save({"losses": losses, "weights": gathered}, os.path.join(output_dir, "result.pt"))
    del ddp  # its reducer holds the process group: release it before the group is destroyed
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank_with_the_whole_batch(tmp_path):
    run_two_ranks(Path(__file__).resolve(), tmp_path)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    reference = _model()
    reference_losses = _train(reference, reference, slice(None), lambda: None, torch.enable_grad)
    reference_weights = torch.cat([p.detach().view(-1) for p in reference.parameters()])
    torch.testing.assert_close(result["weights"][0], result["weights"][1], rtol=0, atol=0)
    torch.testing.assert_close(result["losses"], reference_losses)
    torch.testing.assert_close(result["weights"][0], reference_weights)
    assert not torch.equal(reference_weights, torch.cat([p.detach().view(-1) for p in _model().parameters()]))


if __name__ == "__main__":  # one rank of the torchrun above
    _run(sys.argv[1])
