"""1,000 topology updates with random weights, momenta and prune rates (NaN and inf included): no invariant breaks."""
from __future__ import annotations

import random

import torch

from sparse_nlp.methods import LayerState, get_method, update_layer_topology

SHAPES = [(3, 5), (8, 2), (1, 7), (6, 6)]


def _random_tensor(shape, rng: random.Random, generator: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=generator) * 10 ** rng.uniform(-3, 3)
    if rng.random() < 0.2:
        flat = values.view(-1)
        for _ in range(rng.randint(1, 3)):
            flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    if rng.random() < 0.1:
        values.zero_()  # no signal at all
    return values


def test_thousand_random_updates_keep_every_invariant():
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    masks = [torch.zeros(shape, dtype=torch.bool) for shape in SHAPES]
    for mask in masks:  # random initial densities, at least one layer fully dense or empty sometimes
        mask.view(-1)[torch.randperm(mask.numel(), generator=generator)[: rng.randint(0, mask.numel())]] = True
    targets = [max(1, m.numel() // 3) for m in masks]
    for update in range(1000):
        method_name = rng.choice(["momentum", "momentum", "rigl", "set", "magnitude"])
        method = get_method(method_name)
        weights = [_random_tensor(m.shape, rng, generator).masked_fill(~m, 0) for m in masks]
        states = [
            LayerState(
                f"layer{i}", w.abs(), m, min(t, int(m.sum())), generator,
                momentum=_random_tensor(m.shape, rng, generator), gradient=_random_tensor(m.shape, rng, generator),
            )
            for i, (w, m, t) in enumerate(zip(weights, masks, targets))
        ]
        before = [int(m.sum()) for m in masks]
        prune_rate = rng.choice([0.0, rng.random(), 0.999])
        plans = method.plan(states, prune_rate, rng.random())
        for state, plan, old in zip(states, plans, before):
            old_mask, magnitude_before = state.mask.clone(), state.magnitude.clone()
            assert 0 <= plan.prune <= old
            assert 0 <= plan.grow <= state.numel - old + plan.prune
            grown = update_layer_topology(
                state, plan, method.prune_scores(state), method.grow_scores(state) if plan.grow else None
            )
            assert int(state.mask.sum()) == old - plan.prune + plan.grow, f"update {update}: {state.name} count"
            assert grown.numel() == plan.grow and len(set(grown.tolist())) == plan.grow
            assert torch.all(state.mask.view(-1)[grown])
            survivors = old_mask & state.mask
            survivors.view(-1)[grown] = False
            assert int(survivors.sum()) == old - plan.prune  # pruned exactly plan.prune of the old active set
            # the update writes the mask alone (the layer moves its weights): the scores' inputs are untouched
            assert torch.equal(state.magnitude.nan_to_num(), magnitude_before.nan_to_num())
        if method_name != "magnitude":
            assert sum(int(m.sum()) for m in masks) == sum(before), f"update {update}: total drifted"
        else:
            assert all(int(m.sum()) <= b for m, b in zip(masks, before))
