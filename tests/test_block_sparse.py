"""Block-sparse layers (block_size > 1): exact block counts, outputs and gradients equal to the masked dense
computation, memory in proportion to density, every method's invariants through training, checkpoints, export."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparse_nlp import SparsityController, sparse_layers, sparsify, unsparsify
from sparse_nlp.layers.block import BlockSparseLinear
from sparse_nlp.methods import known_methods
from sparse_nlp.topology.allocation import plan_nonzeros
from tiny_models import LANGUAGE_MODELS, build, example_batch, loss_of, output_of

BLOCK = 16  # the tiny models' widths (32, 64, 96) divide by it


def _blocks(layer: BlockSparseLinear) -> int:
    return int(layer.block_mask.sum())


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_block_counts_are_exact_and_only_live_blocks_are_stored(name):
    model = sparsify(build(name), density=0.25, block_size=BLOCK)
    layers = [layer for _, layer in sparse_layers(model)]
    assert all(isinstance(layer, BlockSparseLinear) for layer in layers)
    grids = [tuple(layer.block_mask.shape) for layer in layers]
    assert [_blocks(layer) for layer in layers] == plan_nonzeros(grids, 0.25, "uniform")
    for layer in layers:
        assert layer.values.shape == (_blocks(layer), BLOCK, BLOCK)
        assert layer.nonzeros == _blocks(layer) * BLOCK * BLOCK


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_block_sparse_forward_equals_masked_dense(name):
    model = sparsify(build(name), density=0.3, block_size=BLOCK)
    batch = example_batch(name)
    with torch.no_grad():
        sparse_out = output_of(model, batch)
        dense_out = output_of(unsparsify(model), batch)
    torch.testing.assert_close(sparse_out, dense_out, rtol=1e-4, atol=1e-5)


def test_block_sparse_gradients_equal_masked_dense_gradients():
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(48, 32))
    sparsify(holder, density=0.5, block_size=BLOCK)
    layer = holder[0]
    x = torch.randn(5, 7, 48, requires_grad=True)  # leading batch dims, rows not a multiple of the block
    layer(x).pow(2).sum().backward()
    dense_weight = layer.dense_weight().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x_ref, dense_weight, layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    live = layer.block_mask.nonzero()
    expected = torch.stack([dense_weight.grad[r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK] for r, c in live])
    torch.testing.assert_close(layer.values.grad, expected, rtol=1e-4, atol=1e-4)


def test_collected_dense_gradient_is_the_full_weight_gradient():
    """What stands in for absent blocks' momentum: dY^T X over every block (bf16 GEMM where fast, fp32 sum)."""
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(48, 32))
    sparsify(holder, density=0.5, block_size=BLOCK)
    layer = holder[0]
    layer.collect_dense_gradients(True)
    x = torch.randn(5, 7, 48)
    layer(x).pow(2).sum().backward()
    layer.end_step(None)
    dense_weight = layer.dense_weight().clone().requires_grad_(True)
    torch.nn.functional.linear(x, dense_weight, layer.bias).pow(2).sum().backward()
    average = layer.dense_grads.average()
    assert average.dtype == torch.float32 and average.shape == dense_weight.shape
    torch.testing.assert_close(average, dense_weight.grad, rtol=2e-2, atol=2e-2 * dense_weight.grad.abs().max().item())


def _fold(layer, steps, beta=None):
    for step in steps:
        layer.dense_grads.add(step.clone(), beta)


def test_block_momentum_is_the_collected_gradients_mean_over_their_root_mean_square():
    layer = sparsify(nn.Sequential(nn.Linear(2 * BLOCK, BLOCK)), density=0.5, block_size=BLOCK)[0]
    steps = [torch.full((BLOCK, 2 * BLOCK), 3.0), torch.full((BLOCK, 2 * BLOCK), 1.0)]
    steps[1][0, 0], steps[0][0, 1], steps[1][0, 1] = -3.0, 0.0, 0.0  # position (0,0): +3 then -3; (0,1): never
    _fold(layer, steps)
    momentum = layer.dense_grads.momentum()
    assert momentum[1, 5].item() == pytest.approx(2 / 5**0.5)  # mean 2, mean square (9 + 1) / 2
    assert momentum[0, 0].item() == 0.0 and momentum[0, 1].item() == 0.0  # no consistent direction; no gradient
    assert layer.dense_grads.momentum("raw")[1, 5].item() == 2.0
    layer.clear_dense_gradients()
    _fold(layer, [steps[0] * 1e-6, steps[1] * 1e-6])  # the same gradients at another scale: the same momentum
    torch.testing.assert_close(layer.dense_grads.momentum(), momentum)
    layer.clear_dense_gradients()
    _fold(layer, steps, beta=0.5)  # exact: running averages, (0.5 * 3 * 0.5 + 0.5 * 1) / sqrt(0.25 * 9 + 0.5 * 1)
    assert layer.dense_grads.momentum()[1, 5].item() == pytest.approx(1.25 / 2.75**0.5)


@pytest.mark.parametrize("scores, grown_back", [("optimizer", [[True, True], [False, False]]),
                                                 ("collected", [[False, True], [True, False]])])
def test_block_scores_decide_whether_a_pruned_block_grows_back_in_place(scores, grown_back):
    """optimizer: the pruned block's normalised optimizer momentum (100) outranks the absent blocks' collected mean
    gradients (1e-4), so it grows back where it was, values kept. collected: all blocks on one scale (mean / rms of the window),
    and the absent block with a small but steady gradient (1) beats the pruned one whose gradient changed sign (0)."""
    # A 2 x 2 block grid, kept by magnitude: (0,0) small and (0,1) large live, (1,0) and (1,1) absent.
    dense = torch.zeros(2 * BLOCK, 2 * BLOCK)
    dense[:BLOCK, :BLOCK], dense[:BLOCK, BLOCK:] = 1e-3, 1.0
    holder = nn.Sequential(nn.Linear(2 * BLOCK, 2 * BLOCK, bias=False))
    holder[0].weight.data.copy_(dense)
    model = sparsify(holder, density=0.5, block_size=BLOCK, prune_rate=0.5, init="magnitude", block_scores=scores)
    layer = model[0]
    assert layer.block_mask.tolist() == [[True, True], [False, False]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.state[layer.values].update(step=torch.tensor(5.0), exp_avg=torch.full_like(layer.values, 1.0),
                                          exp_avg_sq=torch.full_like(layer.values, 1e-4))  # normalised 100
    controller = SparsityController(model, optimizer, total_steps=1000)
    window = [torch.zeros(2 * BLOCK, 2 * BLOCK) for _ in range(2)]
    window[0][:BLOCK, :BLOCK], window[1][:BLOCK, :BLOCK] = 1.0, -1.0  # the small live block: no direction
    window[0][BLOCK:, :BLOCK], window[1][BLOCK:, :BLOCK] = 1e-4, 1e-4  # absent block (1,0): small but steady
    _fold(layer, window)
    controller.update()  # prunes 1 block (the small one) and grows 1
    assert layer.block_mask.tolist() == grown_back
    # optimizer: the block that grew back where it was is a survivor to set_block_mask: it keeps its values
    assert layer.values[0].abs().max().item() == pytest.approx(1e-3 if scores == "optimizer" else 1.0)


def test_memory_is_in_proportion_to_density():
    model = sparsify(build("gpt2").train(), density=0.25, block_size=BLOCK)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_of("gpt2", model, example_batch("gpt2")).backward()
    optimizer.step()
    for _, layer in sparse_layers(model):
        dense = layer.weight_shape[0] * layer.weight_shape[1]
        state = sum(v.numel() for v in optimizer.state[layer.values].values() if v.dim() > 0)
        assert layer.values.numel() == layer.values.grad.numel() == _blocks(layer) * BLOCK**2
        assert (layer.values.numel() + state) / (3 * dense) == pytest.approx(layer.density)


def test_shapes_not_divisible_by_the_block_are_one_clear_error():
    with pytest.raises(ValueError, match=r"fc1 has weight shape \[48, 24\], not divisible by block_size 16"):
        sparsify(build("mlp"), density=0.2, block_size=16)


def _train(model, name, optimizer, controller, steps, check=None):
    batch = example_batch(name)
    losses = []
    for step in range(1, steps + 1):
        loss = loss_of(name, model, batch)
        loss.backward()
        optimizer.step()
        stats = controller.step()
        if check is not None:
            check(step, stats)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "method, block_momentum",
    [(method, "fast") for method in known_methods()] + [("momentum", "exact"), ("rigl", "exact")],
)
def test_every_method_keeps_block_invariants_through_training(method, block_momentum):
    model = sparsify(build("gpt2").train(), density=0.25, block_size=BLOCK, method=method, update_interval=5,
                     block_momentum=block_momentum, momentum_window=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = SparsityController(model, optimizer, total_steps=30)
    layers = [layer for _, layer in sparse_layers(model)]
    planned_total = sum(layer.target_units for layer in layers)
    snapshots = {}

    def check(step, stats):
        for layer in layers:
            old_mask, old_values = snapshots.get(id(layer), (None, None))
            assert layer.values.shape[0] == _blocks(layer)
            if old_mask is not None and stats is not None:
                old_index = torch.full(old_mask.shape, -1, dtype=torch.long).view(-1)
                old_index[old_mask.view(-1).nonzero().squeeze(1)] = torch.arange(int(old_mask.sum()))
                new_index = old_index[layer.block_mask.view(-1).nonzero().squeeze(1)]
                fresh = new_index < 0
                assert torch.all(layer.values[fresh] == 0), "new blocks start at 0"
                for slot in ("exp_avg", "exp_avg_sq"):
                    assert torch.all(optimizer.state[layer.values][slot][fresh] == 0), f"{slot} not fresh"
            elif old_mask is not None:
                assert torch.equal(old_mask, layer.block_mask)
            snapshots[id(layer)] = (layer.block_mask.clone(), layer.values.detach().clone())
        total = sum(_blocks(layer) for layer in layers)
        if method != "magnitude":
            assert total == planned_total
        if method in ("rigl", "set", "static"):
            assert [_blocks(layer) for layer in layers] == [layer.target_units for layer in layers]

    losses = _train(model, "gpt2", optimizer, controller, 30, check)
    assert all(torch.isfinite(torch.tensor(losses)))
    if method == "magnitude":
        assert [_blocks(layer) for layer in layers] == [layer.target_units for layer in layers]
    # every 5 of 30 steps; the update at step 30 would prune at rate 0, so only gradual pruning makes it
    assert controller.update_count == {"static": 0, "magnitude": 6}.get(method, 5)


@pytest.mark.parametrize("block_momentum", ["fast", "exact"])
def test_dense_gradients_are_collected_only_before_updates_that_prune(block_momentum):
    model = sparsify(build("gpt2").train(), density=0.25, block_size=BLOCK, update_interval=10, momentum_window=3,
                     block_momentum=block_momentum)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = SparsityController(model, optimizer, total_steps=30)
    collected = [sparse_layers(model)[0][1].collect_dense_grad]  # for step 1

    def check(step, stats):
        collected.append(sparse_layers(model)[0][1].collect_dense_grad)  # for the step after this one

    _train(model, "gpt2", optimizer, controller, 30, check)
    steps_collecting = [step for step, on in enumerate(collected[:30], start=1) if on]
    # Updates at 10 and 20; the one at 30 would prune at rate 0 (cosine's end), so it and its window are skipped.
    assert controller.update_count == 2
    if block_momentum == "fast":  # the window of 3 steps before each update
        assert steps_collecting == [8, 9, 10, 18, 19, 20]
    else:  # every step up to the last update
        assert steps_collecting == list(range(1, 21))


def test_block_checkpoint_round_trip_after_counts_moved(tmp_path):
    model = sparsify(build("gpt2", seed=1).train(), density=0.25, block_size=BLOCK, update_interval=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = SparsityController(model, optimizer, total_steps=40)
    _train(model, "gpt2", optimizer, controller, 13)  # inside a momentum window: steps 11-13 collected so far
    assert all(layer.dense_grads.dense_grad_steps == 3 for _, layer in sparse_layers(model))
    assert all(layer.dense_grads.dense_grad_sq_sum is None for _, layer in sparse_layers(model))  # default scores: no squares
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "controller": controller.state_dict()},
               tmp_path / "ckpt.pt")
    expected = _train(model, "gpt2", optimizer, controller, 10)

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    fresh = sparsify(build("gpt2", seed=2).train(), density=0.25, block_size=BLOCK, update_interval=5, seed=3)
    fresh.load_state_dict(saved["model"])
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_optimizer.load_state_dict(saved["optimizer"])
    fresh_controller = SparsityController(fresh, fresh_optimizer, total_steps=40)
    fresh_controller.load_state_dict(saved["controller"])
    assert _train(fresh, "gpt2", fresh_optimizer, fresh_controller, 10) == pytest.approx(expected, rel=1e-4)
    for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(fresh)):
        assert torch.equal(a.block_mask, b.block_mask)


def test_unsparsify_block_model_then_save_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = sparsify(build("gpt2"), density=0.25, block_size=BLOCK)
    batch = example_batch("gpt2")
    with torch.no_grad():
        expected = output_of(model, batch)
    unsparsify(model).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, batch), expected, rtol=1e-4, atol=1e-5)
