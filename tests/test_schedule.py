"""When topology updates happen: cosine decay reaches prune rate 0 at its end, and an update there is left out
for the methods it would do nothing for (it still costs a dense-gradient window in block mode)."""
from __future__ import annotations

import pytest
import torch

from sparse_nlp import SparsityController, sparsify
from sparse_nlp.methods import get_method
from sparse_nlp.topology.schedule import TopologySchedule
from tiny_models import build


def _updates(schedule: TopologySchedule) -> list[int]:
    return [step for step in range(1, schedule.total_steps + 1) if schedule.is_update_step(step)]


def test_cosine_rate_is_exactly_zero_at_the_end_so_that_update_is_skipped():
    kept = TopologySchedule(1000, 100, 0.5)
    assert kept.prune_rate_at(1000) == 0.0 and _updates(kept)[-1] == 1000  # the old schedule: a no-op at the end
    skipped = TopologySchedule(1000, 100, 0.5, skip_zero_rate=True)
    assert _updates(skipped) == list(range(100, 901, 100))
    assert skipped.last_update_step == 900 and skipped.num_updates == 9
    assert skipped.progress(900) == 1.0
    assert all(skipped.prune_rate_at(step) > 0 for step in _updates(skipped))


@pytest.mark.parametrize(
    "schedule, updates",
    [
        (TopologySchedule(1000, 100, 0.5, end_fraction=0.8, skip_zero_rate=True), list(range(100, 701, 100))),
        (TopologySchedule(1050, 100, 0.5, skip_zero_rate=True), list(range(100, 1001, 100))),  # 1,050 is no update step
        (TopologySchedule(1000, 100, 0.5, "constant", skip_zero_rate=True), list(range(100, 1001, 100))),
        (TopologySchedule(1000, 100, 0.0, "constant", skip_zero_rate=True), []),  # rate 0 everywhere: nothing to do
        (TopologySchedule(100, 100, 0.5, skip_zero_rate=True), []),  # the one update would be at rate 0
    ],
)
def test_only_zero_rate_updates_are_left_out(schedule, updates):
    assert _updates(schedule) == updates and schedule.num_updates == len(updates)


@pytest.mark.parametrize("method, skips", [("momentum", True), ("rigl", True), ("set", True), ("magnitude", False)])
def test_methods_that_prune_by_the_rate_skip_it_gradual_pruning_does_not(method, skips):
    assert get_method(method).prunes_by_rate == skips
    model = sparsify(build("mlp"), density=0.2, method=method, update_interval=10)
    controller = SparsityController(model, torch.optim.AdamW(model.parameters()), total_steps=50)
    # gradual pruning reaches its target at step 50 (its plan ignores the rate); the others would prune 0 there
    assert controller.schedule.last_update_step == (40 if skips else 50)
    assert controller.planned_updates == (4 if skips else 5)
