"""Wider and sparser (issue 32): widening a config by F, the density arithmetic, its one-line errors, and the
recipes' --width_multiplier helper. Tiny models from configs; the widened sparse model must hold exactly
density x the base dense model's linear weights."""
from __future__ import annotations

import re

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    GPTNeoXConfig,
    HfArgumentParser,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
)

import sparse_nlp
from sparse_nlp import SparsityConfig, plan_widening, widen_config, widened_layer_density
from sparse_nlp.architectures import WIDTH_LAYOUTS
from sparse_nlp.layers.base import out_in_shape
from sparse_nlp.lm.arguments import ModelArguments
from sparse_nlp.lm.training import new_model_config
from sparse_nlp.lm.widening import widened_sparse_run
from sparse_nlp.model import find_target_layers
from sparse_nlp.width import check_live_layers, widened_fields

VOCAB = 64
_HEADS = dict(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
              max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)

# one tiny config per row of WIDTH_LAYOUTS: width 32, 2 heads of 16
TINY_CONFIGS = {
    "gpt2": lambda: GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32),
    "llama": lambda: LlamaConfig(hidden_size=32, intermediate_size=64, **_HEADS),
    "mistral": lambda: MistralConfig(hidden_size=32, intermediate_size=64, head_dim=16, **_HEADS),
    "qwen2": lambda: Qwen2Config(hidden_size=32, intermediate_size=64, **_HEADS),
    "phi3": lambda: Phi3Config(hidden_size=32, intermediate_size=64, **_HEADS),
    "gpt_neox": lambda: GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=32),
    "opt": lambda: OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=VOCAB, max_position_embeddings=32, word_embed_proj_dim=32, pad_token_id=1),
}


def _gpt2(n_embd=64, n_head=2, **fields):
    return GPT2Config(n_layer=2, n_embd=n_embd, n_head=n_head, vocab_size=VOCAB, n_positions=32, **fields)


def _llama(heads=4, kv_heads=2):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=32,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _model(config, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _linear_weights(model) -> int:
    return sum(module.weight.numel() for _, module in find_target_layers(model))


def _nonzero_linear_weights(sparse_model) -> int:
    plain = sparse_nlp.unsparsify(sparse_model)  # masked weights become exact zeros
    return sum(int(torch.count_nonzero(module.weight)) for _, module in find_target_layers(plain))


def _head_size(config) -> int:
    layout = WIDTH_LAYOUTS[config.model_type]
    return getattr(config, "head_dim", None) or getattr(config, layout.width) // getattr(config, layout.heads[0])


def _one_line_error(call, *args, match: str, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---- the config arithmetic --------------------------------------------------------------------------------------------
def test_gpt2_config_widens_width_and_heads_not_head_size():
    base = _gpt2()
    wide = widen_config(base, 4)
    assert (wide.n_embd, wide.n_head, wide.n_inner, wide.n_layer) == (256, 8, None, 2)  # n_inner None: 4 x n_embd
    assert wide.n_embd // wide.n_head == base.n_embd // base.n_head == 32
    assert (base.n_embd, base.n_head) == (64, 2)  # a copy: the base is unchanged
    assert widened_fields(base, 4) == {"n_embd": 256, "n_head": 8}
    assert widen_config(_gpt2(n_inner=96), 2).n_inner == 192  # a set MLP width follows


def test_llama_config_widens_query_and_key_value_heads_and_mlp():
    wide = widen_config(_llama(), 2)
    assert (wide.hidden_size, wide.num_attention_heads, wide.num_key_value_heads) == (128, 8, 4)
    assert (wide.intermediate_size, wide.head_dim, wide.num_hidden_layers) == (256, 16, 2)
    assert widen_config(_llama(), 1.5).hidden_size == 96  # a multiplier need not be whole


def test_multiplier_one_copies_any_config():
    bert = BertConfig(hidden_size=32, num_attention_heads=2)
    copied = widen_config(bert, 1)
    assert copied is not bert and copied.to_dict() == bert.to_dict()


def test_density_is_read_against_the_base_model():
    assert widened_layer_density(1.0, 4) == 0.0625  # the study's width 1,024 at the linear weights of width 256
    assert widened_layer_density(0.5, 2) == 0.125
    assert widened_layer_density(0.2, 1) == 0.2  # no widening: --density as before


def test_table_rows_have_tiny_configs():
    assert set(TINY_CONFIGS) == set(WIDTH_LAYOUTS)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_grows_each_linear_layer_f_by_f(family):
    base_config = TINY_CONFIGS[family]()
    wide_config = widen_config(base_config, 2)
    assert _head_size(wide_config) == _head_size(base_config) == 16
    base, wide = _model(base_config), _model(wide_config)
    base_layers, wide_layers = find_target_layers(base), find_target_layers(wide)
    assert [name for name, _ in wide_layers] == [name for name, _ in base_layers]
    for (name, small), (_, large) in zip(base_layers, wide_layers):
        assert out_in_shape(large) == tuple(2 * dim for dim in out_in_shape(small)), name
    logits = wide(torch.randint(2, VOCAB, (1, 8))).logits  # the widened model is a working model
    assert logits.shape == (1, 8, VOCAB)


# ---- nonzero linear weights: density x the base dense model's -----------------------------------------------------
@pytest.mark.parametrize("family, multiplier, density, block_size", [
    ("gpt2", 4, 1.0, 16),  # the study's case, scaled down: 4x wider at the base's linear weights
    ("gpt2", 2, 0.5, 32),
    ("gpt2", 2, 0.25, 1),
    ("llama", 2, 0.5, 16),
    ("llama", 4, 1.0, 1),
])
def test_widened_sparse_model_holds_density_times_base_linear_weights(family, multiplier, density, block_size):
    base_config = _gpt2() if family == "gpt2" else _llama()
    plan = plan_widening(base_config, multiplier, SparsityConfig(density=density, block_size=block_size))
    assert plan.sparsity.density == widened_layer_density(density, multiplier) == density / multiplier ** 2
    assert (plan.multiplier, plan.density, plan.sparsity.block_size) == (multiplier, density, block_size)
    wide = sparse_nlp.sparsify(_model(plan.config), density=plan.sparsity.density, block_size=block_size)
    base_weights = _linear_weights(_model(base_config))
    assert _nonzero_linear_weights(wide) == density * base_weights


# ---- every one-line error ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("multiplier", [0.5, 0, -2, float("nan"), float("inf")])
def test_multiplier_below_one_fails(multiplier):
    _one_line_error(widen_config, _gpt2(), multiplier, match=r"^width_multiplier must be a number >= 1 .*narrower")
    _one_line_error(widened_layer_density, 0.5, multiplier, match="^width_multiplier must be a number >= 1")


def test_multiplier_that_makes_a_field_fractional_names_the_nearest_that_work():
    message = _one_line_error(widen_config, _gpt2(), 1.25,
                              match=r"^width_multiplier 1.25 makes GPT2Config.n_head 2 into 2.5, not a whole number; "
                                    r"use a multiple of 1/2 \(e.g. 1.5\)")
    assert "n_embd=64, n_head=2" in message
    assert widen_config(_gpt2(), 1.5).n_head == 3  # what it names works
    _one_line_error(widen_config, _gpt2(n_embd=256, n_head=4), 3.3, match=r"multiple of 1/4 \(e.g. 3.25 or 3.5\)")


def test_heads_that_do_not_divide_fail():
    _one_line_error(widen_config, _gpt2(n_embd=64, n_head=3), 2,
                    match=r"^widened GPT2Config: n_head 6 does not divide n_embd 128 \(nor does the base's 3 divide 64\)")
    _one_line_error(widen_config, _llama(heads=4, kv_heads=3), 2,
                    match="num_key_value_heads 6 does not divide num_attention_heads 8")


def test_unknown_architecture_names_its_config_class():
    message = _one_line_error(widen_config, BertConfig(hidden_size=32, num_attention_heads=2), 2,
                              match=r"^widening knows gpt2, .* configs, not BertConfig; add its width fields to "
                                    r"WIDTH_LAYOUTS in sparse_nlp/architectures.py")
    assert "llama" in message


def test_layer_density_above_one_names_the_bound_and_the_multiplier():
    _one_line_error(widened_layer_density, 2.0, 1,
                    match=r"^density 2 at width_multiplier 1 asks each layer for density 2 > 1 .*use density <= 1 or "
                          r"width_multiplier >= 1.415\.$")
    assert widened_layer_density(2.0, 1.415) <= 1  # what it names works
    _one_line_error(widened_layer_density, 2.0, 1.41, match="> 1")
    _one_line_error(widened_layer_density, 0.0, 2, match="^density must be a number > 0")


def _named_density(message: str) -> float:
    return float(re.search(r"use density >= ([0-9.e-]+)", message).group(1))


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_too_few_live_blocks_names_the_smallest_density_that_works(distribution):
    base, block = _gpt2(), 16  # widened 4x: c_attn 48x16 blocks, attn.c_proj 16x16
    sparsity = SparsityConfig(density=0.002, block_size=block, distribution=distribution)
    message = _one_line_error(plan_widening, base, 4, sparsity,
                              match=r"^density 0.002 at width_multiplier 4 \(layer density 0.000125\) leaves "
                                    r"transformer\.h\.\d\.\w+\.c_\w+ \(\d+ 16x16 blocks\) without a live 16x16 block: "
                                    r"use density >= [0-9.]+ or a smaller block_size\.$")
    smallest = _named_density(message)
    plan = plan_widening(base, 4, SparsityConfig(density=smallest, block_size=block, distribution=distribution))
    sparse = sparse_nlp.sparsify(_model(plan.config), config=plan.sparsity)
    assert min(int(layer.block_mask.sum()) for _, layer in sparse_nlp.sparse_layers(sparse)) >= 1
    # every density from it on works (largest-remainder rounding is not monotone), one block fewer does not
    wide = _model(widen_config(base, 4))
    blocks = _linear_weights(wide) // block ** 2
    named_blocks = round(smallest / 16 * blocks)
    for live_blocks in range(named_blocks, 4 * named_blocks):
        check_live_layers(wide, SparsityConfig(density=live_blocks / blocks, block_size=block, distribution=distribution))
    _one_line_error(check_live_layers, wide, SparsityConfig(density=(named_blocks - 1) / blocks, block_size=block,
                                                            distribution=distribution), match="without a live")


def test_too_few_live_blocks_at_any_density_names_a_smaller_block_size():
    base = _gpt2(n_embd=32, n_head=2)  # widened 2x: attn.c_proj is one 64x64 block, at layer density <= 1/4
    _one_line_error(plan_widening, base, 2, SparsityConfig(density=1.0, block_size=64),
                    match=r"without a live 64x64 block: no density up to 1 gives it one; use block_size 32\.$")
    plan_widening(base, 2, SparsityConfig(density=1.0, block_size=32))  # what it names works


def test_block_size_that_does_not_divide_the_widened_layers_fails():
    _one_line_error(plan_widening, _gpt2(n_embd=36, n_head=2), 2, SparsityConfig(density=1.0, block_size=16),
                    match=r"not divisible by block_size 16")


def test_dense_method_has_nothing_to_widen():
    _one_line_error(plan_widening, _gpt2(), 2, SparsityConfig(method="dense"),
                    match=r"^width_multiplier widens a sparse model and method 'dense' trains none")


# ---- the recipes' helper -----------------------------------------------------------------------------------------------
class _Tokenizer:
    """What new_model_config reads of a tokenizer."""

    eos_token_id = 0

    def __len__(self):
        return VOCAB


def test_flag_parses_and_says_the_density_rule():
    parser = HfArgumentParser(ModelArguments)
    (args,) = parser.parse_args_into_dataclasses(args=["--width_multiplier", "4"])
    assert args.width_multiplier == 4.0
    assert ModelArguments().width_multiplier == 1.0
    assert "density / multiplier^2" in ModelArguments.__dataclass_fields__["width_multiplier"].metadata["help"]


def test_default_model_widened_4x_holds_the_dense_models_linear_weights():
    model_args, sparsity = ModelArguments(width_multiplier=4), SparsityConfig(density=1.0, block_size=64)
    sparse_args, sparse_sparsity = widened_sparse_run(model_args, sparsity)
    assert (sparse_args.config_overrides, sparse_args.width_multiplier) == ("n_embd=1024,n_head=16", 1.0)
    assert sparse_sparsity == SparsityConfig(density=0.0625, block_size=64)
    assert (model_args.config_overrides, model_args.width_multiplier, sparsity.density) == (None, 4, 1.0)  # untouched
    dense_config = new_model_config(model_args, _Tokenizer())  # the baseline keeps the base width
    sparse_config = new_model_config(sparse_args, _Tokenizer())
    assert (dense_config.n_embd, dense_config.n_head, sparse_config.n_embd, sparse_config.n_head) == (256, 4, 1024, 16)
    assert sparse_config.n_layer == dense_config.n_layer == 4
    sparse = sparse_nlp.sparsify(_model(sparse_config), config=sparse_sparsity)
    assert _nonzero_linear_weights(sparse) == _linear_weights(_model(dense_config)) == 3_145_728


def _saved_llama(folder) -> str:
    _llama().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("base", ["default", "overrides", "config_name"])
def test_sparse_run_builds_the_base_model_widened(base, tmp_path):
    base_args = {
        "default": ModelArguments(),
        "overrides": ModelArguments(config_overrides="n_layer=2,n_embd=128,n_head=2"),
        "config_name": ModelArguments(config_name=_saved_llama(tmp_path), config_overrides="num_hidden_layers=1"),
    }[base]
    wide_args = ModelArguments(**{**base_args.__dict__, "width_multiplier": 2})
    sparse_args, sparse_sparsity = widened_sparse_run(wide_args, SparsityConfig(density=0.5))
    assert sparse_sparsity.density == 0.125
    expected = widen_config(new_model_config(base_args, _Tokenizer()), 2)
    assert new_model_config(sparse_args, _Tokenizer()).to_dict() == expected.to_dict()
    assert sparse_args.config_overrides == {
        "default": "n_embd=512,n_head=8",
        "overrides": "n_layer=2,n_embd=256,n_head=4",  # the widened values replace the given ones
        "config_name": "num_hidden_layers=1,hidden_size=128,num_attention_heads=8,num_key_value_heads=4,"
                       "intermediate_size=256",
    }[base]


def test_multiplier_one_returns_the_inputs():
    model_args, sparsity = ModelArguments(model_name_or_path="gpt2"), SparsityConfig()
    assert widened_sparse_run(model_args, sparsity) == (model_args, sparsity)
    assert widened_sparse_run(model_args, sparsity)[0] is model_args


def test_helper_errors_are_one_line():
    _one_line_error(widened_sparse_run, ModelArguments(model_name_or_path="gpt2", width_multiplier=4),
                    SparsityConfig(), match=r"^--width_multiplier 4 builds a new, wider model and cannot keep the "
                                            r"pretrained weights of --model_name_or_path gpt2; .*--config_name gpt2")
    _one_line_error(widened_sparse_run, ModelArguments(width_multiplier=0.5), SparsityConfig(),
                    match="^width_multiplier must be a number >= 1")
    _one_line_error(widened_sparse_run, ModelArguments(width_multiplier=4), SparsityConfig(method="dense"),
                    match="method 'dense' trains none")
    message = _one_line_error(widened_sparse_run, ModelArguments(width_multiplier=4),
                              SparsityConfig(density=0.001, block_size=64), match="without a live 64x64 block")
    widened_sparse_run(ModelArguments(width_multiplier=4), SparsityConfig(density=_named_density(message),
                                                                          block_size=64))  # what it names works
