"""Compact export: dead MLP units dropped, the same logits, loadable by vanilla transformers."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparse_nlp import sparse_layers, sparsify
from sparse_nlp.architectures import MLP_LAYOUTS
from sparse_nlp.export import compact_export
from tiny_models import build, example_batch, output_of


def _kill_units(model, name, units_fed, units_read):
    """Empty the input rows of some hidden units and the output columns of others, in every MLP."""
    layout = MLP_LAYOUTS[name]
    with torch.no_grad():
        for block in layout.blocks(model):
            for projection in layout.inputs:
                layer = getattr(block, projection)
                weight = layer.weight if isinstance(layer, torch.nn.Linear) else layer.weight.t()
                weight[units_fed] = 0
            output = getattr(block, layout.output)
            weight = output.weight if isinstance(output, torch.nn.Linear) else output.weight.t()
            weight[:, units_read] = 0


@pytest.mark.parametrize("name", ["gpt2", "llama", "opt"])
def test_compact_export_drops_dead_units_with_identical_logits(name, tmp_path):
    model = build(name)
    _kill_units(model, name, units_fed=slice(0, 16), units_read=slice(40, 48))
    batch = example_batch(name)
    with torch.no_grad():
        expected = output_of(model, batch)
    layout = MLP_LAYOUTS[name]
    hidden_units = getattr(layout.blocks(model)[0], layout.output).weight.numel() // model.config.hidden_size
    compact = compact_export(model)
    assert getattr(compact.config, layout.config_field) == hidden_units - 16 - 8
    compact.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(loaded, batch), expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())


def test_compact_export_of_a_block_sparse_model_keeps_it_unchanged(tmp_path):
    model = sparsify(build("gpt2"), density=0.15, block_size=16, seed=3)
    batch = example_batch("gpt2")
    with torch.no_grad():
        expected = output_of(model, batch)
        compact = compact_export(model)
        torch.testing.assert_close(output_of(compact, batch), expected, rtol=1e-4, atol=1e-5)
    assert sparse_layers(model)  # the sparse model itself is untouched
    assert compact.config.n_inner <= 128


def test_unknown_architecture_is_one_clear_error():
    with pytest.raises(ValueError, match="compact export knows the MLPs of gpt2, llama, opt"):
        compact_export(build("bert"))
