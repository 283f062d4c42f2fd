"""Gradient clipping by the norm of what the optimizer applies: dense unchanged, sparse by the active-only norm."""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from sparse_nlp import SparsityConfig, sparsify
from sparse_nlp.integrations.trainer import SparseTrainer
from sparse_nlp.layers.masked import SparseLinear
from sparse_nlp.parallel.clipping import active_grad_norm, clip_active_grad_norm_
from trainer_helpers import RandomTokens, tiny_args, tiny_gpt2


def _backward(model) -> None:
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()


def test_dense_model_clips_exactly_as_torch():
    ours, theirs = tiny_gpt2(), tiny_gpt2()
    _backward(ours), _backward(theirs)
    norm = clip_active_grad_norm_(ours, 0.1)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1)
    assert torch.equal(norm, expected) and norm > 0.1
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_sparse_model_clips_by_the_active_norm_and_scales_every_gradient():
    model = sparsify(tiny_gpt2(), density=0.2)
    _backward(model)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    before = {id(p): p.grad.clone() for p in model.parameters()}
    squares = sum(float(torch.where(l.mask, l.weight.grad, 0).pow(2).sum()) for l in layers)
    squares += sum(float(p.grad.pow(2).sum()) for p in model.parameters() if all(p is not l.weight for l in layers))
    full = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    active = active_grad_norm(model)
    torch.testing.assert_close(active, torch.tensor(squares).sqrt(), rtol=1e-5, atol=0)
    assert active < full  # the straight-through mask sends gradients to absent weights too
    norm = clip_active_grad_norm_(model, 0.1)
    assert torch.equal(norm, active)
    scale = 0.1 / (float(active) + 1e-6)
    for param in model.parameters():  # one coefficient for all, absent positions included (momentum statistics)
        torch.testing.assert_close(param.grad, before[id(param)] * scale)
    torch.testing.assert_close(active_grad_norm(model), torch.tensor(0.1), rtol=1e-4, atol=0)
    assert any(bool((~l.mask & (l.weight.grad != 0)).any()) for l in layers)


class _NormsBeforeStep(TrainerCallback):
    """Gradient norms as the optimizer gets them (after the Trainer's clip)."""

    def __init__(self):
        self.active, self.full = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.active.append(float(active_grad_norm(model)))
        self.full.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])))


def _train(tmp_path, config: SparsityConfig, max_grad_norm: float) -> tuple[_NormsBeforeStep, list[dict]]:
    norms = _NormsBeforeStep()
    trainer = SparseTrainer(
        model=tiny_gpt2(), args=tiny_args(tmp_path, max_steps=3, max_grad_norm=max_grad_norm), train_dataset=RandomTokens(),
        sparsity_config=config, callbacks=[norms],
    )
    trainer.train()
    return norms, [entry for entry in trainer.state.log_history if "grad_norm" in entry]


def test_sparse_trainer_clips_sparse_runs_by_the_active_norm(tmp_path):
    norms, logs = _train(tmp_path, SparsityConfig(density=0.2, update_interval=2), max_grad_norm=1e-3)
    for active, full in zip(norms.active, norms.full):
        assert abs(active - 1e-3) < 1e-7  # clipped to max_grad_norm by the norm of what the optimizer applies
        assert full > 1.005e-3  # the absent weights' gradients are kept (scaled, not zeroed)
    assert all(entry["grad_norm"] > 1e-3 for entry in logs) and len(logs) == 3  # the logged norm is the active one


def test_sparse_trainer_keeps_the_trainers_clip_for_dense_runs(tmp_path):
    norms, logs = _train(tmp_path, SparsityConfig(method="dense", density=1.0), max_grad_norm=1e-3)
    for active, full in zip(norms.active, norms.full):
        assert active == full and abs(full - 1e-3) < 1e-7
    assert len(logs) == 3
