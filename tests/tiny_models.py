"""One table of tiny models, built from configs (no downloads), that every core test runs through.

Dropout is off so that runs are reproducible step for step.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

VOCAB = 64


class TwoLayerMLP(nn.Module):
    """A plain torch model: no output embedding, so all-linear takes both layers."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def _llama():
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                        max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _bert():
    return BertForMaskedLM(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                                      pad_token_id=0, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0))


def _opt():
    return OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                    vocab_size=VOCAB, max_position_embeddings=32, word_embed_proj_dim=32,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=1, dropout=0.0))


TINY_MODELS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "opt": _opt, "mlp": TwoLayerMLP}
LANGUAGE_MODELS = ["gpt2", "llama", "bert", "opt"]


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TINY_MODELS[name]().eval()


def example_batch(name: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return {"x": torch.randn(4, 24, generator=generator)}
    return {"input_ids": torch.randint(2, VOCAB, (2, 12), generator=generator)}


def output_of(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out.logits


def loss_of(name: str, model: nn.Module, batch: dict) -> torch.Tensor:
    if name == "mlp":
        return model(**batch).pow(2).mean()
    return model(**batch, labels=batch["input_ids"]).loss
