"""End-to-end training speed over full topology cycles: dense vs block-sparse GPT-2-width models, side by side.

    python benchmarks/bench_training.py                          # fp32; density 0.2 and 0.1, block 64
    python benchmarks/bench_training.py --precisions fp32 bf16   # adds a bf16 (autocast) column
    python benchmarks/bench_training.py --device cuda            # GPU: GPT-2 small and medium, 16 x 1,024 tokens, bf16
    python benchmarks/bench_training.py --device cuda --models small --precisions fp32 bf16
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_training.py   # DDP: 2 processes (CPU: gloo, cores split)

What is timed is what a user pays: whole cycles of ``--cycle`` optimizer steps, each ending with a real topology
update. A block-sparse run in ``fast`` mode computes the dense weight gradient (for the momentum of absent blocks)
in the last ``--window`` steps of each cycle, then updates the topology: both are inside the timed window. The
default, 1 window step in a cycle of 10 with an update at its end, is the library's 10-in-100 ratio with the
update's own cost counted 10x more often than in training, so the figure errs low. Variants run interleaved (one
cycle each per round, after a warm-up cycle), and the table reports the median tokens/s over rounds.

On CUDA the defaults are what a GPU user trains: GPT-2 small (12 x 768; densities 0.2 and 0.1) and GPT-2 medium
(24 x 1,024; density 0.1, its target), vocab 8,192, 16 x 1,024 tokens a step, bf16 autocast, and the library's own
update ratio (SparsityConfig's update_interval and momentum_window: a cycle of 100 steps with 10 dense-gradient
steps), one timed cycle per variant after the warm-up cycle. It prints its estimated time before it starts (1-2
minutes on an H200) and, after each model's warm-up cycle, what the timed cycles will take.

Under torchrun every variant trains in DDP with per-process batch ``--batch`` (tokens/s counts all processes):
DDP skips the block ``values`` and ``all_reduce_block_grads`` averages their gradients after each backward, as
SparseTrainer does; the gradient sync is inside the timed window.

Memory counts elements of the sparse layers' weights + AdamW state against the dense model's same layers (during
the window each sparse layer also holds one dense fp32 gradient sum, freed at the update).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from sparse_nlp import SparsityConfig, SparsityController, sparse_layers, sparsify
from sparse_nlp.kernels import huge_page_status, request_huge_pages
from sparse_nlp.parallel.ddp import (
    NO_FORWARD_BUFFER_SYNC,
    all_reduce_block_grads,
    ignore_block_values_in_ddp,
    is_distributed,
)

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# GPU presets: (width, layers, heads, default densities). Medium's one density is the one its target is set at.
MODELS = {"small": (768, 12, 12, [0.2, 0.1]), "medium": (1024, 24, 16, [0.1])}
H200_DENSE_STEP_S = {"small": 0.037, "medium": 0.111}  # small measured (docs); medium assumed 3x: for the estimate


def build_model(args, shape: tuple[int, int, int]) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    d_model, layers, heads = shape
    # As recipes/train_lm.py trains: no dropout (LM pretraining that sees each token about once) and GPT-2's tanh
    # GELU as one fused op (gelu_new spells it as 5 elementwise ops). Both cost dense and sparse runs the same.
    config = GPT2Config(n_embd=d_model, n_layer=layers, n_head=heads, vocab_size=args.vocab,
                        n_positions=args.seq_len, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                        activation_function="gelu_pytorch_tanh", loss_type="ForCausalLM")
    return GPT2LMHeadModel(config).train()


class Variant:
    """One model + optimizer (+ controller) that trains whole cycles and records tokens/s per cycle."""

    def __init__(self, args, shape: tuple[int, int, int], device: torch.device, precision: str, density: float | None,
                 method: str = "momentum"):
        self.precision, self.density, self.device = precision, density, device
        self.name = "dense" if density is None else f"block {args.block_size}, density {density}, {args.block_momentum}"
        self.model = build_model(args, shape)
        if density is not None:
            sparsify(self.model, density=density, method=method, block_size=args.block_size,
                     block_momentum=args.block_momentum, update_interval=args.cycle, momentum_window=args.window)
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


# Defaults that differ by device (CPU: a 4-layer model that the shared CPUs time in minutes; CUDA: what a GPU user
# trains, at the library's update ratio). An option given on the command line wins.
CPU_DEFAULTS = dict(seq_len=256, batch=8, cycle=10, window=1, rounds=3, precisions=["fp32"])
CUDA_DEFAULTS = dict(seq_len=1024, batch=16, cycle=SparsityConfig().update_interval,
                     window=SparsityConfig().momentum_window, rounds=1, precisions=["bf16"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                        help="GPT-2 presets (default on CUDA: small medium); without: --d_model/--layers/--heads")
    parser.add_argument("--d_model", type=int, default=None, help="default 768 (one model of that width)")
    parser.add_argument("--layers", type=int, default=None, help="default 4")
    parser.add_argument("--heads", type=int, default=None, help="default 12")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq_len", type=int, default=None, help="default 256 on CPU, 1024 on CUDA")
    parser.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 16 on CUDA")
    parser.add_argument("--dropout", type=float, default=0.0, help="GPT-2's three dropouts (0: as the recipe)")
    parser.add_argument("--densities", type=float, nargs="+", default=None,
                        help="default 0.2 0.1 (on CUDA each preset's own: small 0.2 0.1, medium 0.1)")
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--block_momentum", choices=["fast", "exact"], default="fast")
    parser.add_argument("--cycle", type=int, default=None,
                        help="steps per timed cycle; a topology update ends each (default 10 on CPU, 100 on CUDA)")
    parser.add_argument("--window", type=int, default=None,
                        help="fast mode: steps per cycle with the dense dW (default 1 on CPU, 10 on CUDA)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed cycles per variant after one warm-up cycle (default 3 on CPU, 1 on CUDA)")
    parser.add_argument("--precisions", nargs="+", choices=sorted(AUTOCAST_DTYPES), default=None,
                        help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--bf16", action="store_true", help="shorthand for --precisions fp32 bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    for name, value in (CUDA_DEFAULTS if gpu else CPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.bf16:
        args.precisions = ["fp32", "bf16"]
    if args.models is None and gpu and (args.d_model, args.layers, args.heads) == (None, None, None):
        args.models = ["small", "medium"]
    if args.models is None:  # one model of the given shape
        args.d_model, args.layers, args.heads = args.d_model or 768, args.layers or 4, args.heads or 12
        args.densities = args.densities or [0.2, 0.1]
    if not 1 <= args.window <= args.cycle:
        parser.error(f"--window {args.window} must be between 1 and --cycle {args.cycle}")
    return args


def model_plan(args) -> list[tuple[str, tuple[int, int, int], list[float]]]:
    """(name, (width, layers, heads), densities) of each model to time, in order."""
    if args.models:
        return [(name, MODELS[name][:3], args.densities or MODELS[name][3]) for name in args.models]
    return [("custom", (args.d_model, args.layers, args.heads), args.densities)]


def estimate_seconds(args, plan) -> float | None:
    """A-priori time of the timed and warm-up cycles on an H200 (GPT-2 presets at 16 x 1,024 only), else None."""
    if any(name not in H200_DENSE_STEP_S for name, _, _ in plan):
        return None
    scale = args.batch * args.seq_len / (16 * 1024)
    steps = (1 + args.rounds) * args.cycle  # the warm-up cycle and the timed ones
    return sum(H200_DENSE_STEP_S[name] * scale * steps * len(args.precisions) * (1 + len(densities))
               for name, _, densities in plan)


# What full-cycle training must reach on CPU in fp32 (block 64, fast mode): tokens/s vs dense, and memory.
SPEED_TARGETS = {0.2: 1.5, 0.1: 2.0}
MEMORY_TARGET = 0.3
# On an H100/H200 in bf16 at the library's update ratio (block 64, fast mode): tokens/s vs dense, per preset.
GPU_SPEED_TARGETS = {("small", 0.1): 1.3, ("small", 0.2): 1.15, ("medium", 0.1): 1.5}


def target_lines(rows: list[dict], device_type: str = "cpu") -> list[str]:
    lines = []
    for row in rows:
        if device_type == "cuda":
            target = GPU_SPEED_TARGETS.get((row.get("model"), row["density"]))
            if row["precision"] != "bf16" or target is None:
                continue
            met = row["vs_dense"] >= target
            lines.append(f"target: GPT-2 {row['model']}, {row['variant']} bf16 >= {target:g}x dense tokens/s: "
                         f"{row['vs_dense']:.2f}x, {'met' if met else 'MISSED'}")
            continue
        target = SPEED_TARGETS.get(row["density"])
        if row["precision"] != "fp32" or target is None:
            continue
        met = row["vs_dense"] >= target and row["memory_vs_dense"] <= MEMORY_TARGET
        lines.append(f"target: {row['variant']} fp32 >= {target:g}x dense tokens/s and memory <= {MEMORY_TARGET:g}: "
                     f"{row['vs_dense']:.2f}x, memory {row['memory_vs_dense']:.2f}, {'met' if met else 'MISSED'}")
    return lines


def training_batch(args, device: torch.device) -> torch.Tensor:
    """The one batch every step of every variant trains on: random tokens (speed does not depend on them)."""
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    return batch.to(device)


def warm_up(variants: list[Variant], batch: torch.Tensor, cycle: int) -> float:
    """One untimed cycle of each variant (allocations, optimizer state, the first update); the seconds it took."""
    start = time.perf_counter()
    for variant in variants:
        variant.train_cycle(batch, cycle)
        variant.updates = 0
    return time.perf_counter() - start


def time_rounds(variants: list[Variant], batch: torch.Tensor, cycle: int, rounds: int, rank0: bool = True) -> None:
    """`rounds` rounds of one timed cycle of each variant in turn (interleaved); each cycle's tokens/s is appended
    to its variant's ``tokens_per_second``."""
    for round_index in range(rounds):
        for variant in variants:
            variant.tokens_per_second.append(variant.train_cycle(batch, cycle))
        if rank0:
            print(f"round {round_index + 1}/{rounds} done", flush=True)


def time_model(args, device: torch.device, name: str, shape, densities, rank0: bool) -> list[dict]:
    """Build one model's variants, warm each up for a cycle, time `rounds` interleaved cycles: one row each."""
    variants = [Variant(args, shape, device, precision, density)
                for precision in args.precisions for density in [None, *densities]]
    batch = training_batch(args, device)
    warm = warm_up(variants, batch, args.cycle)
    if rank0:
        print(f"{name} {shape[1]} x {shape[0]}: warm-up cycle {warm:.0f} s; {args.rounds} timed round(s) will take "
              f"about {warm * args.rounds:.0f} s", flush=True)
    time_rounds(variants, batch, args.cycle, args.rounds, rank0)
    rows = []
    for variant in variants:
        dense = next(v for v in variants if v.precision == variant.precision and v.density is None)
        tps = statistics.median(variant.tokens_per_second)
        rows.append({
            "model": name, "d_model": shape[0], "layers": shape[1], "heads": shape[2],
            "variant": variant.name, "precision": variant.precision, "density": variant.density,
            "tokens_per_second": tps, "vs_dense": tps / statistics.median(dense.tokens_per_second),
            "samples": variant.tokens_per_second, "updates_timed": variant.updates,
            "memory_vs_dense": variant.sparse_memory_ratio() if variant.density is not None else 1.0,
        })
    return rows


def print_table(args, rows: list[dict], device, machine: str, huge_pages) -> None:
    first = rows[0]
    model = "GPT-2" if first["model"] == "custom" else f"GPT-2 {first['model']}:"
    print(f"\n{model} width {first['d_model']}, {first['layers']} layers, vocab {args.vocab}, dropout {args.dropout}, "
          f"{args.batch}x{args.seq_len} tokens per step and process, AdamW, {device} ({machine}); median of {args.rounds} full cycles of {args.cycle} steps "
          f"(dense dW in {args.window}, topology update at the end), interleaved" + (f"; {huge_pages}" if huge_pages else "") + "\n")
    header = "| variant | " + " | ".join(f"{p} tokens/s | {p} vs dense" for p in args.precisions)
    print(header + " | sparse layers' weights + Adam state vs dense |")
    print("| --- | " + " | ".join("---: | ---:" for _ in args.precisions) + " | ---: |")
    for name in dict.fromkeys(row["variant"] for row in rows):
        cells = [row for row in rows if row["variant"] == name]
        print(f"| {name} | " + " | ".join(f"{r['tokens_per_second']:,.0f} | {r['vs_dense']:.2f}x" for r in cells)
              + f" | {cells[0]['memory_vs_dense']:.2f} |")


def main(argv=None) -> dict:
    request_huge_pages()  # torch's large CPU tensors on huge pages, as a user script that asks gets them (docs)
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # started by torchrun
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    device = torch.device(args.device)
    rank0 = not is_distributed() or dist.get_rank() == 0
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    plan = model_plan(args)
    estimate = estimate_seconds(args, plan)
    if rank0 and (len(plan) > 1 or estimate is not None):
        models = ", ".join(f"{name} ({shape[1]} x {shape[0]}, densities {'/'.join(map(str, d))})"
                           for name, shape, d in plan)
        print(f"plan: {models}; {'/'.join(args.precisions)}; {args.batch} x {args.seq_len} tokens a step; "
              f"1 warm-up + {args.rounds} timed cycle(s) of {args.cycle} steps (dense dW in {args.window}) per variant"
              + (f"; estimate about {estimate:.0f} s on an H200 (dense step times; sparse assumed as fast), model "
                 "builds and kernel compiles not included" if estimate is not None else ""), flush=True)
    rows = []
    for name, shape, densities in plan:
        rows += time_model(args, device, name, shape, densities, rank0)
        if device.type == "cuda":
            gc.collect()  # this model's variants (their hooks hold reference cycles) are gone: the next gets the memory
            torch.cuda.empty_cache()

    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    if world > 1:
        machine += f" per process, {world} DDP processes"
    huge_pages = huge_page_status() if device.type == "cpu" else None
    result = {"args": vars(args), "device": str(device), "machine": machine, "torch": torch.__version__,
              "processes": world, "huge_pages": huge_pages, "rows": rows}
    if world > 1:
        dist.destroy_process_group()
        if int(os.environ.get("RANK", "0")) != 0:
            return result
    for name, _, _ in plan:
        print_table(args, [row for row in rows if row["model"] == name], device, machine, huge_pages)
    for line in target_lines(rows, device.type):
        print(line)
    if args.output:
        write_json(result, args.output)
    return result


def write_json(result: dict, path: str) -> None:
    """Write the results to `path` (its folders made as needed) and say so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
