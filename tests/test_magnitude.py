"""Gradual magnitude pruning from ``initial_density``: where it starts, the cubic schedule from there, where it ends;
and the equal-average rule (recipes/study/magnitude_budget.py) checked against what the controller really holds."""
from __future__ import annotations

import pytest
import torch

from sparse_nlp import SparsityConfig, SparsityController, sparse_layers, sparsify
from sparse_nlp.topology.allocation import plan_nonzeros
from sparse_nlp.topology.schedule import TopologySchedule, schedule_for
from study.grid import average_linear_nonzeros
from study.magnitude_budget import average_density, equal_average_magnitude
from tiny_models import build
from trainer_helpers import tiny_gpt2

STUDY_SCHEDULE = TopologySchedule(total_steps=1600, update_interval=100, prune_rate=0.5)  # the study's, for magnitude


def _run(model, steps: int) -> SparsityController:
    """Step the controller ``steps`` times (magnitude looks at weights only: no training needed)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    controller = SparsityController(model, optimizer, total_steps=steps)
    for _ in range(steps):
        controller.step()
    return controller


def test_default_starts_dense_and_initial_density_starts_at_the_planned_counts():
    dense_start = sparsify(build("gpt2"), density=0.1, method="magnitude")
    assert all(layer.mask.all() and layer.initial_units is None for _, layer in sparse_layers(dense_start))
    model = sparsify(build("gpt2"), density=0.1, method="magnitude", initial_density=0.4)
    layers = [layer for _, layer in sparse_layers(model)]
    assert [layer.nonzeros for layer in layers] == [layer.initial_units for layer in layers] == plan_nonzeros(
        [tuple(layer.mask.shape) for layer in layers], 0.4, "uniform")
    assert all(torch.all(layer.weight[~layer.mask] == 0) for layer in layers)


def test_pruning_from_initial_density_follows_the_cubic_schedule_to_the_target():
    model = sparsify(build("gpt2"), density=0.1, method="magnitude", initial_density=0.4, update_interval=10)
    layers = [layer for _, layer in sparse_layers(model)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    controller = SparsityController(model, optimizer, total_steps=100)
    for step in range(1, 101):
        controller.step()
        if step % 10 == 0:
            p = step / 100
            for layer in layers:
                expected = layer.target_units + (layer.initial_units - layer.target_units) * (1 - p) ** 3
                assert layer.nonzeros == round(expected), f"step {step}"
    assert [layer.nonzeros for layer in layers] == [layer.target_units for layer in layers]


def test_split_fused_projections_end_where_the_dense_start_ends():
    # (each q/k/v slice ends at its rounded share of the layer's target: 3 x 102 of c_attn's 307, from dense too)
    final = {}
    for initial in (1.0, 0.5):
        model = sparsify(tiny_gpt2(), density=0.1, method="magnitude", initial_density=initial, fused_qkv="split",
                         update_interval=10)
        controller = _run(model, 100)
        assert controller.update_count == 10
        final[initial] = [layer.nonzeros for _, layer in sparse_layers(model)]
    assert final[0.5] == final[1.0]


@pytest.mark.parametrize("options, message", [
    ({"density": 0.2, "initial_density": 0.1}, r"initial_density must be in \[density, 1\]"),
    ({"initial_density": 1.5}, r"initial_density must be in"),
    ({"method": "momentum", "initial_density": 0.5}, "is for gradual pruning"),
])
def test_bad_initial_density_is_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        SparsityConfig(**{"method": "magnitude", **options})


# ---- the equal-average rule ------------------------------------------------------------------------------------
def test_the_study_schedule_holds_what_the_issue_measured():
    # the study's magnitude runs: 2.1x / 3.5x / 6.4x the target's linear weights on average (issue 20, item 4)
    ratios = [average_density(STUDY_SCHEDULE, 1.0, d) / d for d in (0.2, 0.1, 0.05)]
    assert [round(r, 1) for r in ratios] == [2.1, 3.5, 6.4]


@pytest.mark.parametrize("density", [0.2, 0.1, 0.05])
def test_equal_average_scales_the_schedule_to_the_sparse_runs_budget(density):
    initial, final = equal_average_magnitude(density, STUDY_SCHEDULE)
    assert final == pytest.approx(initial * density)  # the same ratio of final to initial weights as from dense
    assert average_density(STUDY_SCHEDULE, initial, final) == pytest.approx(density, rel=1e-12)
    assert density < initial < 1 and final < density


def test_equal_average_needs_gradual_prunings_own_schedule():
    with pytest.raises(ValueError, match="skip_zero_rate=False"):
        equal_average_magnitude(0.1, TopologySchedule(1600, 100, 0.5, skip_zero_rate=True))


@pytest.mark.parametrize("density", [0.2, 0.05])
def test_the_controllers_average_linear_weights_equal_the_sparse_runs_within_0_1_percent(density):
    # The study's 1,600 steps and 16 updates on a GPT-2 with ~100K linear weights: the controller's density history
    # (what a study row integrates) averages to density x the linear weights; per-layer rounding is the only gap.
    config = SparsityConfig(method="magnitude", density=density, update_interval=100)
    initial, final = equal_average_magnitude(density, schedule_for(config, 1600))
    model = sparsify(tiny_gpt2(n_embd=64), density=final, method="magnitude", initial_density=initial,
                     update_interval=100)
    controller = _run(model, 1600)
    sizes = {name: layer.mask.numel() for name, layer in sparse_layers(model)}
    average = average_linear_nonzeros(controller.density_history, sizes, 1600)
    assert average == pytest.approx(density * sum(sizes.values()), rel=1e-3)  # measured: within 0.01%
    assert controller.density() == pytest.approx(final, rel=1e-2)
