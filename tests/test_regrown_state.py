"""The AdamW state a regrown weight starts with (``regrown_state``), against what a fresh parameter would do.

Every position sees the same constant gradient ``g`` at every step, so everything has a closed form: an established
weight, and a fresh AdamW parameter with its own step count, both step exactly ``lr * sign(g)`` (Adam's m_hat / sqrt(
v_hat) = g / |g|). The layer has trained ``T`` steps when the update regrows weights; AdamW's bias correction then
uses T + k at a weight k steps after its regrowth.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparse_nlp import SparsityConfig, SparsityController, sparse_layers, sparsify
from sparse_nlp.methods import get_method
from sparse_nlp.parallel.ddp import Replicas
from sparse_nlp.topology.context import UpdateContext
from sparse_nlp.topology.optimizer_state import SCALE_SLOTS

BETA1, BETA2 = 0.9, 0.999
T = 1000  # steps before the update (the study's updates come every 100 of 1,600)
LR = 0.01


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4, bias=False)


def _trained(regrown_state: str):
    """A layer at step T of a constant gradient: the AdamW state that T steps of it leave, set directly."""
    model = sparsify(OneLayer(), density=0.5, prune_rate=0.5, regrown_state=regrown_state)
    layer = sparse_layers(model)[0][1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(BETA1, BETA2), weight_decay=0.0)
    gradient = torch.linspace(0.1, 2.0, 32).reshape(4, 8) * torch.tensor([1.0, -1.0]).repeat(16).reshape(4, 8)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) + 3.0)
        layer.apply_mask()
    optimizer.state[layer.weight].update(step=torch.tensor(float(T)), exp_avg=gradient * (1 - BETA1**T),
                                         exp_avg_sq=gradient**2 * (1 - BETA2**T))
    controller = SparsityController(model, optimizer, total_steps=100 * T)
    return layer, optimizer, controller, gradient


def _regrow(layer, controller):
    """Update the topology; the regrown positions (new ones and those pruned and regrown in place) and the rest."""
    mask, weight = layer.mask.clone(), layer.weight.detach().clone()
    controller.update()
    grown = (layer.mask & ~mask) | (layer.mask & mask & (layer.weight == 0) & (weight != 0))
    assert grown.any()
    return grown, layer.mask & ~grown


def _steps(layer, optimizer, controller, gradient, steps):
    """Train ``steps`` steps of the constant gradient; each step's |update| / lr (a fresh parameter's is 1)."""
    sizes = []
    for _ in range(steps):
        before = layer.weight.detach().clone()
        layer.weight.grad = gradient.clone()
        optimizer.step()
        sizes.append((layer.weight.detach() - before).abs() / LR)
        controller.apply_masks()
    return sizes


def _normalised_momentum(layer, optimizer):
    state = optimizer.state[layer.weight]
    return (state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)).abs()


@pytest.mark.parametrize("regrown_state", ["reset", "fresh", "keep"])
def test_regrown_weights_step_like_a_fresh_parameter_unless_reset(regrown_state):
    layer, optimizer, controller, gradient = _trained(regrown_state)
    grown, established = _regrow(layer, controller)
    sizes = _steps(layer, optimizer, controller, gradient, 100)
    largest = max(size[grown].max().item() for size in sizes)
    for size in sizes:  # established weights step exactly as a fresh parameter would, whatever the state rule
        torch.testing.assert_close(size[established], torch.ones_like(size[established]), rtol=1e-3, atol=0)
    read = _normalised_momentum(layer, optimizer)  # what the next update (here after 100 steps) scores
    momentum_ratio = read[grown].mean().item() / read[established].mean().item()
    if regrown_state == "reset":
        # Zeroed exp_avg_sq is bias-corrected by 1 - b2^(T+k), not 1 - b2^k: steps (1 - b1^k) / sqrt(1 - b2^k) too
        # large (here k = 1: 2.5x; k = 10: 5.2x), momentum sqrt((1 - b2^(T+100)) / (1 - b2^100)) = 2.6x too large.
        k = torch.arange(1, 101, dtype=torch.float64)
        predicted = (1 - BETA1**k) / (1 - BETA1 ** (T + k)) / ((1 - BETA2**k) / (1 - BETA2 ** (T + k))).sqrt()
        measured = torch.tensor([size[grown].mean().item() for size in sizes], dtype=torch.float64)
        torch.testing.assert_close(measured, predicted, rtol=1e-3, atol=0)
        assert largest > 5
        assert momentum_ratio == pytest.approx(((1 - BETA2 ** (T + 100)) / (1 - BETA2**100)) ** 0.5, rel=1e-2)
    elif regrown_state == "fresh":
        # Never larger than a fresh parameter's step: momentum builds up as 1 - b1^k on the kept gradient scale.
        assert largest <= 1 + 1e-3
        assert sizes[0][grown].mean().item() == pytest.approx((1 - BETA1) / (1 - BETA1 ** (T + 1)), rel=1e-3)
        assert sizes[-1][grown].min().item() >= 0.99
        assert momentum_ratio == pytest.approx(1.0, rel=1e-2)  # the next update reads it on the layer's scale
    else:  # keep: the momentum gathered while absent, full steps at once
        assert sizes[0][grown].min().item() == pytest.approx(1.0, rel=1e-3) and largest <= 1 + 1e-3
        assert momentum_ratio == pytest.approx(1.0, rel=1e-2)


def test_fresh_zeroes_the_momentum_slots_and_keeps_the_scale_slots():
    layer, optimizer, controller, _ = _trained("fresh")
    state = optimizer.state[layer.weight]
    state["max_exp_avg_sq"] = state["exp_avg_sq"] * 2  # an AMSGrad slot: a scale too
    before = {slot: value.clone() for slot, value in state.items() if slot != "step"}
    grown, _ = _regrow(layer, controller)
    assert torch.all(state["exp_avg"][grown] == 0)
    assert torch.equal(state["exp_avg"][~grown], before["exp_avg"][~grown])
    for slot in ("exp_avg_sq", "max_exp_avg_sq"):
        assert slot in SCALE_SLOTS and torch.equal(state[slot], before[slot])
    assert torch.all(layer.weight[grown] == 0)  # the weight itself starts at 0, as under every rule


def test_fresh_zeroes_sgd_momentum_as_reset_does():
    model = sparsify(OneLayer(), density=0.5, prune_rate=0.5, regrown_state="fresh")
    layer = sparse_layers(model)[0][1]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.state[layer.weight]["momentum_buffer"] = torch.ones(4, 8)
    controller = SparsityController(model, optimizer, total_steps=1000)
    with torch.no_grad():
        layer.weight.add_(1.0)
        layer.apply_mask()
    grown, _ = _regrow(layer, controller)
    assert torch.all(optimizer.state[layer.weight]["momentum_buffer"][grown] == 0)
    assert torch.all(optimizer.state[layer.weight]["momentum_buffer"][~grown] == 1)


# ---- block-sparse layers: no state is kept for absent blocks; fresh fills the scale from the collected gradients
BLOCK = 16


def _block_layer_at_step_T():
    """A 32 -> 32 block layer (2 of 4 blocks live) at step T of the constant gradient g, as _trained sets it."""
    holder = nn.Sequential(nn.Linear(32, 32, bias=False))
    sparsify(holder, density=0.5, block_size=BLOCK)
    layer = holder[0]
    optimizer = torch.optim.AdamW(holder.parameters(), lr=LR, betas=(BETA1, BETA2), weight_decay=0.0)
    gradient = torch.linspace(0.1, 2.0, 32 * 32).reshape(32, 32) * torch.tensor([1.0, -1.0]).repeat(512).reshape(32, 32)
    live = layer.block_mask.view(-1).nonzero().squeeze(1)
    blocks = gradient.view(2, BLOCK, 2, BLOCK).transpose(1, 2).reshape(4, BLOCK, BLOCK)
    optimizer.state[layer.values].update(step=torch.tensor(float(T)), exp_avg=blocks[live] * (1 - BETA1**T),
                                         exp_avg_sq=blocks[live] ** 2 * (1 - BETA2**T))
    return layer, optimizer, gradient, blocks


@pytest.mark.parametrize("fresh", [False, True])
def test_new_blocks_step_like_a_fresh_parameter_when_their_scale_comes_from_the_window(fresh):
    layer, optimizer, gradient, blocks = _block_layer_at_step_T()
    old = layer.block_mask.clone()
    new_mask = ~old  # every live block out, every absent one in
    # one collected step of gradient g: its mean square is g^2, what "fresh" fills the new blocks' scale from
    layer.dense_grads.add(gradient.clone(), ema_beta=None, squares=True)
    config = SparsityConfig(block_size=BLOCK, regrown_state="fresh" if fresh else "reset")
    context = UpdateContext(optimizer, get_method(config.method), config, torch.Generator(), Replicas())
    layer.apply_update(SimpleNamespace(mask=new_mask), torch.empty(0, dtype=torch.long), context)
    new = new_mask.view(-1).nonzero().squeeze(1)  # every live block is new, in grid order
    assert sorted(new.tolist()) == sorted(new_mask.view(-1).nonzero().squeeze(1).tolist())
    state = optimizer.state[layer.values]
    assert torch.all(state["exp_avg"] == 0)
    expected_sq = blocks[new] ** 2 * (1 - BETA2**T) if fresh else torch.zeros_like(state["exp_avg_sq"])
    torch.testing.assert_close(state["exp_avg_sq"], expected_sq)
    before = layer.values.detach().clone()
    layer.values.grad = blocks[new].clone()
    optimizer.step()
    size = ((layer.values.detach() - before).abs() / LR).mean().item()
    if fresh:  # momentum builds from zero on the established scale: (1 - b1) / (1 - b1^(T+1)) of a full step
        assert size == pytest.approx((1 - BETA1) / (1 - BETA1 ** (T + 1)), rel=1e-3)
    else:  # zeroed scale under the tensor's bias correction: far larger than a fresh parameter's first step
        assert size > 2


@pytest.mark.parametrize("method", ["momentum", "set"])  # set scores nothing: the window is collected for fresh
def test_a_block_run_with_fresh_regrowth_fills_the_new_blocks_scale_from_the_collected_gradients(method):
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(64, 64, bias=False))
    sparsify(holder, density=0.25, block_size=BLOCK, update_interval=4, momentum_window=2, regrown_state="fresh",
             block_scores="collected", prune_rate=0.5, method=method)
    target = torch.randn(64, 64)
    layer = holder[0]
    optimizer = torch.optim.AdamW(holder.parameters(), lr=LR)
    controller = SparsityController(holder, optimizer, total_steps=40)
    grown = False
    for _ in range(12):
        x = torch.randn(8, 64)
        (holder(x) - x @ target).pow(2).sum().backward()
        old = layer.block_mask.clone()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
        if not torch.equal(old, layer.block_mask):
            new_rows = [i for i, p in enumerate(layer.block_mask.view(-1).nonzero().squeeze(1).tolist())
                        if not old.view(-1)[p]]
            exp_avg_sq = optimizer.state[layer.values]["exp_avg_sq"]
            assert all(exp_avg_sq[r].min() > 0 for r in new_rows)
            grown = True
    assert grown
