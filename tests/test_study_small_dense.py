"""The small-dense references' width rule (recipes/study/small_dense.py): linear weights or all parameters matched."""
from __future__ import annotations

import pytest
from transformers import GPT2Config

from study.small_dense import (
    linear_layer_sizes,
    linear_weight_count,
    parameter_count,
    small_dense_shape,
    sparse_nonzeros,
    with_width,
)
from study_helpers import STUDY_CONFIG


def test_linear_weights_are_the_layers_sparsify_patches():
    assert linear_weight_count(STUDY_CONFIG) == 4 * 12 * 256 * 256  # c_attn 3d^2, c_proj d^2, MLP 8d^2; no LM head
    assert len(linear_layer_sizes(STUDY_CONFIG)) == 16


@pytest.mark.parametrize("density,width,heads", [(0.2, 112, 2), (0.1, 80, 1), (0.05, 56, 1)])
def test_small_dense_width_is_the_closest_multiple_of_8(density, width, heads):
    shape = small_dense_shape(STUDY_CONFIG, density)
    assert shape == {"n_embd": width, "n_head": heads}
    target = density * linear_weight_count(STUDY_CONFIG)
    gap = abs(linear_weight_count(with_width(STUDY_CONFIG, width)) - target)
    for other in range(8, 257, 8):  # no other multiple of 8 comes closer
        assert abs(linear_weight_count(with_width(STUDY_CONFIG, other)) - target) >= gap


@pytest.mark.parametrize("density,width,gap", [(0.2, 136, -0.0075), (0.1, 112, -0.038), (0.05, 104, 0.032)])
def test_small_dense_total_holds_as_many_parameters_as_the_sparse_models_nonzeros(density, width, gap):
    # The sparse model: density x 3.15M linear weights + 571K dense (embeddings, norms, biases); the linear-matched
    # small-dense model holds 1.41x / 1.82x / 2.64x fewer. The total-matched one: within half a width step of 8.
    target = sparse_nonzeros(STUDY_CONFIG, density)
    assert target == pytest.approx(density * 3_145_728 + 570_880)  # as the study rows count them
    narrow = small_dense_shape(STUDY_CONFIG, density)
    assert target / parameter_count(GPT2Config(**{**STUDY_CONFIG.to_dict(), **narrow})) == pytest.approx(
        {0.2: 1.41, 0.1: 1.82, 0.05: 2.64}[density], abs=0.005)
    shape = small_dense_shape(STUDY_CONFIG, density, match="total")
    assert shape == {"n_embd": width, "n_head": 2}
    total = parameter_count(with_width(STUDY_CONFIG, width))
    assert total / target - 1 == pytest.approx(gap, abs=0.001)
    step = (parameter_count(with_width(STUDY_CONFIG, width + 8)) - parameter_count(with_width(STUDY_CONFIG, width - 8)))
    assert abs(total - target) <= step / 4  # half of one width step (the mean of the steps either side)
    for other in range(8, 257, 8):
        assert abs(parameter_count(with_width(STUDY_CONFIG, other)) - target) >= abs(total - target)
    with pytest.raises(ValueError, match="choose linear or total"):
        small_dense_shape(STUDY_CONFIG, density, match="embeddings")


def test_small_dense_keeps_head_size_and_scales_a_fixed_mlp_width():
    config = GPT2Config(vocab_size=300, n_layer=2, n_embd=512, n_head=8, n_inner=1024, bos_token_id=0, eos_token_id=0)
    shape = small_dense_shape(config, 0.25)
    assert shape["n_embd"] % shape["n_head"] == 0 and shape["n_embd"] // shape["n_head"] == 64
    assert shape["n_inner"] == round(1024 * shape["n_embd"] / 512)
    narrow = GPT2Config(**{**config.to_dict(), **shape})
    assert linear_weight_count(narrow) == pytest.approx(0.25 * linear_weight_count(config), rel=0.1)
