"""SparseTrainer on two gloo ranks with batch B each equals one process with batch 2B, on the same data order.

For fine-grained and block-sparse (block 16) layers, with gradient accumulation 2 and topology updates at steps 2,
4 and 6 of 6: the same logged losses, masks and final weights; and again for a 2-rank run resumed from its step-3
checkpoint. (Identical masks on both ranks alone would also hold if nothing ever changed, so the masks are also
checked to have moved.) The ranks run under torchrun; the 1-process references train here, in pytest.

"The same" is up to float rounding, which differs between the two (one sum over a batch of 4 against two sums over
2, all-reduced) and with the thread count. One set of weights is rounding alone: see ``_learned``.
"""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

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


def _learned(model) -> torch.Tensor:
    """Which of the flat weights of ``_outcome`` learn from the data: all but the key third of each c_attn bias.

    A key bias adds the same q·b_k to every score in a query's row, and softmax ignores a shift of the whole row, so
    its gradient is zero in exact arithmetic. Backward returns rounding residue instead (~1e-11 here) whose sign and
    size follow the order of the sums: batch 4 against 2 + 2 all-reduced, and the BLAS blocking, which changes with
    the thread count. AdamW divides each step by sqrt(v) + eps, so residue g moves a weight by up to lr * g / eps =
    1e6 * g: ~1e-5 over these 6 steps, as large as those (zero-initialised) entries themselves, in both runs. Compared,
    they passed or failed by chance (they failed with OMP_NUM_THREADS=1: one thread in the reference, like the ranks).
    """
    key_biases = {id(m.c_attn.bias): m.split_size for m in model.modules() if isinstance(m, GPT2Attention)}
    assert key_biases, "no GPT2Attention found: the key biases would be compared (and the test flaky again)"
    parts = []
    for p in model.parameters():
        keep = torch.ones(p.numel(), dtype=torch.bool)
        if id(p) in key_biases:
            size = key_biases[id(p)]
            keep[size:2 * size] = False  # c_attn's output is [query | key | value], split_size each
        parts.append(keep)
    return torch.cat(parts)


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
        assert straight.model_wrapped.broadcast_buffers is False  # the masks: not re-sent at every forward
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
def two_ranks(tmp_path_factory) -> tuple[dict, str]:
    """What the ranks saved, and what they printed on stderr."""
    folder = tmp_path_factory.mktemp("two_ranks")
    done = run_two_ranks(Path(__file__).resolve(), folder, timeout=400)
    return torch.load(folder / "ranks.pt", weights_only=True), done.stderr


def test_ranks_pass_no_deprecated_ddp_setting(two_ranks):
    # torch 2.13 warns on every rank when DDP gets broadcast_buffers; SparseTrainer passes forward_sync_buffers
    assert "broadcast_buffers` is deprecated" not in two_ranks[1]


@pytest.mark.parametrize("kind", list(BLOCK_SIZES))
def test_two_ranks_equal_one_process_with_the_whole_batch(kind, two_ranks, tmp_path):
    reference = _trainer(tmp_path, BLOCK_SIZES[kind], WHOLE_BATCH)
    reference.train()
    expected = _outcome(reference)
    learned = _learned(reference.model)
    initial = torch.cat([layer.mask.reshape(-1).to(torch.uint8) for _, layer in sparse_layers(
        _trainer(tmp_path / "initial", BLOCK_SIZES[kind], WHOLE_BATCH).model)])
    # steps 2 and 4 (step 6's would prune at rate 0: skipped); the topology did move
    assert expected["updates"] == 2 and not torch.equal(expected["masks"], initial)
    for run in ("straight", "resumed"):
        got = two_ranks[0][f"{kind}/{run}"]
        rank0, rank1 = got["weights_per_rank"]
        torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)
        assert torch.equal(got["masks_per_rank"][0], got["masks_per_rank"][1])
        assert got["updates"] == 2, run
        assert torch.equal(got["masks"], expected["masks"]), run
        torch.testing.assert_close(got["losses"], expected["losses"], rtol=1e-5, atol=1e-6, msg=run)
        torch.testing.assert_close(got["weights"][learned], expected["weights"][learned], rtol=1e-4, atol=1e-5, msg=run)


if __name__ == "__main__":  # the two ranks of the torchrun above; --use_cpu: the Trainer sets up a gloo group
    _run_ranks(sys.argv[1])  # its trainers (and their DDP wrappers) are gone when it returns
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
