"""Tiny causal LM runs for the Trainer tests: a 2-layer GPT-2 on random tokens, built from a config (no downloads)."""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

VOCAB = 64
BLOCK = 16


def tiny_gpt2(n_embd: int = 32, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=n_embd, n_head=2, vocab_size=VOCAB, n_positions=BLOCK, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: runs repeat step for step
    )
    return GPT2LMHeadModel(config)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, size: int = 96, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (size, BLOCK), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_args(output_dir, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def masks(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".mask")}
