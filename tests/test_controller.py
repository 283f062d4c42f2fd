"""SparsityController: construction errors, reporting, state_dict round trips and refusals."""
from __future__ import annotations

import copy

import pytest
import torch

from sparse_nlp import SparsityConfig, SparsityController, sparse_layers, sparsify
from tiny_models import build, example_batch, loss_of


def _setup(seed=0, density=0.2, name="gpt2", **options):
    model = sparsify(build(name, seed=seed).train(), density=density, update_interval=5, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, SparsityController(model, optimizer, total_steps=40)


def _train(model, optimizer, controller, steps, name="gpt2"):
    losses = []
    batch = example_batch(name)
    for _ in range(steps):
        loss = loss_of(name, model, batch)
        loss.backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_needs_a_sparsified_model():
    model = build("mlp")
    with pytest.raises(ValueError, match="call sparse_nlp.sparsify"):
        SparsityController(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)


def test_optimizer_must_hold_the_sparse_weights():
    model = sparsify(build("mlp"), density=0.5)
    other = build("mlp")
    with pytest.raises(ValueError, match="optimizer does not hold the weights of 2 sparse layer"):
        SparsityController(model, torch.optim.SGD(other.parameters(), lr=0.1), total_steps=10)


def test_dynamic_methods_need_total_steps_static_does_not():
    model = sparsify(build("mlp"), density=0.5)
    with pytest.raises(ValueError, match="pass total_steps"):
        SparsityController(model, torch.optim.SGD(model.parameters(), lr=0.1))
    static = sparsify(build("mlp"), density=0.5, method="static")
    controller = SparsityController(static, torch.optim.SGD(static.parameters(), lr=0.1))
    assert controller.update() == {"prune_rate": 0.0, "pruned": 0, "grown": 0, "moved": 0, "removed": 0}


def test_explicit_config_overrides_stored_one():
    model = sparsify(build("mlp"), density=0.5)
    controller = SparsityController(
        model, torch.optim.SGD(model.parameters(), lr=0.1), SparsityConfig(density=0.5, method="set"), total_steps=10
    )
    assert controller.method.name == "set"


def test_rigl_without_gradients_says_when_to_call_step():
    model, optimizer, controller = _setup(method="rigl")
    with pytest.raises(ValueError, match="before optimizer.zero_grad"):
        controller.update()


def test_report_lists_every_layer():
    model, _, controller = _setup()
    report = controller.report()
    assert [r.name for r in report] == [n for n, _ in sparse_layers(model)]
    first = report[0]
    assert first.shape == (96, 32) and first.nonzeros == model.transformer.h[0].attn.c_attn.nonzeros
    assert first.density == pytest.approx(first.nonzeros / (96 * 32))
    assert controller.density() == pytest.approx(0.2, abs=1e-4)


def test_state_dict_round_trip_continues_identically():
    model, optimizer, controller = _setup()
    _train(model, optimizer, controller, 12)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), copy.deepcopy(controller.state_dict()))
    expected_losses = _train(model, optimizer, controller, 13)

    model2, optimizer2, controller2 = _setup(seed=5)
    model2.load_state_dict(saved[0])
    optimizer2.load_state_dict(saved[1])
    controller2.load_state_dict(saved[2])
    assert controller2.step_count == 12 and controller2.update_count == 2
    losses = _train(model2, optimizer2, controller2, 13)
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(model2)):
        assert torch.equal(a.mask, b.mask)


def test_load_refuses_other_density():
    _, _, controller = _setup(density=0.2)
    model, _, other = _setup(density=0.1)
    with pytest.raises(ValueError, match="density=0.2 but this run has density=0.1"):
        other.load_state_dict(controller.state_dict())


def test_load_refuses_other_model():
    _, _, controller = _setup(name="gpt2")
    _, _, other = _setup(name="llama")
    with pytest.raises(ValueError, match="different model"):
        other.load_state_dict(controller.state_dict())


def test_load_before_masks_is_refused():
    model, optimizer, controller = _setup()
    _train(model, optimizer, controller, 6)  # one update moved weights between layers
    _, _, fresh = _setup()
    with pytest.raises(ValueError, match="load the model's state_dict"):
        fresh.load_state_dict(controller.state_dict())
