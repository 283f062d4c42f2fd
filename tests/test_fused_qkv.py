"""fused_qkv="split": q, k and v of a fused projection are separate topology units, each with its own budget.

The layouts are checked against the models themselves: with a fused layer's value rows zeroed, an attention layer's
output is the same at every position (all values are 0); with its query rows or its key rows zeroed, every score is
0, so both give the same (uniform-attention) output, which is not constant.
"""
from __future__ import annotations

import pytest
import torch
from transformers import FalconConfig, FalconForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, Phi3Config, Phi3ForCausalLM

from sparse_nlp import SparsityConfig, SparsityController, sparse_layers, sparsify
from sparse_nlp.topology.fused_qkv import output_roles
from tiny_models import build
from trainer_helpers import tiny_gpt2

SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64,
             max_position_embeddings=32)


def _fused_models():
    torch.manual_seed(0)
    return {
        "gpt2": (tiny_gpt2(n_embd=32), "transformer.h.0.attn", "c_attn"),
        "gpt_neox": (GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL)), "gpt_neox.layers.0.attention", "query_key_value"),
        "falcon_new": (FalconForCausalLM(FalconConfig(**{**SMALL, "num_kv_heads": 2}, new_decoder_architecture=True)),
                       "transformer.h.0.self_attention", "query_key_value"),
        "falcon_multi_query": (FalconForCausalLM(FalconConfig(**SMALL, multi_query=True)),
                               "transformer.h.0.self_attention", "query_key_value"),
        "falcon_classic": (FalconForCausalLM(FalconConfig(**SMALL, multi_query=False)),
                           "transformer.h.0.self_attention", "query_key_value"),
        "phi3": (Phi3ForCausalLM(Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0)), "model.layers.0.self_attn",
                 "qkv_proj"),
    }


def _attention_output(model, attention_name: str, ids: torch.Tensor) -> torch.Tensor:
    captured = {}

    def keep(module, args, output) -> None:  # (a hook that returns something replaces the output)
        captured["out"] = output[0] if isinstance(output, tuple) else output

    handle = model.get_submodule(attention_name).register_forward_hook(keep)
    with torch.no_grad():
        model(ids)
    handle.remove()
    return captured["out"][0]  # (positions, width)


@pytest.mark.parametrize("kind", list(_fused_models()))
def test_layouts_agree_with_the_models_own_attention(kind):
    model, attention_name, attribute = _fused_models()[kind]
    model.eval()
    roles = output_roles(model, f"{attention_name}.{attribute}")
    fused = model.get_submodule(attention_name).get_submodule(attribute)
    out_dim = 1 if type(fused).__name__ == "Conv1D" else 0
    assert roles is not None and roles.numel() == fused.weight.shape[out_dim]
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for role in range(3):
        original = fused.weight.detach().clone()
        with torch.no_grad():
            fused.weight.index_fill_(out_dim, (roles == role).nonzero().squeeze(1), 0)
            if fused.bias is not None:
                saved_bias = fused.bias.detach().clone()
                fused.bias[roles == role] = 0
        outputs[role] = _attention_output(model, attention_name, ids)
        with torch.no_grad():
            fused.weight.copy_(original)
            if fused.bias is not None:
                fused.bias.copy_(saved_bias)
    value_zeroed = outputs[2]
    torch.testing.assert_close(value_zeroed, value_zeroed[:1].expand_as(value_zeroed))  # constant: values are 0
    torch.testing.assert_close(outputs[0], outputs[1])  # q or k zeroed: all scores 0
    assert not torch.allclose(outputs[0], outputs[0][:1].expand_as(outputs[0]))


def _per_slice_counts(model) -> list[list[int]]:
    counts = []
    for name, layer in sparse_layers(model):
        roles = output_roles(model, name)
        if roles is not None:
            mask = layer.mask if not layer.stores_in_out else layer.mask.t()  # [out, in]
            counts.append([int(mask[roles == role].sum()) for role in range(3)])
    return counts


def _train(method: str, fused_qkv: str, steps: int = 8):
    model = sparsify(tiny_gpt2(n_embd=32), config=SparsityConfig(density=0.3, method=method, fused_qkv=fused_qkv,
                                                                update_interval=2, prune_rate=0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = SparsityController(model, optimizer, total_steps=steps)
    before = _per_slice_counts(model)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
    return model, controller, before


def test_split_gives_rigl_a_budget_per_slice_where_joint_lets_weights_move_between_them():
    model, controller, before = _train("rigl", "split")
    assert controller.update_count == 3
    assert _per_slice_counts(model) == before  # RigL regrows what each unit pruned, in that unit
    model, _, before = _train("rigl", "joint")
    after = _per_slice_counts(model)
    assert [sum(c) for c in after] == [sum(c) for c in before] and after != before  # one budget, moved within it


def test_split_sparse_momentum_redistributes_between_units_and_keeps_the_total():
    model, controller, before = _train("momentum", "split")
    after = _per_slice_counts(model)
    assert controller.update_count == 3 and after != before
    total = sum(layer.nonzeros for _, layer in sparse_layers(model))
    fresh = sparsify(tiny_gpt2(n_embd=32), config=SparsityConfig(density=0.3, fused_qkv="split"))
    assert total == sum(layer.nonzeros for _, layer in sparse_layers(fresh))


def test_split_without_a_fused_projection_or_with_blocks_is_one_line():
    llama = sparsify(build("llama"), density=0.5, fused_qkv="split")
    with pytest.raises(ValueError, match="no sparse layer is a fused q/k/v projection") as error:
        SparsityController(llama, torch.optim.AdamW(llama.parameters()), total_steps=10)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="fused_qkv=split needs fine-grained masks"):
        SparsityConfig(density=0.5, block_size=16, fused_qkv="split")
