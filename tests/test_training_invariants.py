"""200 training steps of every tiny model with every method: the invariants hold after every single step."""
from __future__ import annotations

import math

import pytest
import torch

from sparse_nlp import SparsityController, sparse_layers, sparsify
from sparse_nlp.methods import known_methods
from tiny_models import TINY_MODELS, build, example_batch, loss_of

STEPS = 200


def _train_and_check(name: str, method: str, optimizer_name: str):
    model = sparsify(build(name).train(), density=0.2, method=method, update_interval=20)
    params = list(model.parameters())
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-2)
    elif optimizer_name == "sgd":
        optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    else:
        optimizer = torch.optim.Adagrad(params, lr=1e-2)  # keeps no momentum: the controller averages gradients
    controller = SparsityController(model, optimizer, total_steps=STEPS)
    layers = [layer for _, layer in sparse_layers(model)]
    total_planned = sum(layer.target_units for layer in layers)
    batch = example_batch(name)
    updates = 0
    for step in range(1, STEPS + 1):
        before = [layer.mask.clone() for layer in layers]
        loss = loss_of(name, model, batch)
        loss.backward()
        optimizer.step()
        stats = controller.step()
        for layer, old_mask in zip(layers, before):
            assert layer.mask.dtype == torch.bool
            assert torch.all(layer.weight[~layer.mask] == 0), f"step {step}: masked weight not zero"
            grown = layer.mask & ~old_mask
            if stats is None:
                assert torch.equal(layer.mask, old_mask), f"step {step}: mask changed outside an update"
            elif grown.any():
                assert torch.all(layer.weight[grown] == 0), "grown weights must start at 0"
                for slot, value in optimizer.state[layer.weight].items():
                    if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
                        assert torch.all(value[grown] == 0), f"optimizer slot {slot} not reset where grown"
        if stats is not None:
            updates += 1
        nonzeros = [layer.nonzeros for layer in layers]
        if method != "magnitude":
            assert sum(nonzeros) == total_planned, f"step {step}: total drifted"
        if method in ("rigl", "set", "static"):
            assert nonzeros == [layer.target_units for layer in layers]
        optimizer.zero_grad()
        assert math.isfinite(loss.item())
    if method == "magnitude":  # gradual pruning ends exactly at the planned per-layer targets
        assert [layer.nonzeros for layer in layers] == [layer.target_units for layer in layers]
    # every 20 steps; the one at step 200 would prune at rate 0 (cosine's end), so only gradual pruning makes it
    assert updates == {"static": 0, "magnitude": STEPS // 20}.get(method, STEPS // 20 - 1)
    return controller


@pytest.mark.parametrize("method", known_methods())
@pytest.mark.parametrize("name", TINY_MODELS)
def test_invariants_hold_through_training(name, method):
    _train_and_check(name, method, "adamw")


@pytest.mark.parametrize("optimizer_name", ["sgd", "adagrad"])
def test_momentum_from_any_optimizer(optimizer_name):
    controller = _train_and_check("gpt2", "momentum", optimizer_name)
    if optimizer_name == "adagrad":
        assert controller.momentum.gradient_average  # the fallback average was kept
    else:
        assert not controller.momentum.gradient_average


def test_sparse_momentum_moves_weights_between_layers_and_learns():
    model = sparsify(build("gpt2").train(), density=0.2, update_interval=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = SparsityController(model, optimizer, total_steps=100)
    batch = example_batch("gpt2")
    first = None
    for _ in range(100):
        loss = loss_of("gpt2", model, batch)
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
    assert loss.item() < 0.7 * first
    densities = [r.density for r in controller.report()]
    assert max(densities) - min(densities) > 0.02  # redistribution changed per-layer densities
    assert abs(controller.density() - 0.2) < 1e-3
