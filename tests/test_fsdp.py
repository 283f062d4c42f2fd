"""Fine-grained sparse training under FSDP2 on two gloo ranks equals one process with the whole batch.

Two ways in, each run straight through 8 steps (gradient accumulation 2, topology updates at steps 2, 4 and 6; the
cosine schedule's last, at rate 0, is skipped) and again resumed from its step-3 checkpoint:
- a plain loop: ``fully_shard`` on each GPT-2 block and the root, AdamW, ``clip_active_grad_norm_``, and a
  distributed (sharded) checkpoint of model + optimizer beside the controller's state;
- ``SparseTrainer`` with ``fsdp=True, fsdp_config={"version": 2, ...}`` and sharded checkpoints.
The same logged losses, masks and final weights as one process (up to rounding: see test_distributed_trainer's
``_learned``), masks sharded like their weights, and masked weights exactly 0 on every shard after every step.
And recipes/train_lm.py under the environment ``accelerate launch --config_file recipes/accelerate_fsdp_config.yaml``
gives its processes: it trains, and saves a plain transformers model with the sparse weights gathered.
(accelerate enables FSDP on GPU backends only; ``fsdp_helpers.fsdp_on_cpu`` runs its FSDP path on these CPU ranks.)
"""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sparse_nlp import SparseTrainer, SparsityConfig, SparsityController, sparse_layers, sparsify
from sparse_nlp.parallel.clipping import clip_active_grad_norm_
from sparse_nlp.parallel.fsdp import is_sharded, local, whole
from test_distributed_trainer import _learned
from torchrun_helpers import run_two_ranks
from trainer_helpers import RandomTokens, tiny_args, tiny_gpt2

WHOLE_BATCH, ACCUMULATION, STEPS, SAVED_AT = 4, 2, 8, 3
CONFIG = dict(density=0.25, update_interval=2)


# ---- the plain loop ------------------------------------------------------------------------------------------------
def _plain_model_and_optimizer(sharded: bool):
    model = sparsify(tiny_gpt2(n_embd=64), config=SparsityConfig(**CONFIG))
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, SparsityController(model, optimizer, total_steps=STEPS)


def _masked_weights_are_zero(model) -> bool:
    return all(bool((local(layer.weight.detach())[~local(layer.mask)] == 0).all()) for _, layer in sparse_layers(model))


def _plain_loop(folder: Path, sharded: bool, resume: bool = False) -> dict:
    """Train; under ``sharded`` each of the two ranks takes its half of every micro-batch."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optimizer, controller = _plain_model_and_optimizer(sharded)
    first = 0
    if resume:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=str(folder / "checkpoint"))
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
        controller.load_state_dict(torch.load(folder / "controller.pt", weights_only=True))
        first = SAVED_AT
    ids = RandomTokens().ids
    half = WHOLE_BATCH // 2
    losses, zero_after_every_step = [], True
    for step in range(first, STEPS):
        total = torch.zeros(())
        for micro in range(ACCUMULATION):
            start = (step * ACCUMULATION + micro) * WHOLE_BATCH
            batch = ids[start:start + WHOLE_BATCH]
            if sharded:
                batch = batch[dist.get_rank() * half:(dist.get_rank() + 1) * half]
            loss = model(batch, labels=batch).loss / ACCUMULATION
            loss.backward()
            total += loss.detach()
        clip_active_grad_norm_(model, 1.0)
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
        zero_after_every_step &= _masked_weights_are_zero(model)
        losses.append(total)
        if step + 1 == SAVED_AT and not resume and sharded:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / "checkpoint"))
            saved = controller.state_dict()  # on every rank
            if dist.get_rank() == 0:
                torch.save(saved, folder / "controller.pt")
    losses = torch.stack(losses)
    if sharded:  # each rank's loss is of its half: the whole batch's is their mean
        dist.all_reduce(losses)
        losses /= dist.get_world_size()
    return _outcome(model, losses, controller) | {"zero_after_every_step": zero_after_every_step}


def _outcome(model, losses: torch.Tensor, controller) -> dict:
    layers = sparse_layers(model)
    return {
        "losses": losses,
        "masks": torch.cat([whole(layer.mask).reshape(-1).to(torch.uint8) for _, layer in layers]),
        "weights": torch.cat([whole(p.detach()).reshape(-1) for p in model.parameters()]),
        "updates": controller.update_count,
        "sharded_masks": all(is_sharded(layer.mask) for _, layer in layers),
        "nonzeros": [layer.nonzeros for _, layer in layers],
    }


# ---- SparseTrainer ---------------------------------------------------------------------------------------------------
def _trainer(output_dir, batch: int, fsdp: bool) -> SparseTrainer:
    from fsdp_helpers import FSDP2_CONFIG

    extra = {"fsdp": True, "fsdp_config": FSDP2_CONFIG} if fsdp else {}
    args = tiny_args(output_dir, per_device_train_batch_size=batch, max_steps=STEPS, gradient_accumulation_steps=ACCUMULATION,
                     save_strategy="steps", save_steps=SAVED_AT, max_grad_norm=1.0, **extra)
    return SparseTrainer(model=tiny_gpt2(n_embd=64), args=args, train_dataset=RandomTokens(),
                         sparsity_config=SparsityConfig(**CONFIG))


def _trainer_outcome(trainer: SparseTrainer) -> dict:
    losses = torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    outcome = _outcome(trainer.model, losses, trainer.sparsity_controller)
    return outcome | {"zero_after_every_step": _masked_weights_are_zero(trainer.model)}


def _recipe_under_the_shipped_config(folder: Path) -> dict:
    from fsdp_helpers import fsdp_on_cpu, launcher_environment
    from test_recipe import ROOT, _tiny_flags, _write_text, train_lm

    train, valid = folder / "train.txt", folder / "valid.txt"
    if dist.get_rank() == 0:
        folder.mkdir(parents=True)
        _write_text(train, 600, 0), _write_text(valid, 60, 1)
    dist.barrier()
    os.environ.update(launcher_environment(str(ROOT / "recipes" / "accelerate_fsdp_config.yaml")))
    flags = _tiny_flags(folder / "out", folder / "cache", "--train_file", str(train), "--validation_file", str(valid),
                        "--use_cpu", "true", "--dense_baseline", "false", "--config_overrides", "n_layer=2,n_embd=32,n_head=2")
    with fsdp_on_cpu():
        (result,) = train_lm.main(flags)
    return {"density": result.density, "val_perplexity": result.val_perplexity, "updates": result.topology_updates}


MEMORY_BENCH_MODEL = ["--n_layer", "2", "--n_embd", "64", "--seq_length", "16"]


def _memory_bench(mode: str = "fsdp2") -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_fsdp_memory import main

    return main(["--mode", mode, *MEMORY_BENCH_MODEL])


def _run_ranks(folder: Path) -> None:
    from fsdp_helpers import fsdp_on_cpu

    results = {"loop/straight": _plain_loop(folder / "loop", sharded=True)}
    results["loop/resumed"] = _plain_loop(folder / "loop", sharded=True, resume=True)
    with fsdp_on_cpu():
        straight = _trainer(folder / "trainer" / "straight", WHOLE_BATCH // 2, fsdp=True)
        straight.train()
        assert all(is_sharded(p) for p in straight.model.parameters())  # accelerate's fully_shard path ran
        results["trainer/straight"] = _trainer_outcome(straight)
        resumed = _trainer(folder / "trainer" / "resumed", WHOLE_BATCH // 2, fsdp=True)
        resumed.train(resume_from_checkpoint=str(folder / "trainer" / "straight" / f"checkpoint-{SAVED_AT}"))
        results["trainer/resumed"] = _trainer_outcome(resumed)
    results["memory"] = _memory_bench()
    results["recipe"] = _recipe_under_the_shipped_config(folder / "recipe")  # last: it sets accelerate's variables
    if dist.get_rank() == 0:
        torch.save(results, folder / "ranks.pt")


@pytest.fixture(scope="module")
def ranks_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fsdp")
    run_two_ranks(Path(__file__).resolve(), folder, timeout=400)
    return folder


@pytest.fixture(scope="module")
def two_ranks(ranks_folder) -> dict:
    return torch.load(ranks_folder / "ranks.pt", weights_only=True)


def _reference(way: str, folder: Path) -> tuple[dict, torch.Tensor]:
    if way == "loop":
        expected = _plain_loop(folder, sharded=False)
        model = tiny_gpt2(n_embd=64)
    else:
        trainer = _trainer(folder, WHOLE_BATCH, fsdp=False)
        trainer.train()
        expected, model = _trainer_outcome(trainer), trainer.model
    return expected, _learned(model)


@pytest.mark.parametrize("way", ["loop", "trainer"])
def test_fsdp2_two_ranks_equal_one_process_with_the_whole_batch(way, two_ranks, tmp_path):
    expected, learned = _reference(way, tmp_path)
    initial = torch.cat([layer.mask.reshape(-1).to(torch.uint8) for _, layer in sparse_layers(
        sparsify(tiny_gpt2(n_embd=64), config=SparsityConfig(**CONFIG)))])
    assert expected["updates"] == 3 and not torch.equal(expected["masks"], initial)  # the topology did move
    for run in ("straight", "resumed"):
        got = two_ranks[f"{way}/{run}"]
        assert got["sharded_masks"] and got["zero_after_every_step"], run
        assert got["updates"] == 3, run
        assert torch.equal(got["masks"], expected["masks"]), run
        assert got["nonzeros"] == expected["nonzeros"], run
        # (the resumed loop returns the steps after its checkpoint; the Trainer's log history holds them all)
        reference = expected["losses"][SAVED_AT:] if (way, run) == ("loop", "resumed") else expected["losses"]
        torch.testing.assert_close(got["losses"], reference, rtol=1e-5, atol=1e-6, msg=run)
        torch.testing.assert_close(got["weights"][learned], expected["weights"][learned], rtol=1e-4, atol=1e-5, msg=run)


def test_memory_bench_counts_half_of_everything_per_rank_on_two_ranks(two_ranks):
    replicated, sharded = _memory_bench("replicated"), two_ranks["memory"]
    assert replicated["topology_updates"] == sharded["topology_updates"] == 1
    assert sharded["bytes"]["masks"] * 2 == replicated["bytes"]["masks"] > 0  # sharded beside their weights
    for kind in ("parameters", "gradients", "optimizer_state"):  # rank 0 holds the odd 50,257th embedding row
        assert abs(sharded["bytes"][kind] * 2 - replicated["bytes"][kind]) <= 1e-3 * replicated["bytes"][kind], kind


def test_recipe_under_the_shipped_fsdp_config_trains_and_saves_a_plain_sparse_model(two_ranks, ranks_folder):
    from transformers import AutoModelForCausalLM

    got = two_ranks["recipe"]
    assert abs(got["density"] - 0.2) < 0.01 and got["updates"] == 1 and 1 < got["val_perplexity"] < 1000
    saved = AutoModelForCausalLM.from_pretrained(ranks_folder / "recipe" / "out" / "sparse")  # whole, plain weights
    linear = [m.weight for name, m in saved.named_modules() if name.endswith(("c_attn", "c_proj", "c_fc"))]
    nonzero = sum(int((w != 0).sum()) for w in linear) / sum(w.numel() for w in linear)
    assert abs(nonzero - got["density"]) < 0.005


if __name__ == "__main__":  # the two ranks of the torchrun above
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    _run_ranks(Path(sys.argv[1]))
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
