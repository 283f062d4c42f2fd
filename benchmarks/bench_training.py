"""End-to-end training speed: dense vs block-sparse GPT-2-width models, measured side by side in one run.

    python benchmarks/bench_training.py                 # d_model 768, 4 layers, density 0.2 and 0.1, block 64

Every variant trains the same architecture on the same random tokens with AdamW; rounds interleave the variants
and the table reports the median tokens/s. Block-sparse ``fast`` mode computes the dense weight gradient only in a
window of ``momentum_window`` steps before each topology update; the table measures steady steps and window steps
(the same cost as ``exact`` mode, which does it every step) and reports their mix for the given update interval.
Memory counts elements of the sparse layers' weights + optimizer state against the dense model's same layers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from sparse_nlp import SparsityController, sparse_layers, sparsify


def build_model(args) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=args.d_model, n_layer=args.layers, n_head=args.heads, vocab_size=args.vocab,
                        n_positions=args.seq_len, bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
    return GPT2LMHeadModel(config).train()


class Variant:
    def __init__(self, name, args, density=None, block_momentum=None):
        self.name, self.density, self.block_momentum = name, density, block_momentum
        self.model = build_model(args)
        if density is not None:
            sparsify(self.model, density=density, block_size=args.block_size, block_momentum=block_momentum,
                     update_interval=10**9)  # no topology update inside the timed steps
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.controller = (SparsityController(self.model, self.optimizer, total_steps=10**9)
                           if density is not None else None)
        self.tokens_per_second = []

    def train_steps(self, batch, steps) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.model(input_ids=batch, labels=batch).loss.backward()
            self.optimizer.step()
            if self.controller is not None:
                self.controller.step()
            self.optimizer.zero_grad(set_to_none=True)
        return batch.numel() * steps / (time.perf_counter() - start)

    def sparse_memory_ratio(self) -> float:
        layers = [layer for _, layer in sparse_layers(self.model)]
        elements = sum(layer.values.numel() + sum(v.numel() for v in self.optimizer.state[layer.values].values()
                                                  if v.dim() > 0) for layer in layers)
        dense = sum(3 * layer.weight_shape[0] * layer.weight_shape[1] for layer in layers)  # weight + 2 Adam slots
        return elements / dense


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d_model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.1])
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--update_interval", type=int, default=100, help="for the fast-mode mix")
    parser.add_argument("--momentum_window", type=int, default=10, help="for the fast-mode mix")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"

    variants = [Variant("dense", args)]
    for density in args.densities:
        variants.append(Variant(f"block {args.block_size} d={density} steady", args, density, "fast"))
        variants.append(Variant(f"block {args.block_size} d={density} dense-dW", args, density, "exact"))
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    for variant in variants:
        variant.model.to(device)
        variant.train_steps(batch.to(device), 1)  # warm-up (allocations, optimizer state)
    for round_index in range(args.rounds):
        for variant in variants:
            variant.tokens_per_second.append(variant.train_steps(batch.to(device), args.steps))
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)

    dense = statistics.median(variants[0].tokens_per_second)
    window = args.momentum_window / args.update_interval
    print(f"\nGPT-2 width {args.d_model}, {args.layers} layers, vocab {args.vocab}, {args.batch}x{args.seq_len} tokens "
          f"per step, AdamW, {device}, {torch.get_num_threads()} threads; median of {args.rounds} rounds x "
          f"{args.steps} steps\n")
    print("| variant | tokens/s | vs dense | sparse-layer weights+state vs dense |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| dense | {dense:,.0f} | 1.00x | 1.00 |")
    for steady, exact in zip(variants[1::2], variants[2::2]):
        steady_tps = statistics.median(steady.tokens_per_second)
        exact_tps = statistics.median(exact.tokens_per_second)
        fast_tps = 1.0 / ((1 - window) / steady_tps + window / exact_tps)
        memory = steady.sparse_memory_ratio()
        label = steady.name.replace(" steady", "")
        print(f"| {label} exact (dense dW every step) | {exact_tps:,.0f} | {exact_tps / dense:.2f}x | {memory:.2f} |")
        print(f"| {label} fast (window {args.momentum_window}/{args.update_interval}) | {fast_tps:,.0f} | "
              f"{fast_tps / dense:.2f}x | {memory:.2f} |")
        print(f"| {label} steady step (sparse dW) | {steady_tps:,.0f} | {steady_tps / dense:.2f}x | {memory:.2f} |")


if __name__ == "__main__":
    main()
