"""Hand-worked sparse momentum updates: which weights are pruned, how many each layer gets back, where they grow.

Each example is small enough to check on paper; the numbers in the comments are the working.
"""
from __future__ import annotations

import torch
from torch import nn

from sparse_nlp import SparsityController, sparse_layers, sparsify


class TwoLayers(nn.Module):
    def __init__(self, shape_a, shape_b):
        super().__init__()
        self.a = nn.Linear(shape_a[1], shape_a[0], bias=False)
        self.b = nn.Linear(shape_b[1], shape_b[0], bias=False)


def _setup(weights, momenta, prune_rate=0.5, **options):
    """Two layers with the given weights (zeros = absent) and SGD momentum buffers; prune rate at step 0."""
    model = sparsify(TwoLayers(weights[0].shape, weights[1].shape), density=0.5, prune_rate=prune_rate, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for (_, layer), weight, momentum in zip(sparse_layers(model), weights, momenta):
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.mask.copy_(weight != 0)
        optimizer.state[layer.weight]["momentum_buffer"] = momentum.clone()
    controller = SparsityController(model, optimizer, total_steps=1000)
    return model, optimizer, controller


def _active(layer):
    return layer.mask.view(-1).nonzero().squeeze(1).tolist()


def test_prune_redistribute_grow_by_hand():
    weight_a = torch.tensor([[1.0, 0, 3, 0], [0, -2, 0, 4]])  # active 0,2,5,7
    weight_b = torch.tensor([[0.5, 0, 0, 6], [0, 0, 7, -8]])  # active 0,3,6,7
    momentum_a = torch.tensor([[0.1, 0.9, 0.1, 0.5], [0.2, 0.1, 0.3, -0.1]])  # mean |m| on active = 0.1
    momentum_b = torch.tensor([[0.3, 0.05, 0.4, -0.3], [0.6, 0.2, 0.3, 0.3]])  # mean |m| on active = 0.3
    model, optimizer, controller = _setup([weight_a, weight_b], [momentum_a, momentum_b])
    stats = controller.update()

    a, b = model.a, model.b
    # Prune: ceil(0.5 * 4) = 2 per layer, smallest |w|: a drops 1 and -2 (positions 0, 5); b drops 0.5 and 6 (0, 3).
    assert stats["pruned"] == 4 and stats["grown"] == 4
    # Importance 0.1 : 0.3 -> shares 0.25 : 0.75 of the 4 freed weights -> a gets 1 back, b gets 3.
    # a grows where |momentum| of absent weights is largest: position 1 (0.9).
    assert _active(a) == [1, 2, 7]
    # b's candidates after pruning: 0 (0.3), 1 (0.05), 2 (0.4), 3 (0.3), 4 (0.6), 5 (0.2) -> 4, 2, then the tie
    # 0 vs 3 at 0.3 goes to the lower index: 0. Position 0 was just pruned; it comes back as a new weight.
    assert _active(b) == [0, 2, 4, 6, 7]
    # Grown weights start at 0 (even the one that was just pruned); survivors keep their values.
    assert a.weight.view(-1)[[1, 2, 7]].tolist() == [0.0, 3.0, 4.0]
    assert b.weight.view(-1)[[0, 2, 4, 6, 7]].tolist() == [0.0, 0.0, 0.0, 7.0, -8.0]
    # The optimizer's momentum is reset at every grown position, and kept elsewhere.
    buffer_b = optimizer.state[b.weight]["momentum_buffer"].view(-1)
    assert buffer_b[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]
    assert torch.allclose(buffer_b[[1, 3, 5]], torch.tensor([0.05, -0.3, 0.2]))
    assert optimizer.state[a.weight]["momentum_buffer"].view(-1)[1].item() == 0.0
    # Total conserved exactly: 4 + 4 active before, 3 + 5 after.
    assert a.nonzeros + b.nonzeros == 8


def test_regrown_state_keep_leaves_the_momentum_gathered_while_absent():
    weight_a = torch.tensor([[1.0, 0, 3, 0], [0, -2, 0, 4]])
    weight_b = torch.tensor([[0.5, 0, 0, 6], [0, 0, 7, -8]])
    momentum_a = torch.tensor([[0.1, 0.9, 0.1, 0.5], [0.2, 0.1, 0.3, -0.1]])
    momentum_b = torch.tensor([[0.3, 0.05, 0.4, -0.3], [0.6, 0.2, 0.3, 0.3]])
    model, optimizer, controller = _setup([weight_a, weight_b], [momentum_a, momentum_b], regrown_state="keep")
    controller.update()
    # The same topology as with the default reset (test above), but the grown positions keep their buffers.
    assert _active(model.a) == [1, 2, 7] and _active(model.b) == [0, 2, 4, 6, 7]
    assert torch.equal(optimizer.state[model.b.weight]["momentum_buffer"], momentum_b)
    assert torch.equal(optimizer.state[model.a.weight]["momentum_buffer"], momentum_a)
    assert model.b.weight.view(-1)[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]  # the weights themselves still start at 0


def _adam_setup(adam_momentum):
    """One layer, two absent positions whose raw and Adam-normalized momenta rank the other way round."""
    weight = torch.tensor([[1.0, 0.0, 0.0, 2.0]])
    model = sparsify(TwoLayers((1, 4), (1, 4)), density=0.5, prune_rate=0.5, adam_momentum=adam_momentum)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _, layer in sparse_layers(model):
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.mask.copy_(weight != 0)
        # position 1: large exp_avg but larger exp_avg_sq (normalized 0.1); position 2: small but steady (normalized 1)
        optimizer.state[layer.weight].update(
            step=torch.tensor(10.0), exp_avg=torch.tensor([[0.5, 1.0, 0.01, 0.5]]),
            exp_avg_sq=torch.tensor([[1.0, 100.0, 1e-4, 1.0]]),
        )
    return model, SparsityController(model, optimizer, total_steps=1000)


def test_adam_momentum_normalized_or_raw_decides_where_weights_grow():
    # Each layer prunes ceil(0.5 * 2) = 1 (the weight 1.0 at position 0) and grows 1 among positions 0, 1, 2.
    model, controller = _adam_setup("normalized")
    controller.update()
    assert _active(model.a) == [2, 3]  # exp_avg / sqrt(exp_avg_sq): 0.5, 0.1, 1.0 -> position 2
    model, controller = _adam_setup("raw")
    controller.update()
    assert _active(model.a) == [1, 3]  # exp_avg: 0.5, 1.0, 0.01 -> position 1


def test_redistribution_never_exceeds_capacity_and_hands_overflow_on():
    weight_a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # full: 4 active, prunes 2 -> room for 2
    weight_b = torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 6.0]])  # 2 active, prunes 1 -> room for 7
    momentum_a = torch.full((1, 4), 0.9)  # importance 0.9 : 0.1 -> a would get 2.7 of the 3 freed weights
    momentum_b = torch.tensor([[0.1, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.1]])
    model, _, controller = _setup([weight_a, weight_b], [momentum_a, momentum_b])
    controller.update()
    # a prunes 1, 2 and can take only 2 back (its 2 free places); the overflow of 1 goes to b.
    assert model.a.nonzeros == 4 and model.a.weight.view(-1).tolist() == [0.0, 0.0, 3.0, 4.0]
    # b pruned 5 (smaller than 6) and grows just that 1 overflow weight, at the largest momentum: position 2 (0.5).
    assert _active(model.b) == [2, 7]
    assert model.a.nonzeros + model.b.nonzeros == 6  # 4 + 2 before


def test_without_momentum_signal_each_layer_regrows_what_it_pruned():
    weight_a = torch.tensor([[1.0, 0, 3, 0], [0, -2, 0, 4]])
    weight_b = torch.tensor([[0.5, 0, 0, 6], [0, 0, 7, -8]])
    zeros = torch.zeros(2, 4)
    model, _, controller = _setup([weight_a, weight_b], [zeros, zeros.clone()])
    controller.update()
    assert model.a.nonzeros == 4 and model.b.nonzeros == 4


def test_prune_rate_follows_cosine_and_updates_follow_interval():
    model, optimizer, controller = _setup(
        [torch.tensor([[1.0, 0, 3, 0]]), torch.tensor([[0.5, 0, 0, 6]])], [torch.zeros(1, 4), torch.zeros(1, 4)]
    )
    schedule = controller.schedule
    assert schedule.prune_rate_at(0) == 0.5
    assert abs(schedule.prune_rate_at(500) - 0.25) < 1e-12
    assert schedule.prune_rate_at(1000) == 0  # so no update there: it would prune and grow nothing
    assert [s for s in range(1, 1001) if schedule.is_update_step(s)] == list(range(100, 901, 100))
