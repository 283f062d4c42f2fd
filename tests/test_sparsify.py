"""sparsify / unsparsify over the table of tiny models: targets, exact densities, forward, state, errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import sparse_nlp
from sparse_nlp import SparseLinear, SparsityConfig, sparse_layers, sparsify, unsparsify
from sparse_nlp.model import is_linear
from sparse_nlp.topology.allocation import plan_nonzeros
from tiny_models import LANGUAGE_MODELS, TINY_MODELS, build, example_batch, output_of


def _masked_dense_copy(sparse_model: nn.Module, name: str) -> nn.Module:
    """The original (dense) model with every sparse layer's weight multiplied by its mask."""
    dense = build(name)
    dense.load_state_dict(_dense_state(sparse_model))
    return dense


def _dense_state(sparse_model: nn.Module) -> dict:
    state = {}
    for key, value in sparse_model.state_dict().items():
        if key.endswith(".mask"):
            continue
        state[key.replace(".base_layer.", ".")] = value
    return state


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
@pytest.mark.parametrize("init", ["random", "magnitude"])
def test_density_is_exact_overall_and_per_layer(name, distribution, init):
    model = sparsify(build(name), density=0.2, distribution=distribution, init=init)
    layers = sparse_layers(model)
    planned = plan_nonzeros([tuple(l.mask.shape) for _, l in layers], 0.2, distribution)
    assert [l.nonzeros for _, l in layers] == planned
    total = sum(l.mask.numel() for _, l in layers)
    assert sum(planned) == round(0.2 * total)
    for _, layer in layers:
        assert layer.target_units == layer.nonzeros
        assert int((layer.weight != 0).sum()) <= layer.nonzeros  # masked weights are exactly zero
        assert torch.all(layer.weight[~layer.mask] == 0)
        if distribution == "uniform":
            assert abs(layer.nonzeros - 0.2 * layer.mask.numel()) <= 1


def test_erk_gives_thin_layers_more_density():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 4))
    sparsify(nn.Sequential(model), density=0.3, distribution="erk")
    square, thin = model[0], model[1]
    assert thin.density > square.density
    assert square.nonzeros + thin.nonzeros == round(0.3 * (256 * 256 + 256 * 4))


def test_magnitude_init_keeps_largest_weights():
    model = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(32, dtype=torch.float32).view(4, 8) - 15.5)
    sparsify(model, density=0.25, init="magnitude")
    kept = model[0].weight[model[0].mask].abs()
    assert kept.numel() == 8
    assert kept.min() >= model[0].base_layer.weight.new_tensor(11.5)  # |values| 15.5 .. 12.5 and 12.5.. on both ends


@pytest.mark.parametrize("name", TINY_MODELS)
def test_patched_forward_equals_dense_forward_with_masked_weights(name):
    model = sparsify(build(name), density=0.3)
    batch = example_batch(name)
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, batch), output_of(_masked_dense_copy(model, name), batch))


def test_conv1d_and_linear_layouts_keep_the_mask_in_weight_layout():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=6, nx=4)  # weight [in=4, out=6]
    holder = nn.Sequential(conv)
    sparsify(holder, density=0.5)
    layer = holder[0]
    assert isinstance(layer, SparseLinear) and layer.mask.shape == (4, 6)
    assert (layer.in_features, layer.out_features) == (4, 6)
    x = torch.randn(3, 4)
    torch.testing.assert_close(layer(x), x @ (layer.weight * layer.mask) + layer.bias)


def test_default_targets_skip_output_embedding_and_norms():
    model = sparsify(build("gpt2"), density=0.2)
    names = [n for n, _ in sparse_layers(model)]
    assert "lm_head" not in names and len(names) == 8
    assert model.lm_head.weight is model.transformer.wte.weight  # tied embedding untouched
    assert isinstance(model.transformer.ln_f, nn.LayerNorm)


def test_target_names_regex_and_filter_fn():
    by_name = sparsify(build("llama"), density=0.5, target_modules=["q_proj", "v_proj"])
    assert [n.rsplit(".", 1)[1] for n, _ in sparse_layers(by_name)] == ["q_proj", "v_proj"] * 2
    by_regex = sparsify(build("llama"), density=0.5, target_regex=r".*layers\.0\.mlp\..*")
    assert [n for n, _ in sparse_layers(by_regex)] == [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    by_filter = sparsify(build("llama"), density=0.5, filter_fn=lambda module, name: "layers.1." in name)
    assert all("layers.1." in n for n, _ in sparse_layers(by_filter)) and len(sparse_layers(by_filter)) == 7


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density_is_one_clear_error(density):
    with pytest.raises(ValueError, match="density must be in"):
        sparsify(build("mlp"), density=density)


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="known methods: .*momentum.*rigl"):
        sparsify(build("mlp"), density=0.2, method="lottery")


@pytest.mark.parametrize(
    "options, message",
    [({"adam_momentum": "signed"}, "choose normalized or raw"), ({"regrown_state": "random"}, "choose reset, fresh, keep"),
     ({"regrown_state": "keep", "block_size": 16}, "needs fine-grained masks"),
     ({"block_scores": "live"}, "choose optimizer or collected")],
)
def test_bad_momentum_options_are_one_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        SparsityConfig(density=0.2, **options)


def test_unknown_option_is_an_error():
    with pytest.raises(TypeError, match="unknown option"):
        sparsify(build("mlp"), density=0.2, desnity=0.3)


def test_no_match_lists_candidates_and_changes_nothing():
    model = build("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no linear layer matched .*c_attn"):
        sparsify(model, density=0.2, target_modules=["nonexistent"])
    assert not sparse_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_already_sparsified_is_an_error():
    model = sparsify(build("mlp"), density=0.2)
    with pytest.raises(ValueError, match="already sparsified"):
        sparsify(model, density=0.1)


def test_density_one_keeps_everything():
    model = sparsify(build("mlp"), density=1.0)
    assert all(layer.density == 1.0 for _, layer in sparse_layers(model))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_state_dict_round_trip_into_fresh_model(name):
    model = sparsify(build(name, seed=1), density=0.2, seed=7)
    state = model.state_dict()
    assert any(k.endswith(".mask") for k in state)
    fresh = sparsify(build(name, seed=2), density=0.2, seed=8)  # different weights and masks
    fresh.load_state_dict(state)
    for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(fresh)):
        assert torch.equal(a.mask, b.mask)
    batch = example_batch(name)
    with torch.no_grad():
        torch.testing.assert_close(output_of(fresh, batch), output_of(model, batch))


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_unsparsify_then_save_pretrained_round_trips(name, tmp_path):
    model = sparsify(build(name), density=0.2)
    batch = example_batch(name)
    with torch.no_grad():
        expected = output_of(model, batch)
    plain = unsparsify(model)
    assert not sparse_layers(plain) and not hasattr(plain, "sparsity_config")
    plain.save_pretrained(tmp_path)
    auto = AutoModelForMaskedLM if name == "bert" else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, batch), expected)
    output = loaded.get_output_embeddings()
    linear = [m for m in loaded.modules() if is_linear(m) and m is not output]
    zeros = sum(int((m.weight == 0).sum()) for m in linear)
    assert zeros > 0.5 * sum(m.weight.numel() for m in linear)


def test_unsparsify_of_plain_model_is_an_error():
    with pytest.raises(ValueError, match="no sparse layers"):
        unsparsify(build("mlp"))


def test_sparsify_returns_the_same_model_object():
    model = build("mlp")
    assert sparsify(model, density=0.5) is model
    assert isinstance(model.sparsity_config, SparsityConfig)
    assert math.isclose(model.sparsity_config.density, 0.5)
    assert sparse_nlp.__all__  # public API is importable from the top level
