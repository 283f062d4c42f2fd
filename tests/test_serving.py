"""Serving: a trained sparse model saved as a plain checkpoint, loaded, rebuilt block-sparse from its zeros,
generates what the plain model generates."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from sparse_nlp import sparse_layers, sparsify, unsparsify
from sparse_nlp.layers.block import BlockSparseLinear
from sparse_nlp.serving import block_sparse_for_serving, nonzero_block_mask
from tiny_models import TINY_MODELS


def _saved_sparse_gpt2(tmp_path, density=0.25, block_size=16):
    torch.manual_seed(0)
    model = sparsify(TINY_MODELS["gpt2"](), density=density, block_size=block_size)
    unsparsify(model).save_pretrained(tmp_path)
    return tmp_path


def test_loaded_checkpoint_serves_block_sparse_with_the_same_outputs(tmp_path):
    path = _saved_sparse_gpt2(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    served = block_sparse_for_serving(AutoModelForCausalLM.from_pretrained(path), block_size=16).eval()
    layers = sparse_layers(served)
    assert len(layers) == 8 and all(isinstance(layer, BlockSparseLinear) for _, layer in layers)  # 4 per block
    assert served.lm_head.__class__.__name__ == "Linear"  # the LM head (tied to the embedding) stays dense
    prompt = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(served(prompt).logits, plain(prompt).logits, rtol=1e-4, atol=1e-4)
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert served.generate(prompt, **settings).equal(plain.generate(prompt, **settings))


def test_live_blocks_are_the_nonzero_ones(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(_saved_sparse_gpt2(tmp_path))
    conv = model.transformer.h[0].mlp.c_fc  # GPT-2's Conv1D stores [in, out]
    mask = nonzero_block_mask(conv, 16)
    assert mask.shape == (128 // 16, 32 // 16)
    expected = conv.weight.t().reshape(8, 16, 2, 16).abs().sum(dim=(1, 3)) > 0
    assert mask.equal(expected) and 0 < mask.float().mean() < 1
    block_sparse_for_serving(model, block_size=16)
    assert model.transformer.h[0].mlp.c_fc.block_mask.equal(mask)


def test_dense_layers_stay_dense_and_a_dense_model_is_refused():
    model = TINY_MODELS["gpt2"]()
    with pytest.raises(ValueError, match="no linear layer has at most 50% of its 16x16 blocks nonzero"):
        block_sparse_for_serving(model, block_size=16)
    assert not sparse_layers(model)  # nothing changed
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[:, 16:].zero_()  # [in, out]: the second half of the outputs
    block_sparse_for_serving(model, block_size=16)
    assert [name for name, _ in sparse_layers(model)] == ["transformer.h.0.mlp.c_fc"]


def test_bad_arguments_say_what_to_do(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(_saved_sparse_gpt2(tmp_path))
    with pytest.raises(ValueError, match="max_density must be in"):
        block_sparse_for_serving(model, max_density=0.0)
    with pytest.raises(ValueError, match="not divisible by block_size 24"):
        block_sparse_for_serving(model, block_size=24)
    block_sparse_for_serving(model, block_size=16)
    with pytest.raises(ValueError, match="already has sparse layers"):
        block_sparse_for_serving(model, block_size=16)
