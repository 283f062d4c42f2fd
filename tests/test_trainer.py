"""SparseTrainer and SparsityCallback: invariants through the Trainer loop, logging, checkpoints and resume."""
from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainerControl, TrainerState

from sparse_nlp import SparseTrainer, SparsityCallback, SparsityConfig, sparse_layers, sparsify, unsparsify
from sparse_nlp.integrations.callback import CONTROLLER_FILE
from trainer_helpers import RandomTokens, masks, tiny_args, tiny_gpt2


def _assert_invariants(model, density):
    layers = sparse_layers(model)
    for name, layer in layers:
        assert torch.all(layer.weight[~layer.mask] == 0), f"{name}: masked weights are not zero"
    total = sum(layer.mask.numel() for _, layer in layers)
    assert sum(layer.nonzeros for _, layer in layers) == sum(layer.target_units for _, layer in layers)
    assert abs(sum(layer.nonzeros for _, layer in layers) / total - density) < 1 / len(layers) / 100 + 1e-3


class CountOptimizerSteps(TrainerCallback):
    def __init__(self):
        self.calls = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.calls += 1


def test_gradient_accumulation_counts_optimizer_steps_only(tmp_path):
    model = tiny_gpt2()
    counter = CountOptimizerSteps()
    config = SparsityConfig(density=0.2, update_interval=2)
    trainer = SparseTrainer(
        model=model, args=tiny_args(tmp_path, max_steps=7, gradient_accumulation_steps=3), train_dataset=RandomTokens(),
        sparsity_config=config, callbacks=[counter],
    )
    trainer.train()
    controller = trainer.sparsity_controller
    assert counter.calls == 7 == controller.step_count == trainer.state.global_step  # not 21 micro-batches
    assert controller.update_count == 3  # steps 2, 4, 6
    _assert_invariants(model, 0.2)
    assert controller.density() == pytest.approx(0.2, abs=1e-3)


def test_metrics_reach_the_logs(tmp_path):
    trainer = SparseTrainer(
        model=tiny_gpt2(), args=tiny_args(tmp_path, max_steps=4), train_dataset=RandomTokens(),
        sparsity_config=SparsityConfig(density=0.3, update_interval=2),
    )
    trainer.train()
    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(step_logs) == 4
    assert all(entry["sparsity/density"] == pytest.approx(0.3, abs=1e-3) for entry in step_logs)
    layer_key = "sparsity/transformer.h.0.mlp.c_fc"
    with_layers = [entry["step"] for entry in step_logs if layer_key in entry]
    assert with_layers == [1, 2]  # first log, then the log after the update at step 2 (step 4's, at rate 0, skipped)
    assert step_logs[0]["sparsity/prune_rate"] > step_logs[-1]["sparsity/prune_rate"]  # cosine decay
    assert step_logs[-1]["sparsity/updates"] == 1


def test_plain_trainer_with_callback(tmp_path):
    model = sparsify(tiny_gpt2(), 0.25, update_interval=2)
    trainer = Trainer(model=model, args=tiny_args(tmp_path), train_dataset=RandomTokens(), callbacks=[SparsityCallback()])
    trainer.train()
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SparsityCallback))
    assert callback.controller.step_count == 6 and callback.controller.update_count == 2  # steps 2, 4 (6: rate 0)
    assert all("sparsity/density" in entry for entry in trainer.state.log_history if "loss" in entry)
    _assert_invariants(model, 0.25)


def test_skipped_optimizer_step_is_not_a_topology_step():
    model = sparsify(tiny_gpt2(), 0.2, update_interval=1)
    optimizer = torch.optim.AdamW(model.parameters())
    callback = SparsityCallback()
    state, control = TrainerState(max_steps=10), TrainerControl()
    callback.on_train_begin(None, state, control, model=model, optimizer=optimizer)
    before = masks(model)
    callback.on_optimizer_step(None, state, control, optimizer=SimpleNamespace(step_was_skipped=True))
    assert callback.controller.step_count == 0 and callback.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in masks(model).items())
    callback.on_optimizer_step(None, state, control, optimizer=SimpleNamespace(step_was_skipped=False))
    assert callback.controller.step_count == 1 and callback.controller.update_count == 1


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def _resume_run(output_dir, resume=None, callbacks=(), density=0.2, n_embd=32):
    trainer = SparseTrainer(
        model=tiny_gpt2(n_embd=n_embd), args=tiny_args(output_dir, max_steps=8, save_strategy="steps", save_steps=4),
        train_dataset=RandomTokens(), sparsity_config=SparsityConfig(density=density, update_interval=3),
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _losses(trainer):
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def test_checkpoint_kill_resume_matches_uninterrupted(tmp_path):
    full = _resume_run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        _resume_run(tmp_path / "killed", callbacks=[CrashAt(6)])  # dies after checkpoint-4 and an update at step 6
    checkpoint = tmp_path / "killed" / "checkpoint-4"
    assert (checkpoint / CONTROLLER_FILE).is_file()
    assert any(k.endswith(".mask") for k in load_file(checkpoint / "model.safetensors"))
    resumed = _resume_run(tmp_path / "killed", resume=str(checkpoint))
    full_losses, resumed_losses = _losses(full), _losses(resumed)
    assert sorted(resumed_losses) == list(range(1, 9))  # steps 1-4 come from the checkpoint's trainer_state.json
    for step in resumed_losses:
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5), f"loss differs at step {step}"
    for key, mask in masks(full.model).items():
        assert torch.equal(mask, masks(resumed.model)[key]), key
    assert resumed.sparsity_controller.step_count == 8 and resumed.sparsity_controller.update_count == 2
    torch.testing.assert_close(resumed.model.state_dict(), full.model.state_dict())


def test_resume_refuses_another_density_or_model(tmp_path):
    _resume_run(tmp_path / "a")
    checkpoint = str(tmp_path / "a" / "checkpoint-8")
    with pytest.raises(ValueError, match="density=0.2.*density=0.5"):
        _resume_run(tmp_path / "b", resume=checkpoint, density=0.5)
    with pytest.raises(ValueError, match="different model"):
        _resume_run(tmp_path / "c", resume=checkpoint, n_embd=16)
    dense = SparseTrainer(model=tiny_gpt2(), args=tiny_args(tmp_path / "d"), sparsity_config=SparsityConfig(method="dense"))
    with pytest.raises(ValueError, match="from a sparse run but this run is dense"):
        dense.train(resume_from_checkpoint=checkpoint)
    shutil.rmtree(tmp_path / "b", ignore_errors=True)
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        _resume_run(tmp_path / "b", resume=True)


def test_resume_true_finds_last_checkpoint(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _resume_run(tmp_path, callbacks=[CrashAt(5)])
    resumed = _resume_run(tmp_path, resume=True)
    assert resumed.sparsity_controller.step_count == 8


def test_settings_must_match_the_sparsified_model(tmp_path):
    model = sparsify(tiny_gpt2(), 0.2)
    with pytest.raises(ValueError, match="density=0.2.*density=0.5"):
        SparseTrainer(model=model, args=tiny_args(tmp_path), sparsity_config=SparsityConfig(density=0.5))
    with pytest.raises(ValueError, match="no sparsity settings"):
        SparseTrainer(model=tiny_gpt2(), args=tiny_args(tmp_path))
    trainer = SparseTrainer(model=model, args=tiny_args(tmp_path))  # the model's own settings
    assert trainer.sparsity_config.density == 0.2
    assert trainer.args.ddp_broadcast_buffers is None  # args stay as given (DDP's setting: test_distributed_trainer)


def test_dense_method_trains_without_sparsity(tmp_path):
    model = tiny_gpt2()
    trainer = SparseTrainer(model=model, args=tiny_args(tmp_path, max_steps=2), train_dataset=RandomTokens(),
                            sparsity_config=SparsityConfig(method="dense"))
    trainer.train()
    assert not sparse_layers(model) and trainer.sparsity_controller is None
    assert not any("sparsity/density" in e for e in trainer.state.log_history)


def test_trained_model_saves_as_a_plain_pretrained_model(tmp_path):
    trainer = SparseTrainer(model=tiny_gpt2(), args=tiny_args(tmp_path, max_steps=3), train_dataset=RandomTokens(),
                            sparsity_config=SparsityConfig(density=0.2, update_interval=1))
    trainer.train()
    model = trainer.model.eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # ties survive sparsify + Trainer
    inputs = RandomTokens(size=2, seed=1).ids
    with torch.no_grad():
        expected = model(inputs).logits
    unsparsify(model).save_pretrained(tmp_path / "plain")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs).logits, expected)
    density = sum(int((reloaded.get_submodule(n).weight != 0).sum()) for n in ("transformer.h.0.mlp.c_fc",))
    assert density == pytest.approx(0.2 * 32 * 128, rel=0.6)  # the zeros are there (per-layer share varies)
    assert os.path.isfile(tmp_path / "plain" / "model.safetensors")
