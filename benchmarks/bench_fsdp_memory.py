"""Per-rank memory of sparse training state: parameters, gradients, AdamW state and masks, under DDP and FSDP2.

    python benchmarks/bench_fsdp_memory.py --mode replicated                     # what every DDP rank holds
    python benchmarks/bench_fsdp_memory.py --mode replicated --block_size 64     # block-sparse under DDP
    python benchmarks/bench_fsdp_memory.py --mode replicated --density 1         # dense under DDP
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_fsdp_memory.py --mode fsdp2

A GPT-2 (24 x 1,024 by default: 355M parameters, 302M of them in the linear layers) trains two AdamW steps with a
topology update after the first, on the CPU (gloo). Then the bytes each rank holds are counted tensor by tensor: the
local shards of parameters, gradients (read after the optimizer step, before the controller's), optimizer state and
masks. DDP keeps a whole replica on every rank, so "replicated" is measured on one process (DDP adds its gradient
buckets, another copy of the gradients unless gradient_as_bucket_view=True, not counted here). Also printed: the
whole copies a sparse-momentum topology update holds at its peak under FSDP2, counted from what the controller
gathers: every sparse layer's mask (twice: before and after) and momentum (fp32), and one layer's weight at a time. Prints one JSON line (rank 0).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

from sparse_nlp import SparsityConfig, SparsityController, sparse_layers, sparsify
from sparse_nlp.parallel.fsdp import local


def _bytes(tensors) -> int:
    unique = {id(tensor): tensor for tensor in tensors}  # a tied weight once
    return sum(local(t).numel() * local(t).element_size() for t in unique.values())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["replicated", "fsdp2"], required=True)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--block_size", type=int, default=1)
    parser.add_argument("--n_layer", type=int, default=24)
    parser.add_argument("--n_embd", type=int, default=1024)
    parser.add_argument("--seq_length", type=int, default=128)
    args = parser.parse_args(argv)
    sharded = args.mode == "fsdp2"
    own_group = sharded and not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_embd // 64,
                                       n_positions=args.seq_length))
    sparse = args.density < 1
    if sparse:
        sparsify(model, config=SparsityConfig(density=args.density, block_size=args.block_size, update_interval=1))
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    controller = SparsityController(model, optimizer, total_steps=2) if sparse else None
    tokens = torch.randint(0, model.config.vocab_size, (1, args.seq_length))
    for _ in range(2):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        grads = _bytes([p.grad for p in model.parameters() if p.grad is not None])  # (an update resizes block values)
        if controller is not None:
            controller.step()
        optimizer.zero_grad()
    params = list(model.parameters())
    layers = sparse_layers(model) if sparse else []
    linear_weights = sum(layer.weight_shape[0] * layer.weight_shape[1] for _, layer in layers)
    result = {
        "mode": args.mode, "ranks": dist.get_world_size() if sharded else 1, "density": args.density,
        "block_size": args.block_size, "model": f"GPT-2 {args.n_layer} x {args.n_embd}",
        "parameters_total": sum(p.numel() for p in params),  # whole (FSDP2's DTensors report their global numel)
        "bytes": {
            "parameters": _bytes(params),
            "gradients": grads,
            "optimizer_state": _bytes([v for state in optimizer.state.values() for v in state.values()
                                       if isinstance(v, torch.Tensor) and v.dim() > 0]),
            "masks": _bytes([buffer for name, buffer in model.named_buffers() if name.endswith("mask")]),
        },
        # under FSDP2, a sparse-momentum update's peak: masks (bool, before and after) and momentum (fp32) of every
        # sparse layer, plus the largest layer's weight (fp32) being updated
        "update_gathers_bytes": (linear_weights * 6 + 4 * max(l.weight_shape[0] * l.weight_shape[1] for _, l in layers)
                                 if sharded and args.block_size == 1 else 0),
        "topology_updates": controller.update_count if controller is not None else 0,
    }
    result["bytes"]["total"] = sum(result["bytes"].values())
    if not sharded or dist.get_rank() == 0:
        print(json.dumps(result))
    if own_group:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
