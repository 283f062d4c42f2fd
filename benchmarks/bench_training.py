"""End-to-end training speed over full topology cycles: dense vs block-sparse GPT-2-width models, side by side.

    python benchmarks/bench_training.py                          # fp32; density 0.2 and 0.1, block 64
    python benchmarks/bench_training.py --precisions fp32 bf16   # adds a bf16 (autocast) column
    python benchmarks/bench_training.py --device cuda --bf16     # on a GPU (--bf16: fp32 and bf16 columns)
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_training.py   # DDP: 2 processes (CPU: gloo, cores split)

What is timed is what a user pays: whole cycles of ``--cycle`` optimizer steps, each ending with a real topology
update. A block-sparse run in ``fast`` mode computes the dense weight gradient (for the momentum of absent blocks)
in the last ``--window`` steps of each cycle, then updates the topology: both are inside the timed window. The
default, 1 window step in a cycle of 10 with an update at its end, is the library's 10-in-100 ratio with the
update's own cost counted 10x more often than in training, so the figure errs low. Variants run interleaved (one
cycle each per round, after a warm-up cycle), and the table reports the median tokens/s over rounds.

Under torchrun every variant trains in DDP with per-process batch ``--batch`` (tokens/s counts all processes):
DDP skips the block ``values`` and ``all_reduce_block_grads`` averages their gradients after each backward, as
SparseTrainer does; the gradient sync is inside the timed window.

Memory counts elements of the sparse layers' weights + AdamW state against the dense model's same layers (during
the window each sparse layer also holds one dense fp32 gradient sum, freed at the update).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time

# No THP_MEM_ALLOC_ENABLE here: importing sparse_nlp asks torch for huge pages (kernels/huge_pages.py), so this
# script times what a plain user script gets.

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import torch.distributed as dist

from sparse_nlp import SparsityController, sparse_layers, sparsify
from sparse_nlp.kernels.huge_pages import huge_page_status
from sparse_nlp.distributed import (NO_FORWARD_BUFFER_SYNC, all_reduce_block_grads, ignore_block_values_in_ddp,
                                   is_distributed)

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def build_model(args) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    # As recipes/train_lm.py trains: no dropout (LM pretraining that sees each token about once) and GPT-2's tanh
    # GELU as one fused op (gelu_new spells it as 5 elementwise ops). Both cost dense and sparse runs the same.
    config = GPT2Config(n_embd=args.d_model, n_layer=args.layers, n_head=args.heads, vocab_size=args.vocab,
                        n_positions=args.seq_len, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                        activation_function="gelu_pytorch_tanh", loss_type="ForCausalLM")
    return GPT2LMHeadModel(config).train()


class Variant:
    """One model + optimizer (+ controller) that trains whole cycles and records tokens/s per cycle."""

    def __init__(self, args, device: torch.device, precision: str, density: float | None):
        self.precision, self.density, self.device = precision, density, device
        self.name = "dense" if density is None else f"block {args.block_size}, density {density}, {args.block_momentum}"
        self.model = build_model(args)
        if density is not None:
            sparsify(self.model, density=density, block_size=args.block_size, block_momentum=args.block_momentum,
                     update_interval=args.cycle, momentum_window=args.window)
        self.model.to(device)
        self.forward = self.model
        if is_distributed():  # torchrun: DDP skips the resizable block values; train_cycle syncs their gradients
            ignore_block_values_in_ddp(self.model)
            self.forward = torch.nn.parallel.DistributedDataParallel(self.model, **NO_FORWARD_BUFFER_SYNC)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        # total_steps far beyond the benchmark: updates keep coming at every cycle's end, at a high prune rate
        self.controller = (SparsityController(self.model, self.optimizer, total_steps=10**6)
                           if density is not None else None)
        self.tokens_per_second: list[float] = []
        self.updates = 0

    def _autocast(self):
        dtype = AUTOCAST_DTYPES[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_cycle(self, batch: torch.Tensor, steps: int) -> float:
        self._sync()
        start = time.perf_counter()
        for _ in range(steps):
            with self._autocast():
                loss = self.forward(input_ids=batch, labels=batch).loss
            loss.backward()
            all_reduce_block_grads(self.model)  # a no-op on one process
            self.optimizer.step()
            if self.controller is not None and self.controller.step() is not None:
                self.updates += 1
            self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        world = dist.get_world_size() if is_distributed() else 1
        return batch.numel() * world * steps / (time.perf_counter() - start)

    def sparse_memory_ratio(self) -> float:
        layers = [layer for _, layer in sparse_layers(self.model)]
        elements = sum(layer.values.numel() + sum(v.numel() for v in self.optimizer.state[layer.values].values()
                                                  if v.dim() > 0) for layer in layers)
        dense = sum(3 * layer.weight_shape[0] * layer.weight_shape[1] for layer in layers)  # weight + 2 Adam slots
        return elements / dense


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d_model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.0, help="GPT-2's three dropouts (0: as the recipe)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.1])
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--block_momentum", choices=["fast", "exact"], default="fast")
    parser.add_argument("--cycle", type=int, default=10, help="steps per timed cycle; a topology update ends each")
    parser.add_argument("--window", type=int, default=1, help="fast mode: steps per cycle with the dense dW")
    parser.add_argument("--rounds", type=int, default=3, help="timed cycles per variant (after one warm-up cycle)")
    parser.add_argument("--precisions", nargs="+", choices=sorted(AUTOCAST_DTYPES), default=["fp32"])
    parser.add_argument("--bf16", action="store_true", help="shorthand for --precisions fp32 bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if args.bf16:
        args.precisions = ["fp32", "bf16"]
    if not 1 <= args.window <= args.cycle:
        parser.error(f"--window {args.window} must be between 1 and --cycle {args.cycle}")
    return args


# What full-cycle training must reach on CPU in fp32 (block 64, fast mode): tokens/s vs dense, and memory.
SPEED_TARGETS = {0.2: 1.5, 0.1: 2.0}
MEMORY_TARGET = 0.3


def target_lines(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        target = SPEED_TARGETS.get(row["density"])
        if row["precision"] != "fp32" or target is None:
            continue
        met = row["vs_dense"] >= target and row["memory_vs_dense"] <= MEMORY_TARGET
        lines.append(f"target: {row['variant']} fp32 >= {target:g}x dense tokens/s and memory <= {MEMORY_TARGET:g}: "
                     f"{row['vs_dense']:.2f}x, memory {row['memory_vs_dense']:.2f}, {'met' if met else 'MISSED'}")
    return lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # started by torchrun
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    variants = [Variant(args, device, precision, density)
                for precision in args.precisions for density in [None, *args.densities]]
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = batch.to(device)
    for variant in variants:
        variant.train_cycle(batch, args.cycle)  # warm-up: allocations, optimizer state, the first update
        variant.updates = 0
    for round_index in range(args.rounds):
        for variant in variants:
            variant.tokens_per_second.append(variant.train_cycle(batch, args.cycle))
        if not is_distributed() or dist.get_rank() == 0:
            print(f"round {round_index + 1}/{args.rounds} done", flush=True)

    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    if world > 1:
        machine += f" per process, {world} DDP processes"
    rows = []
    for variant in variants:
        dense = next(v for v in variants if v.precision == variant.precision and v.density is None)
        tps = statistics.median(variant.tokens_per_second)
        rows.append({
            "variant": variant.name, "precision": variant.precision, "density": variant.density,
            "tokens_per_second": tps, "vs_dense": tps / statistics.median(dense.tokens_per_second),
            "samples": variant.tokens_per_second, "updates_timed": variant.updates,
            "memory_vs_dense": variant.sparse_memory_ratio() if variant.density is not None else 1.0,
        })
    huge_pages = huge_page_status() if device.type == "cpu" else None
    result = {"args": vars(args), "device": str(device), "machine": machine, "torch": torch.__version__,
              "processes": world, "huge_pages": huge_pages, "rows": rows}
    if world > 1:
        dist.destroy_process_group()
        if int(os.environ.get("RANK", "0")) != 0:
            return result
    print(f"\nGPT-2 width {args.d_model}, {args.layers} layers, vocab {args.vocab}, dropout {args.dropout}, "
          f"{args.batch}x{args.seq_len} tokens per step and process, AdamW, {device} ({machine}); median of {args.rounds} full cycles of {args.cycle} steps "
          f"(dense dW in {args.window}, topology update at the end), interleaved" + (f"; {huge_pages}" if huge_pages else "") + "\n")
    header = "| variant | " + " | ".join(f"{p} tokens/s | {p} vs dense" for p in args.precisions)
    print(header + " | sparse layers' weights + Adam state vs dense |")
    print("| --- | " + " | ".join("---: | ---:" for _ in args.precisions) + " | ---: |")
    for name in dict.fromkeys(row["variant"] for row in rows):
        cells = [row for row in rows if row["variant"] == name]
        print(f"| {name} | " + " | ".join(f"{r['tokens_per_second']:,.0f} | {r['vs_dense']:.2f}x" for r in cells)
              + f" | {cells[0]['memory_vs_dense']:.2f} |")
    for line in target_lines(rows):
        print(line)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.output}")
    return result


if __name__ == "__main__":
    main()
